"""Routes, limits, costs and the cache as units: the split, stickiness, rules, history, buckets."""

from __future__ import annotations

import asyncio
import math
import time

import numpy as np
import pytest

from gateway.types import Outcome
from gateway.cache import ResponseCache, identity
from gateway.accounting import Ledger, charge
from gateway.errors import BudgetExceeded, InvalidRequest, ModelNotFound, RateLimited
from gateway.routing import RateLimiter, RouteTable, unit_hash
from gateway.settings import (
    CacheSettings,
    CostSettings,
    Price,
    RateLimit,
    RouteSpec,
    SettingsError,
    load_settings,
)
from gateway.telemetry import GatewayMetrics
from gateway.types import RequestOptions


def options(parameters):
    return RequestOptions.parse(parameters)


def spec(**extra: object) -> RouteSpec:
    return RouteSpec.model_validate(
        {
            "variants": [
                {"name": "stable", "model": "fraud", "version": "1", "weight": 90},
                {"name": "canary", "model": "fraud", "version": "2", "weight": 10, "arm": "canary"},
                {"name": "default", "output": {"probability": [0.5]}},
            ],
            **extra,
        }
    )


def test_the_split_over_10000_sticky_keys_is_within_binomial_tolerance_and_sticky():
    route = RouteTable({"scorer": spec()}, history=4).get("scorer")
    assert route is not None
    n, p = 10_000, 0.10
    arms = [route.choose(options({"sticky_key": f"user-{i}"})).name for i in range(n)]
    canary = arms.count("canary")
    sigma = math.sqrt(n * p * (1 - p))  # 30 rows
    assert abs(canary - n * p) < 4 * sigma, canary
    assert set(arms) == {"stable", "canary"}  # a static variant has no weight: never drawn
    # The same key, asked again (and by a fresh table, as after a restart): the same arm.
    again = RouteTable({"scorer": spec()}, history=4).get("scorer")
    assert again is not None
    assert [again.choose(options({"sticky_key": f"user-{i}"})).name for i in range(n)] == arms
    # Integer keys are keys too; the hash is xxh3 of route and key, stable across runs.
    assert (
        route.choose(options({"sticky_key": 42})).name
        == route.choose(options({"sticky_key": "42"})).name
    )
    assert unit_hash("scorer", "user-1") == unit_hash("scorer", "user-1")
    assert 0.0 <= unit_hash("scorer", "user-1") < 1.0


def test_without_a_key_the_draw_is_random_with_the_weights():
    route = RouteTable({"scorer": spec()}, history=4).get("scorer")
    assert route is not None
    n = 10_000
    canary = sum(route.choose(options({})).name == "canary" for _ in range(n))
    assert abs(canary - 1000) < 4 * math.sqrt(n * 0.09)


def test_match_rules_come_first_and_compare_text():
    routes = RouteTable(
        {"scorer": spec(match=[{"when": {"segment.geo": "BR", "tier": "1"}, "variant": "canary"}])},
        history=4,
    )
    route = routes.get("scorer")
    assert route is not None
    assert (
        route.choose(options({"segment.geo": "BR", "tier": 1, "sticky_key": "k"})).name == "canary"
    )
    keys = [f"k{i}" for i in range(200)]
    others = {
        route.choose(options({"segment.geo": "US", "tier": 1, "sticky_key": k})).name for k in keys
    }
    assert others == {"stable", "canary"}  # no match: the weighted split
    with pytest.raises(InvalidRequest, match="sticky_key"):
        route.choose(options({"sticky_key": 1.5}))


def test_promote_then_rollback_restores_the_previous_spec():
    routes = RouteTable({"scorer": spec(match=[{"when": {"a": "b"}, "variant": "stable"}])}, 4)
    before = routes.get("scorer")
    assert before is not None
    promoted = routes.promote("scorer", "canary")
    assert {v.name: v.weight for v in promoted.spec.variants}["canary"] == 1.0
    assert all(promoted.choose(options({"sticky_key": f"k{i}", "a": "b"})).name == "canary"
               for i in range(100))  # fmt: skip
    assert promoted.revision > before.revision
    with pytest.raises(InvalidRequest, match="static"):
        routes.promote("scorer", "default")
    with pytest.raises(ModelNotFound, match="no variant 'nope'"):
        routes.promote("scorer", "nope")
    restored = routes.rollback("scorer")
    assert restored is not None and restored.spec == before.spec
    with pytest.raises(ModelNotFound, match="no earlier spec"):
        routes.rollback("scorer")  # the starting table has nothing before it


