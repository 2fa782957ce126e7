"""The shared tier's row format: what one replica stores, another reads back exactly; any
other model's, row's or broken bytes are a miss."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping

import numpy as np

from gateway.cache import ResponseCache, identity
from gateway.cache.response_cache import _pack, _unpack
from gateway.settings import CacheSettings
from gateway.telemetry import GatewayMetrics
from gateway.types import Outcome

MODEL, ROW = b"0123456789abcdef", b"\x00\x01row-bytes"


def test_a_row_round_trips_with_its_dtypes_and_shapes():
    outputs: tuple[np.ndarray, ...] = (
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
    # Arrays no model output is: no items, objects, records, more than one row.
    odds: list[np.ndarray] = [
        np.zeros((1, 2), "S0"),
        np.zeros((1,), [("a", "i4")]),
        np.zeros((2, 1), np.float32),
        np.array(["x"], "U1"),
    ]
    for odd in odds:
        assert _unpack(_pack(MODEL, ROW, (odd,)), MODEL, ROW) is None


class GatedRows:
    """A shared tier whose lookups wait for ``gate`` (so a request can be cancelled in them),
    holding what was put; the cache's logic is under test here, not Redis."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.looking = asyncio.Event()
        self.stored: dict[bytes, bytes] = {}

    def key(self, model: bytes, row_hash: int) -> bytes:
        return model + row_hash.to_bytes(16, "little")

    async def get(self, keys: list[bytes], deadline: float | None = None) -> list[bytes | None]:
        self.looking.set()
        await self.gate.wait()
        return [self.stored.get(k) for k in keys]

    async def put(self, items: list[tuple[bytes, bytes]], ttl_s: float) -> None:
        self.stored.update(items)


def shared_cache(rows: GatedRows) -> ResponseCache:
    return ResponseCache(CacheSettings(), GatewayMetrics(), shared=rows)  # type: ignore[arg-type]


WHO = identity("m", "1", "v1", 1, digest="d1")


async def compute(feeds: Mapping[str, np.ndarray], rows: int) -> Outcome:
    return Outcome([feeds["x"] * 2], 0, 1000, rows, 1000)


async def test_a_request_cancelled_in_the_shared_lookup_leaves_no_row_in_flight():
    rows = GatedRows()
    cache = shared_cache(rows)
    feeds = {"x": np.array([[1.0]], np.float32)}
    first = asyncio.ensure_future(cache.infer(WHO, feeds, 1, compute))
    await rows.looking.wait()
    first.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await first
    assert cache.stats()["in_flight"] == 0
    rows.gate.set()  # the next request computes the row itself, without waiting on the gone one
    result = await asyncio.wait_for(cache.infer(WHO, feeds, 1, compute), 5)
    np.testing.assert_array_equal(result.outputs[0], [[2.0]])


async def test_a_row_twice_in_a_request_found_in_the_shared_tier_is_answered_twice():
    rows = GatedRows()
    rows.gate.set()
    feeds = {"x": np.array([[3.0]], np.float32)}
    writer = shared_cache(rows)
    await writer.infer(WHO, feeds, 1, compute)
    await writer.close()  # its background write landed
    # Another replica (another load of the same file: another generation) reads it.
    other = identity("m", "1", "v1", 7, digest="d1")
    reader = shared_cache(rows)
    twice = {"x": np.array([[3.0], [3.0]], np.float32)}
    result = await reader.infer(other, twice, 2, compute)
    assert result.cached_rows == 2 and result.outcome is None
    np.testing.assert_array_equal(result.outputs[0], [[6.0], [6.0]])
    # Another file (digest) never meets it.
    changed = identity("m", "1", "v1", 7, digest="d2")
    assert (await shared_cache(rows).infer(changed, feeds, 1, compute)).cached_rows == 0
