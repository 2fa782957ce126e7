"""The inline-or-thread decision, fed made-up timings (no model runs, no clocks).

A budget of 100 us (``inline_below_us=100``) throughout; sizes are ``rows.bit_length()``.
"""

from __future__ import annotations

from gateway.batching.inline import _PROBE_FACTOR, _REPROBE_EVERY, InlinePolicy

BUDGET_NS = 100_000


def auto() -> InlinePolicy:
    return InlinePolicy("auto", inline_below_us=BUDGET_NS // 1000)


def test_auto_runs_on_a_thread_until_a_thread_run_is_measured():
    policy = auto()
    assert not policy.should_run_inline(1)
    policy.observe_thread(1, cpu_ns=1_000)
    assert policy.should_run_inline(1)  # 1 us per row: worth a probe


def test_auto_probes_a_size_whose_thread_estimate_is_within_the_probe_factor():
    policy = auto()
    policy.observe_thread(1, cpu_ns=_PROBE_FACTOR * BUDGET_NS - 1)
    assert policy.should_run_inline(1)
    policy = auto()
    policy.observe_thread(1, cpu_ns=_PROBE_FACTOR * BUDGET_NS)
    assert not policy.should_run_inline(1)


def test_auto_estimates_from_thread_cpu_per_row():
    policy = auto()
    policy.observe_thread(10, cpu_ns=100_000)  # 10 us per row
    assert policy.should_run_inline(39)  # 390 us: within 4x the budget
    assert not policy.should_run_inline(40)  # 400 us: not


def test_auto_stays_inline_once_a_size_is_measured_fast_inline():
    policy = auto()
    policy.observe_thread(1, cpu_ns=300_000)  # thread CPU time is inflated by the GIL hand-off
    policy.observe_inline(1, compute_ns=20_000)
    for _ in range(3):
        assert policy.should_run_inline(1)


def test_auto_leaves_a_size_measured_slow_inline():
    policy = auto()
    policy.observe_thread(1, cpu_ns=1_000)
    policy.observe_inline(1, compute_ns=BUDGET_NS)  # not below the budget
    assert not policy.should_run_inline(1)


def test_auto_judges_a_size_by_its_moving_average_of_inline_runs():
    policy = auto()
    policy.observe_thread(1, cpu_ns=1_000)
    policy.observe_inline(1, compute_ns=20_000)
    policy.observe_inline(1, compute_ns=500_000)  # one slow run: 0.8 * 20 + 0.2 * 500 = 116 us
    assert not policy.should_run_inline(1)


def test_auto_probes_a_new_size_from_the_nearest_smaller_size_measured_inline():
    policy = auto()
    policy.observe_thread(1, cpu_ns=10_000_000)  # threads say 10 ms per row: never a probe
    policy.observe_inline(1, compute_ns=30_000)  # size 1, measured inline: 30 us
    # size 3 (4..7 rows): 30 us doubled per size step is 120 us, within 4x the budget
    assert policy.should_run_inline(4)
    # size 5 (16..31 rows): 480 us, beyond it
    assert not policy.should_run_inline(16)
    policy.observe_inline(4, compute_ns=60_000)  # size 3 measured: 60 us
    # size 5 now estimated from size 3, the nearest: 240 us
    assert policy.should_run_inline(16)


def test_auto_does_not_estimate_a_size_from_a_larger_one():
    policy = auto()
    policy.observe_thread(1, cpu_ns=BUDGET_NS * _PROBE_FACTOR)  # threads: too slow to probe
    policy.observe_inline(8, compute_ns=1_000)  # only a larger size measured inline
    assert not policy.should_run_inline(2)


def test_auto_probes_a_slow_size_again_after_reprobe_every_batches():
    policy = auto()
    policy.observe_thread(1, cpu_ns=1_000)
    policy.observe_inline(1, compute_ns=500_000)
    decisions = [policy.should_run_inline(1) for _ in range(2 * _REPROBE_EVERY)]
    assert decisions == ([False] * (_REPROBE_EVERY - 1) + [True]) * 2


def test_auto_reprobe_count_is_shared_across_slow_sizes():
    policy = auto()
    policy.observe_thread(1, cpu_ns=1_000)
    policy.observe_inline(1, compute_ns=500_000)
    policy.observe_inline(2, compute_ns=500_000)
    decisions = [policy.should_run_inline(1 + i % 2) for i in range(_REPROBE_EVERY)]
    assert decisions == [False] * (_REPROBE_EVERY - 1) + [True]


def test_auto_with_a_zero_budget_never_runs_inline():
    policy = InlinePolicy("auto", inline_below_us=0)
    policy.observe_thread(1, cpu_ns=1_000)
    policy.observe_inline(1, compute_ns=1_000)
    assert not policy.should_run_inline(1)


def test_a_thread_run_measured_at_zero_cpu_still_counts():
    policy = auto()
    policy.observe_thread(1, cpu_ns=0)  # coarse thread clocks can read 0: taken as 1 ns
    assert policy.should_run_inline(1)


def test_thread_mode_never_runs_inline_however_fast():
    policy = InlinePolicy("thread", inline_below_us=10**9)
    policy.observe_thread(1, cpu_ns=1)
    policy.observe_inline(1, compute_ns=1)
    assert not policy.should_run_inline(1)


def test_inline_mode_always_runs_inline_even_unmeasured():
    policy = InlinePolicy("inline", inline_below_us=0)
    assert policy.should_run_inline(1)
    policy.observe_inline(1, compute_ns=10**9)
    assert policy.should_run_inline(1)