def test_replace_keeps_history_and_a_new_route_rolls_back_to_nothing():
    routes = RouteTable({}, history=2)
    assert routes.replace({"scorer": spec()}) == ["scorer"]
    assert routes.replace({"scorer": spec()}) == []  # unchanged: no history entry
    assert routes.rollback("scorer") is None  # before it, there was no route
    assert routes.get("scorer") is None


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"fallbacks": ["nope"]}, "fallbacks: no variant named 'nope'"),
        ({"shadows": [{"variant": "default"}]}, "static; shadow a model"),
        ({"match": [{"when": {"x": "y"}, "variant": "ghost"}]}, "match: no variant"),
    ],
)
def test_route_specs_name_what_is_wrong(extra: dict, message: str):
    with pytest.raises(ValueError, match=message):
        spec(**extra)


def test_settings_errors_name_the_route_key():
    with pytest.raises(SettingsError, match=r"routing\.routes\.scorer\.variants\.0\.weight"):
        load_settings(
            environ={},
            overrides={"routing": {"routes": {"scorer": {"variants": [
                {"name": "a", "model": "m", "weight": -1}]}}}},
        )  # fmt: skip
    with pytest.raises(SettingsError, match="exactly one of tenant, surface"):
        load_settings(environ={}, overrides={"costs": {"budgets": [
            {"name": "b", "limit": 1, "policy": "alert"}]}})  # fmt: skip


def test_a_token_bucket_per_tenant():
    limiter = RateLimiter({"a": RateLimit(rate=1.0, burst=3), "*": RateLimit(rate=100, burst=1)}, 8)
    for _ in range(3):
        limiter.take("a")
    with pytest.raises(RateLimited) as info:
        limiter.take("a")
    assert 0 < info.value.retry_after_s <= 1.0
    limiter.take("b")  # another tenant: its own bucket (from "*")
    limiter.take("c")
    time.sleep(info.value.retry_after_s + 0.01)
    limiter.take("a")  # refilled as promised


def test_cost_is_the_rows_share_of_the_batch_plus_the_request_price():
    price = Price(compute_second=2.0, request=0.01)
    outcome = Outcome([], 0, compute_ns=4_000_000, batch_rows=8, share_ns=1_000_000)
    cost = charge(price, outcome, lookup_ns=0)
    assert cost.total == pytest.approx(0.001 * 2.0 + 0.01)
    hit = charge(price, None, lookup_ns=5_000)
    assert hit.request == 0 and hit.total == pytest.approx(5e-6 * 2.0)


def test_the_ledger_groups_by_window_and_key_and_budgets_apply_their_policy():
    budgets = [
        {"name": "r", "tenant": "t1", "limit": 1.0, "policy": "reject"},
        {"name": "d", "surface": "web", "limit": 1.0, "policy": "degrade", "degrade_to": "cheap"},
    ]
    ledger = Ledger(CostSettings(max_keys=2, budgets=budgets), GatewayMetrics())
    one = charge(Price(request=0.6), Outcome([], 0, 0, 1, 0), 0)
    ledger.add(tenant="t1", route="r", variant="v", surface="app", rows=2, cached_rows=0, cost=one)
    assert ledger.check("t1", "app") is None
    ledger.add(tenant="t1", route="r", variant="v", surface="app", rows=2, cached_rows=1, cost=one)
    with pytest.raises(BudgetExceeded, match="budget 'r' is spent"):
        ledger.check("t1", "app")
    ledger.add(tenant="t2", route="r", variant="v", surface="web", rows=1, cached_rows=0, cost=one)
    ledger.add(
        tenant="t3", route="r", variant="v", surface="web", rows=1, cached_rows=0, cost=one
    )  # a third key past max_keys: into (other)
    degrade = ledger.check("t2", "web")
    assert degrade is not None and degrade.name == "d"
    lines = {(ln.tenant, ln.surface): ln for ln in ledger.lines()}
    assert lines[("t1", "app")].requests == 2 and lines[("t1", "app")].cached_rows == 1
    assert lines[("(other)", "(other)")].requests == 1
    assert sum(ln.cost for ln in lines.values()) == pytest.approx(4 * 0.6)
    assert ledger.lines(since=time.time() + 3600) == []


