"""The scheduler's moving average of measured times."""

from __future__ import annotations

import pytest

from gateway.batching.average import MovingAverage


def test_moving_average_is_zero_until_the_first_sample_which_it_takes_as_is():
    average = MovingAverage()
    assert average.value == 0.0
    average.add(50.0)
    assert average.value == 50.0


def test_moving_average_weighs_each_new_sample_one_fifth():
    average = MovingAverage()
    for sample in (100.0, 200.0, 0.0):
        average.add(sample)
    assert average.value == pytest.approx(0.8 * (0.8 * 100 + 0.2 * 200))


def test_moving_average_of_zero_counts_as_empty():
    average = MovingAverage()
    average.add(0.0)
    average.add(30.0)
    assert average.value == 30.0
