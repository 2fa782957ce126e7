"""Request options: every parameter the gateway reads is parsed and checked once, at the edge."""

from __future__ import annotations

import numpy as np
import pytest

from gateway.errors import InvalidRequest
from gateway.types import (
    DEFAULT_OPTIONS,
    MAX_TEXT_CHARS,
    InferRequest,
    RequestOptions,
    Tensor,
    ascii_int,
)


def test_no_parameters_share_the_default_options():
    assert RequestOptions.parse({}) is DEFAULT_OPTIONS
    assert InferRequest("m").options is DEFAULT_OPTIONS


def test_every_known_parameter_is_parsed_into_its_type():
    options = RequestOptions.parse(
        {
            "tenant": "acme",
            "surface": "checkout",
            "sticky_key": 42,
            "segment.geo": "BR",
            "segment.new": True,
            "priority": " 2 ",
            "timeout_ms": "250.5",
            "cache": "false",
            "entity_key": "card-9",
            "tier": 1,
        }
    )
    assert (options.tenant, options.surface, options.entity_key) == ("acme", "checkout", "card-9")
    assert options.sticky_key == "42"
    assert dict(options.segments) == {"geo": "BR", "new": "True"}  # as events store them
    assert options.priority == 2 and options.timeout_ms == 250.5 and options.cache is False
    # What route match rules compare: every parameter as text, a bool as true/false.
    assert options.labels["tier"] == "1" and options.labels["segment.new"] == "true"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("priority", "²"),  # a digit to str.isdigit(), not to int()
        ("priority", "urgent"),
        ("priority", 0),
        ("priority", -1),
        ("priority", True),
        ("priority", 1.5),
        ("priority", "9" * 40),
        ("timeout_ms", 0),
        ("timeout_ms", -5),
        ("timeout_ms", "soon"),
        ("timeout_ms", "inf"),
        ("timeout_ms", "nan"),
        ("timeout_ms", False),
        ("cache", "maybe"),
        ("cache", 1),
        ("sticky_key", 1.5),
        ("sticky_key", True),
        ("tenant", "t" * (MAX_TEXT_CHARS + 1)),
        ("surface", "s" * (MAX_TEXT_CHARS + 1)),
        ("entity_key", "e" * (MAX_TEXT_CHARS + 1)),
        ("sticky_key", "k" * (MAX_TEXT_CHARS + 1)),
        ("segment.geo", "g" * (MAX_TEXT_CHARS + 1)),
    ],
)
def test_a_bad_parameter_is_invalid_naming_it(name: str, value: bool | int | float | str):
    with pytest.raises(InvalidRequest, match=f"parameter '{name}'"):
        RequestOptions.parse({name: value})


def test_the_row_count_is_the_first_batched_input():

    scalar = Tensor("s", "FP32", np.array(1.0, dtype=np.float32))
    batch = Tensor("x", "FP32", np.zeros((3, 2), dtype=np.float32))
    assert InferRequest("m", inputs=[scalar, batch]).rows == 3
    assert InferRequest("m", inputs=[scalar]).rows == 1


@pytest.mark.parametrize(
    ("text", "number"),
    [("0", 0), ("7", 7), ("0012", 12), ("9" * 18, 10**18 - 1)],
)
def test_ascii_int_reads_ascii_digits(text, number):
    assert ascii_int(text) == number


@pytest.mark.parametrize("text", ["", "²", "1²", "٣", "-1", "+1", " 1", "1 ", "1.0", "9" * 19])
def test_ascii_int_refuses_what_int_would_misread_or_refuse(text):
    assert ascii_int(text) is None


def test_time_left_counts_from_arrival_and_takes_the_sooner_deadline():
    grpc_only = InferRequest("m", timeout_s=2.0, arrived=100.0)
    assert grpc_only.time_left(100.5) == pytest.approx(1.5)
    both = InferRequest(
        "m", timeout_s=2.0, arrived=100.0, options=RequestOptions.parse({"timeout_ms": 500})
    )
    assert both.time_left(100.2) == pytest.approx(0.3)
    assert both.time_left(101.0) == pytest.approx(-0.5)
    assert InferRequest("m", timeout_s=2.0).time_left(1e9) == 2.0  # no arrival: as given
    assert InferRequest("m", arrived=100.0).time_left(200.0) is None
