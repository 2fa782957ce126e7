"""The shared tier's row format: what one replica stores, another reads back exactly; any
other model's, row's or broken bytes are a miss."""

from __future__ import annotations

import numpy as np

from gateway.cache.response_cache import _pack, _unpack

MODEL, ROW = b"0123456789abcdef", b"\x00\x01row-bytes"


def test_a_row_round_trips_with_its_dtypes_and_shapes():
    outputs = (
        np.array([[0.25]], np.float32),
        np.arange(6, dtype=np.int64).reshape(1, 2, 3),
        np.array([True]),
    )
    back = _unpack(_pack(MODEL, ROW, outputs), MODEL, ROW)
    assert back is not None and len(back) == 3
    for got, want in zip(back, outputs, strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)
        assert got.flags.writeable  # a copy, not a view of the stored bytes


def test_another_model_another_row_or_broken_bytes_are_misses():
    blob = _pack(MODEL, ROW, (np.array([[1.0]], np.float32),))
    assert _unpack(blob, b"fedcba9876543210", ROW) is None
    assert _unpack(blob, MODEL, b"another row") is None
    for cut in (3, len(blob) // 2, len(blob) - 1):
        assert _unpack(blob[:cut], MODEL, ROW) is None
    assert _unpack(b"", MODEL, ROW) is None