def test_cache_partial_hits_coalescing_and_identity():
    async def scenario() -> None:
        cache = ResponseCache(CacheSettings(max_bytes=1 << 20), GatewayMetrics())
        computed: list[int] = []

        async def double(feeds, rows):  # the "model": twice the input
            computed.append(rows)
            await asyncio.sleep(0.01)
            x = feeds["x"]
            return Outcome([x * 2], 0, 1000, rows, 1000)

        who = identity("m", "1", "v1", 1)
        x = np.arange(8, dtype=np.float32).reshape(4, 2)
        first = await cache.infer(who, {"x": x[:2]}, 2, double)
        assert first.cached_rows == 0 and computed == [2]
        both = await cache.infer(who, {"x": x}, 4, double)
        assert both.cached_rows == 2 and computed == [2, 2]  # only the 2 new rows
        np.testing.assert_array_equal(both.outputs[0], x * 2)
        # Another version (or contract, or load) never meets these entries.
        other = await cache.infer(identity("m", "2", "v1", 1), {"x": x[:1]}, 1, double)
        assert other.cached_rows == 0
        # Identical rows in flight at once: one computation; in one request too.
        computed.clear()
        row = np.full((1, 2), 7, np.float32)
        rows = await asyncio.gather(*(cache.infer(who, {"x": row}, 1, double) for _ in range(5)))
        assert computed == [1] and sum(r.cached_rows for r in rows) == 4
        dup = await cache.infer(who, {"x": np.full((3, 2), 9, np.float32)}, 3, double)
        assert computed == [1, 1] and dup.cached_rows == 2
        np.testing.assert_array_equal(dup.outputs[0], np.full((3, 2), 18, np.float32))
        stats = cache.stats()
        assert stats["coalesced"] == 6 and stats["hits"] == 2
        assert cache.flush() == stats["entries"] and cache.stats()["entries"] == 0

    asyncio.run(scenario())


def test_the_cache_is_bounded_by_bytes_and_counts_evictions():
    async def scenario() -> None:
        cache = ResponseCache(CacheSettings(max_bytes=4096), GatewayMetrics())

        async def same(feeds, rows):
            return Outcome([feeds["x"].copy()], 0, 0, rows, 0)

        who = identity("m", "1", "", 1)
        for i in range(100):
            await cache.infer(who, {"x": np.full((1, 16), i, np.float64)}, 1, same)
        stats = cache.stats()
        assert stats["bytes"] <= 4096 and stats["evictions"] > 0
        assert stats["entries"] + stats["evictions"] == 100

    asyncio.run(scenario())


def test_a_cached_row_past_its_ttl_is_a_miss():
    async def scenario() -> None:
        cache = ResponseCache(CacheSettings(ttl_s=0.05), GatewayMetrics())
        calls: list[int] = []

        async def same(feeds, rows):
            calls.append(rows)
            return Outcome([feeds["x"].copy()], 0, 0, rows, 0)

        who = identity("m", "1", "", 1)
        row = {"x": np.ones((1, 4), np.float32)}
        assert (await cache.infer(who, row, 1, same)).cached_rows == 0
        assert (await cache.infer(who, row, 1, same)).cached_rows == 1
        await asyncio.sleep(0.1)
        assert (await cache.infer(who, row, 1, same)).cached_rows == 0  # expired: computed
        assert calls == [1, 1]

    asyncio.run(scenario())


def test_rows_waiting_on_a_request_that_left_are_computed_by_the_waiters():
    async def scenario() -> None:
        cache = ResponseCache(CacheSettings(), GatewayMetrics())
        started = asyncio.Event()
        calls: list[int] = []

        async def slow(feeds, rows):
            calls.append(rows)
            started.set()
            await asyncio.sleep(0.05)
            return Outcome([feeds["x"] * 3], 0, 0, rows, 0)

        who = identity("m", "1", "", 1)
        row = {"x": np.full((1, 2), 2, np.float32)}
        owner = asyncio.create_task(cache.infer(who, row, 1, slow))
        await started.wait()
        waiter = asyncio.create_task(cache.infer(who, row, 1, slow))
        two = {"x": np.full((2, 2), 2, np.float32)}  # the same row twice: waits on it too
        both = asyncio.create_task(cache.infer(who, two, 2, slow))
        await asyncio.sleep(0)
        owner.cancel()  # the client left: its row is not computed for it
        one = await waiter
        np.testing.assert_array_equal(one.outputs[0], np.full((1, 2), 6))
        np.testing.assert_array_equal((await both).outputs[0], np.full((2, 2), 6))
        assert calls[0] == 1 and len(calls) >= 2  # computed again, by those who waited

    asyncio.run(scenario())
