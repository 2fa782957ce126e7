"""The native hot loops and their pure-Python reference behave identically, errors included."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import _hotloops, _hotloops_py

try:
    from gateway import _hotloops_c
except ImportError:  # the parity tests below then fail loudly instead of being skipped
    _hotloops_c = None

IMPLEMENTATIONS = {"python": _hotloops_py, "native": _hotloops_c}


def test_native_extension_is_built():
    assert _hotloops_c is not None, "gateway._hotloops_c is not built: run `make native`"


def test_selector_uses_the_extension_when_expected():
    if os.environ.get("GATEWAY_EXPECT_EXTENSIONS"):
        assert _hotloops.USING_EXTENSION
    if os.environ.get("GATEWAY_NO_EXTENSIONS"):
        assert not _hotloops.USING_EXTENSION


@pytest.fixture(params=sorted(IMPLEMENTATIONS))
def impl(request):
    module = IMPLEMENTATIONS[request.param]
    assert module is not None, f"{request.param} hot loops are not importable"
    return module


def outcome(fn, *args):
    """What a call did: its result, or its exception type and message."""
    try:
        return ("ok", fn(*args))
    except (ValueError, TypeError, OverflowError) as err:
        return (type(err).__name__, str(err))


elements = st.lists(st.binary(max_size=40), max_size=30)


@settings(max_examples=300, deadline=None)
@given(elements)
def test_encode_then_decode_round_trips_identically(items):
    encoded = [impl.encode_bytes(items) for impl in IMPLEMENTATIONS.values()]
    assert encoded[0] == encoded[1]
    for impl in IMPLEMENTATIONS.values():
        assert impl.decode_bytes(encoded[0], len(items)) == items


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=64), st.integers(min_value=-2, max_value=20))
def test_decode_of_arbitrary_buffers_agrees_including_errors(buf, count):
    assert outcome(_hotloops_py.decode_bytes, buf, count) == outcome(
        _hotloops_c.decode_bytes, buf, count
    )


@settings(max_examples=200, deadline=None)
@given(elements, st.integers(min_value=-3, max_value=3), st.binary(max_size=5))
def test_decode_with_wrong_counts_or_trailing_bytes_agrees(items, delta, tail):
    buf = _hotloops_py.encode_bytes(items) + tail
    count = max(len(items) + delta, 0)
    assert outcome(_hotloops_py.decode_bytes, buf, count) == outcome(
        _hotloops_c.decode_bytes, buf, count
    )


@settings(max_examples=300, deadline=None)
@given(elements, st.integers(min_value=-2, max_value=2), st.binary(max_size=5))
def test_check_raises_exactly_what_decode_raises(items, delta, tail):
    """check_bytes is decode_bytes without the objects: same verdict, same message."""
    buf = _hotloops_py.encode_bytes(items) + tail
    count = max(len(items) + delta, -1)
    for impl in IMPLEMENTATIONS.values():
        decoded = outcome(impl.decode_bytes, buf, count)
        checked = outcome(impl.check_bytes, buf, count)
        assert checked == (("ok", None) if decoded[0] == "ok" else decoded)


def test_decode_names_the_truncated_element(impl):
    with pytest.raises(ValueError, match="element 1 declares 9 bytes but only 2 remain"):
        impl.decode_bytes(b"\x01\x00\x00\x00a\x09\x00\x00\x00bc", 2)


def test_decode_refuses_leftover_bytes(impl):
    with pytest.raises(ValueError, match="3 bytes after its 1 elements"):
        impl.decode_bytes(b"\x00\x00\x00\x00xyz", 1)


def test_decode_empty(impl):
    assert impl.decode_bytes(b"", 0) == []
    assert impl.encode_bytes([]) == b""


def test_decode_accepts_a_large_count_without_allocating_for_it(impl):
    with pytest.raises(ValueError, match="ends before element 0 of 1000000000000"):
        impl.decode_bytes(b"", 10**12)


def test_encode_refuses_non_bytes(impl):
    with pytest.raises(TypeError):
        impl.encode_bytes(["text"])
