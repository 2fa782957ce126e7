"""The response cache on an injected clock: per-row hits, bounds, collisions and coalescing.

The "model" is a compute function the test holds: it doubles its rows and records how many it
was asked for; a gated one waits on an asyncio.Event, so requests can meet in flight without
any sleep.
"""

from __future__ import annotations

import asyncio
import types
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest
import xxhash

from gateway.cache import ResponseCache, identity
from gateway.cache import response_cache as module
from gateway.errors import DeadlineExceeded, RuntimeFailure
from gateway.settings import CacheSettings
from gateway.telemetry import GatewayMetrics
from gateway.types import Outcome
from tests.fakes import FakeClock

Feeds = Mapping[str, np.ndarray]
WHO = identity("m", "1", "v1", 1)


class Model:
    """Twice its input; ``calls`` are the row counts asked for. Closed gate: waits for it.
    ``fail``: raised by every call (``fail_once``: by the first only)."""

    def __init__(
        self, gated: bool = False, fail: BaseException | None = None, fail_once: bool = False
    ) -> None:
        self.calls: list[int] = []
        self.gate = asyncio.Event()
        if not gated:
            self.gate.set()
        self.started = asyncio.Event()
        self.fail = fail
        self.fail_once = fail_once

    async def __call__(self, feeds: Feeds, rows: int) -> Outcome:
        self.calls.append(rows)
        self.started.set()
        await self.gate.wait()
        if self.fail is not None:
            fail = self.fail
            if self.fail_once:
                self.fail = None
            raise fail
        return Outcome([feeds["x"] * 2], 0, 1000, rows, 1000)


def make_cache(clock: FakeClock | None = None, **settings: Any) -> ResponseCache:
    return ResponseCache(CacheSettings(**settings), GatewayMetrics(), clock=clock or FakeClock())


def rows(*values: float) -> Feeds:
    """One row per value: [[v, v], ...] as FP32."""
    return {"x": np.repeat(np.asarray(values, np.float32)[:, None], 2, axis=1)}


def doubled(*values: float) -> np.ndarray:
    return rows(*values)["x"] * 2


async def test_rows_are_looked_up_one_by_one_and_only_the_missing_ones_computed():
    cache, model = make_cache(), Model()
    first = await cache.infer(WHO, rows(0, 1), 2, model)
    assert first.cached_rows == 0 and model.calls == [2] and first.outcome is not None
    both = await cache.infer(WHO, rows(0, 1, 2, 3), 4, model)
    assert both.cached_rows == 2 and model.calls == [2, 2]  # only the 2 new rows
    np.testing.assert_array_equal(both.outputs[0], doubled(0, 1, 2, 3))
    mixed = await cache.infer(WHO, rows(9, 1, 8, 3), 4, model)  # hits and misses interleaved
    assert mixed.cached_rows == 2 and model.calls == [2, 2, 2]
    np.testing.assert_array_equal(mixed.outputs[0], doubled(9, 1, 8, 3))
    hit = await cache.infer(WHO, rows(2), 1, model)  # the one-row hit: no outcome, no compute
    assert hit.cached_rows == 1 and hit.outcome is None and model.calls == [2, 2, 2]
    np.testing.assert_array_equal(hit.outputs[0], doubled(2))
    stats = cache.stats()
    assert (stats["hits"], stats["misses"]) == (5, 6)
    assert cache.flush() == stats["entries"] == 6 and cache.stats()["entries"] == 0


async def test_another_version_contract_or_load_never_meets_these_entries():
    cache, model = make_cache(), Model()
    await cache.infer(WHO, rows(1), 1, model)
    for who in (
        identity("m", "2", "v1", 1),
        identity("m", "1", "v2", 1),
        identity("m", "1", "v1", 2),
    ):
        assert (await cache.infer(who, rows(1), 1, model)).cached_rows == 0
    assert model.calls == [1, 1, 1, 1]


