"""merge -> split and chunk -> join give every request exactly its rows back, in order."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.batching.batch import chunk, join, merge, split

dtypes = st.sampled_from([np.float32, np.float64, np.int64, np.bool_, np.float16, np.uint8])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 9), min_size=1, max_size=8), st.integers(1, 4), dtypes)
def test_merge_then_split_round_trips_ragged_requests(sizes, width, dtype):
    rng = np.random.default_rng(sum(sizes) + width)
    parts = [
        {
            "a": rng.integers(0, 100, (n, width)).astype(dtype),
            "b": rng.integers(0, 100, (n,)).astype(dtype),
        }
        for n in sizes
    ]
    merged = merge(parts, sum(sizes))
    assert merged["a"].shape == (sum(sizes), width)
    assert merged["a"].dtype == np.dtype(dtype)
    back = split([merged["a"], merged["b"]], sizes)
    for part, (a, b) in zip(parts, back, strict=True):
        np.testing.assert_array_equal(a, part["a"])
        np.testing.assert_array_equal(b, part["b"])


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 50), st.integers(1, 16))
def test_chunk_then_join_round_trips_oversize_requests(rows, max_rows):
    x = np.arange(rows * 3, dtype=np.float32).reshape(rows, 3)
    pieces = chunk({"x": x}, rows, max_rows)
    assert all(n <= max_rows for _, n in pieces)
    assert sum(n for _, n in pieces) == rows
    assert all(len(f["x"]) == n for f, n in pieces)
    np.testing.assert_array_equal(join([[f["x"]] for f, _ in pieces])[0], x)


def test_a_single_part_passes_through_without_a_copy():
    x = np.ones((3, 2), np.float32)
    assert merge([{"x": x}], 3)["x"] is x
    assert split([x], [3])[0][0] is x