async def test_a_row_past_its_ttl_is_a_miss_and_goes():
    clock = FakeClock(50.0)
    cache, model = make_cache(clock, ttl_s=10.0), Model()
    assert (await cache.infer(WHO, rows(1), 1, model)).cached_rows == 0
    clock.advance(10.0)  # exactly its age: still served
    assert (await cache.infer(WHO, rows(1), 1, model)).cached_rows == 1
    clock.advance(0.001)
    again = await cache.infer(WHO, rows(1), 1, model)
    assert again.cached_rows == 0 and model.calls == [1, 1]  # expired: computed, stored anew
    np.testing.assert_array_equal(again.outputs[0], doubled(1))
    clock.advance(9.0)  # the new entry's age counts from its own store
    assert (await cache.infer(WHO, rows(1), 1, model)).cached_rows == 1


async def test_the_cache_is_bounded_by_bytes_and_evicts_the_least_recently_used():
    cache, model = make_cache(max_bytes=1024), Model()
    await cache.infer(WHO, rows(0), 1, model)
    entry_bytes = cache.stats()["bytes"]
    fit = 1024 // entry_bytes
    for i in range(1, fit):
        await cache.infer(WHO, rows(i), 1, model)
    assert cache.stats()["evictions"] == 0
    assert (await cache.infer(WHO, rows(0), 1, model)).cached_rows == 1  # 0 is now the newest
    await cache.infer(WHO, rows(100), 1, model)  # one more: room is made
    stats = cache.stats()
    assert stats["evictions"] == 1 and stats["bytes"] <= 1024
    assert (await cache.infer(WHO, rows(0), 1, model)).cached_rows == 1  # kept: recently used
    assert (await cache.infer(WHO, rows(1), 1, model)).cached_rows == 0  # the oldest went


async def test_a_row_bigger_than_the_whole_cache_is_answered_and_not_kept():
    cache, model = make_cache(max_bytes=64), Model()
    answer = await cache.infer(WHO, rows(3), 1, model)
    np.testing.assert_array_equal(answer.outputs[0], doubled(3))
    assert cache.stats()["entries"] == 0 and cache.stats()["evictions"] == 0


@pytest.fixture
def one_hash(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every row hashes to the same key: each lookup meets another row's entry or flight."""
    colliding = types.SimpleNamespace(
        xxh3_128_intdigest=lambda row, seed=0: 7, xxh3_64_intdigest=xxhash.xxh3_64_intdigest
    )
    monkeypatch.setattr(module, "xxhash", colliding)


@pytest.mark.usefixtures("one_hash")
async def test_a_hash_collision_is_a_counted_miss_never_a_wrong_answer():
    cache, model = make_cache(), Model()
    np.testing.assert_array_equal(
        (await cache.infer(WHO, rows(1), 1, model)).outputs[0], doubled(1)
    )
    other = await cache.infer(WHO, rows(2), 1, model)  # meets row 1's entry under its key
    assert other.cached_rows == 0
    np.testing.assert_array_equal(other.outputs[0], doubled(2))
    who = identity("m", "2", "v1", 1)  # the same row bytes, another model version
    theirs = await cache.infer(who, rows(2), 1, model)
    assert theirs.cached_rows == 0
    assert cache.stats()["collisions"] == 2 and model.calls == [1, 1, 1]


@pytest.mark.usefixtures("one_hash")
async def test_a_collision_with_a_row_in_flight_computes_instead_of_sharing():
    cache, model = make_cache(), Model(gated=True)
    owner = asyncio.create_task(cache.infer(WHO, rows(1), 1, model))
    await model.started.wait()
    other = asyncio.create_task(cache.infer(WHO, rows(2), 1, model))
    await asyncio.sleep(0)  # a turn of the loop: the other request is looked up
    model.gate.set()
    np.testing.assert_array_equal((await owner).outputs[0], doubled(1))
    mine = await other
    np.testing.assert_array_equal(mine.outputs[0], doubled(2))
    assert mine.cached_rows == 0 and model.calls == [1, 1] and cache.stats()["coalesced"] == 0


async def test_rows_in_flight_are_computed_once_for_one_row_and_multi_row_requests():
    cache, model = make_cache(), Model(gated=True)
    owner = asyncio.create_task(cache.infer(WHO, rows(1, 2), 2, model))
    await model.started.wait()
    single = asyncio.create_task(cache.infer(WHO, rows(2), 1, model))
    several = asyncio.create_task(cache.infer(WHO, rows(3, 1, 2), 3, model))
    singles = [asyncio.create_task(cache.infer(WHO, rows(1), 1, model)) for _ in range(3)]
    await asyncio.sleep(0)  # a turn of the loop: each of them is looked up and waits
    model.gate.set()
    np.testing.assert_array_equal((await owner).outputs[0], doubled(1, 2))
    one = await single
    np.testing.assert_array_equal(one.outputs[0], doubled(2))
    assert one.cached_rows == 1 and one.outcome is None
    three = await several
    np.testing.assert_array_equal(three.outputs[0], doubled(3, 1, 2))
    assert three.cached_rows == 2 and three.outcome is not None  # row 3 was its own to compute
    for task in singles:
        np.testing.assert_array_equal((await task).outputs[0], doubled(1))
    assert model.calls == [2, 1]  # rows 1 and 2 once, row 3 once
    assert cache.stats()["coalesced"] == 6


async def test_a_row_repeated_in_one_request_is_computed_once():
    cache, model = make_cache(), Model()
    answer = await cache.infer(WHO, rows(9, 4, 9, 9), 4, model)
    np.testing.assert_array_equal(answer.outputs[0], doubled(9, 4, 9, 9))
    assert model.calls == [2] and answer.cached_rows == 2
    assert cache.stats()["coalesced"] == 2


async def test_a_model_failure_of_the_owner_is_the_waiters_failure_too():
    failure = RuntimeFailure("model 'm' version 1 failed on a batch of 1 rows: boom")
    cache, model = make_cache(), Model(gated=True, fail=failure)
    owner = asyncio.create_task(cache.infer(WHO, rows(1), 1, model))
    await model.started.wait()
    waiters = [
        asyncio.create_task(cache.infer(WHO, rows(1), 1, model)),
        asyncio.create_task(cache.infer(WHO, rows(1, 5), 2, model)),
    ]
    await asyncio.sleep(0)
    model.gate.set()
    for task in (owner, *waiters):
        with pytest.raises(RuntimeFailure, match="boom"):
            await task
    # The one-row waiter never ran the model; the two-row one ran only its own row (5).
    assert model.calls == [1, 1]
    assert cache.stats()["entries"] == 0 and cache.stats()["in_flight"] == 0


@pytest.mark.parametrize("leaves", ["cancelled", "its own deadline"])
async def test_when_the_owner_leaves_its_waiters_compute_for_themselves(leaves: str):
    cache, model = make_cache(), Model(gated=True)
    if leaves != "cancelled":
        model.fail, model.fail_once = DeadlineExceeded("the owner's deadline passed"), True
    owner = asyncio.create_task(cache.infer(WHO, rows(2), 1, model))
    await model.started.wait()
    waiter = asyncio.create_task(cache.infer(WHO, rows(2), 1, model))
    both = asyncio.create_task(cache.infer(WHO, rows(2, 2), 2, model))  # the row twice
    await asyncio.sleep(0)
    if leaves == "cancelled":
        owner.cancel()
        with pytest.raises(asyncio.CancelledError):
            await owner
    else:
        model.gate.set()
        with pytest.raises(DeadlineExceeded):
            await owner
    model.gate.set()
    one = await waiter
    np.testing.assert_array_equal(one.outputs[0], doubled(2))
    assert one.cached_rows == 0 and one.outcome is not None  # computed, and charged, by it
    np.testing.assert_array_equal((await both).outputs[0], doubled(2, 2))
    assert model.calls == [1, 1, 2]  # the owner's try, then each waiter's own computation
    assert cache.stats()["in_flight"] == 0
