"""The request path as a unit: the real Pipeline and stages over a real ModelRepository whose
model files are placeholders, served by FakeRuntimes (no ONNX, no sockets, no sleeps).

Every model here takes ``x`` FP32 [-1, 2] and answers ``y`` (``scale`` * x) and ``total`` (the
row sums); each model has its own scale, so an answer shows which model computed it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from gateway.accounting import Ledger
from gateway.cache import ResponseCache
from gateway.errors import (
    BudgetExceeded,
    DeadlineExceeded,
    InvalidRequest,
    Overloaded,
    RateLimited,
    RuntimeFailure,
)
from gateway.pipeline import Pipeline
from gateway.routing import RateLimiter, RouteTable, unit_hash
from gateway.runtime import ModelRepository, SessionOptions
from gateway.settings import CacheSettings, CostSettings, RateLimit, RouteSpec, RuntimeSettings
from gateway.telemetry import GatewayMetrics
from gateway.types import InferRequest, InferResponse, ParameterValue, RequestOptions, Tensor
from tests.fakes import FakeClock, FakeRuntime

T0 = 1_800_000_000.0  # Unix seconds on a whole hour: ledger and budget windows start here
MODEL_CONFIG: dict[str, Any] = {"max_batch_size": 8, "warmup": False, "execution": "thread"}


@dataclass
class Stack:
    """A pipeline and what a test reaches for around it."""

    pipeline: Pipeline
    runtimes: dict[str, FakeRuntime]
    metrics: GatewayMetrics
    ledger: Ledger
    monotonic: FakeClock  # the rate limiter's and the cache's
    unix: FakeClock  # the ledger's
    executor: ThreadPoolExecutor

    async def predict(self, request: InferRequest) -> InferResponse:
        return await self.pipeline.predict(request)

    async def shadows_done(self) -> None:
        """Wait for the shadow copies the router started (it holds their tasks)."""
        await asyncio.gather(*self.pipeline.router._shadows)

    def metric(self, name: str, **labels: str) -> float | None:
        return self.metrics.registry.get_sample_value(name, labels)


Build = Callable[..., Awaitable[Stack]]


@pytest.fixture
async def build(tmp_path: Path) -> AsyncIterator[Build]:
    """Make stacks: ``runtimes`` by model name, each model's config over MODEL_CONFIG, routes
    (specs as dicts), rate limits, budgets; every stack is closed at teardown."""
    stacks: list[Stack] = []

    async def make(
        runtimes: dict[str, FakeRuntime],
        *,
        configs: dict[str, dict[str, Any]] | None = None,
        routes: dict[str, dict[str, Any]] | None = None,
        rate_limits: dict[str, RateLimit] | None = None,
        budgets: tuple[dict[str, Any], ...] = (),
        tracer: Any = None,
    ) -> Stack:
        root = tmp_path / f"models-{len(stacks)}"
        for name in runtimes:
            (root / name / "1").mkdir(parents=True)
            (root / name / "1" / "model.onnx").write_bytes(b"a placeholder: never opened")
            config = {**MODEL_CONFIG, **(configs or {}).get(name, {})}
            (root / name / "config.yaml").write_text(yaml.safe_dump(config))

        def runtime_factory(path: Path, options: SessionOptions) -> FakeRuntime:
            return runtimes[path.parent.parent.name]  # <root>/<model>/<version>/model.onnx

        executor = ThreadPoolExecutor(max_workers=1)
        repository = ModelRepository(root, RuntimeSettings(), executor, runtime_factory)
        await repository.load_all()
        metrics = GatewayMetrics()
        monotonic, unix = FakeClock(1000.0), FakeClock(T0)
        ledger = Ledger(CostSettings(budgets=budgets), metrics, clock=unix)
        pipeline = Pipeline(
            repository,
            metrics,
            routes=RouteTable(
                {n: RouteSpec.model_validate(s) for n, s in (routes or {}).items()}, 4
            ),
            limiter=RateLimiter(rate_limits or {}, 100, clock=monotonic),
            ledger=ledger,
            cache=ResponseCache(CacheSettings(), metrics, clock=monotonic),
            tracer=tracer,
        )
        repository.on_retire = pipeline.retire
        stack = Stack(pipeline, runtimes, metrics, ledger, monotonic, unix, executor)
        stacks.append(stack)
        return stack

    yield make
    for stack in stacks:
        for runtime in stack.runtimes.values():
            runtime.gate.set()  # a run still held would keep its batcher from draining
        await stack.pipeline.close()
        stack.executor.shutdown()


def request(
    model: str,
    *values: float,
    outputs: tuple[str, ...] = (),
    timeout_s: float | None = None,
    labels: dict[str, ParameterValue] | None = None,
    **parameters: ParameterValue,
) -> InferRequest:
    """One row [v, v] per value, for ``model`` (a model or a route); ``labels`` are more
    parameters, for names that are no Python keyword (``segment.geo``)."""
    x = np.repeat(np.asarray(values, np.float32)[:, None], 2, axis=1)
    return InferRequest(
        model,
        id="req-1",
        inputs=[Tensor("x", "FP32", x)],
        requested_outputs=list(outputs),
        options=RequestOptions.parse({**parameters, **(labels or {})}),
        timeout_s=timeout_s,
    )


def output(response: InferResponse, name: str) -> np.ndarray:
    return next(t.data for t in response.outputs if t.name == name)


def scaled(scale: float, *values: float) -> np.ndarray:
    return np.repeat(np.asarray(values, np.float32)[:, None], 2, axis=1) * np.float32(scale)


# -- a model asked for by name ---------------------------------------------------------------


async def test_a_model_request_returns_its_outputs_and_where_its_time_went(build: Build):
    stack = await build({"m": FakeRuntime(scale=2.0)})
    response = await stack.predict(request("m", 1.0, 3.0))
    assert (response.model_name, response.model_version, response.id) == ("m", "1", "req-1")
    assert [t.name for t in response.outputs] == ["y", "total"]  # all, in model order
    np.testing.assert_array_equal(output(response, "y"), scaled(2.0, 1.0, 3.0))
    np.testing.assert_array_equal(output(response, "total"), [[2.0], [6.0]])
    parameters = response.parameters
    assert {"queue_us", "compute_us", "batch_rows", "cached_rows", "cost"} <= set(parameters)
    assert isinstance(parameters["queue_us"], int) and isinstance(parameters["compute_us"], int)
    assert parameters["batch_rows"] == 2 and parameters["cached_rows"] == 0
    assert "route" not in parameters and "fallback" not in parameters  # no route was involved
    (line,) = stack.ledger.lines()
    assert (line.route, line.variant, line.rows, line.requests) == ("m", "m@1", 2, 1)


async def test_requested_outputs_come_back_in_the_order_asked(build: Build):
    stack = await build({"m": FakeRuntime(scale=2.0)})
    response = await stack.predict(request("m", 1.0, outputs=("total", "y")))
    assert [t.name for t in response.outputs] == ["total", "y"]
    only = await stack.predict(request("m", 1.0, outputs=("total",)))
    assert [t.name for t in only.outputs] == ["total"]
    with pytest.raises(InvalidRequest, match="requested output 'nope' is not an output"):
        await stack.predict(request("m", 1.0, outputs=("nope",)))


async def test_a_deadline_already_passed_at_arrival_is_refused_before_any_work(build: Build):
    stack = await build({"m": FakeRuntime()})
    with pytest.raises(DeadlineExceeded, match="had passed before it was served"):
        await stack.predict(request("m", 1.0, timeout_s=0.0))
    assert stack.runtimes["m"].runs == []


async def test_a_deadline_counts_from_arrival_not_from_when_the_loop_takes_it_up(build: Build):
    """A request that waited at the transport longer than its timeout_ms is refused before
    any work, naming the wait; one that waited less keeps what is left of it."""
    stack = await build({"m": FakeRuntime()})
    late = request("m", 1.0, timeout_ms=100)
    late.arrived = time.monotonic() - 0.25  # received 250 ms ago, by the transport's clock
    with pytest.raises(DeadlineExceeded, match=r"it waited (2[5-9]\d|[3-9]\d\d) ms"):
        await stack.predict(late)
    assert stack.runtimes["m"].runs == []
    grpc_late = request("m", 1.0, timeout_s=0.1)
    grpc_late.arrived = time.monotonic() - 0.25
    with pytest.raises(DeadlineExceeded):
        await stack.predict(grpc_late)
    on_time = request("m", 1.0, timeout_ms=60_000)
    on_time.arrived = time.monotonic() - 0.25
    response = await stack.predict(on_time)
    assert output(response, "y").shape == (1, 2)


# -- routes: choice, fallback, static, timeout, cap --------------------------------------------

SPLIT = {
    "variants": [
        {"name": "stable", "model": "a", "weight": 90},
        {"name": "canary", "model": "b", "weight": 10, "arm": "canary"},
    ],
    "match": [{"when": {"segment.geo": "BR"}, "variant": "canary"}],
}


def sticky_key(route: str, canary: bool) -> str:
    """A key the 90/10 split puts on the canary (or on stable)."""
    return next(
        key
        for key in (f"user-{i}" for i in range(10_000))
        if (unit_hash(route, key) >= 0.9) == canary
    )


async def test_the_split_and_match_rules_choose_the_variant_and_the_response_says_which(
    build: Build,
):
    stack = await build(
        {"a": FakeRuntime(scale=2.0), "b": FakeRuntime(scale=3.0)}, routes={"scorer": SPLIT}
    )
    stable_key, canary_key = sticky_key("scorer", False), sticky_key("scorer", True)

    stable = await stack.predict(request("scorer", 1.0, sticky_key=stable_key))
    assert stable.model_name == "a"
    np.testing.assert_array_equal(output(stable, "y"), scaled(2.0, 1.0))
    assert {k: stable.parameters[k] for k in ("route", "variant", "arm")} == {
        "route": "scorer",
        "variant": "stable",
        "arm": "primary",
    }
    assert "fallback" not in stable.parameters

    canary = await stack.predict(request("scorer", 1.0, sticky_key=canary_key))
    assert canary.model_name == "b" and canary.parameters["variant"] == "canary"
    assert canary.parameters["arm"] == "canary"
    np.testing.assert_array_equal(output(canary, "y"), scaled(3.0, 1.0))

    matched = await stack.predict(
        request("scorer", 1.0, sticky_key=stable_key, labels={"segment.geo": "BR"})
    )
    assert matched.parameters["variant"] == "canary"  # the rule comes before the split

    lines = {(ln.route, ln.variant): ln.requests for ln in stack.ledger.lines()}
    assert lines == {("scorer", "stable"): 1, ("scorer", "canary"): 2}
    assert stack.metric("gateway_routed_total", route="scorer", variant="canary", arm="canary") == 2


async def test_a_route_describes_itself_by_its_main_model_variant(build: Build):
    stack = await build({"a": FakeRuntime(), "b": FakeRuntime()}, routes={"scorer": SPLIT})
    assert stack.pipeline.describe("scorer").name == "a"  # the variant of most weight
    versions = stack.pipeline.route_versions("scorer")
    assert versions is not None and sorted(v.name for v in versions) == ["a", "b"]
    assert stack.pipeline.route_versions("a") is None  # a model, not a route


async def test_a_failing_variant_falls_back_down_the_chain_and_says_why(build: Build):
    routes = {
        "r": {
            "variants": [
                {"name": "first", "model": "broken", "weight": 1},
                {"name": "second", "model": "ok"},
            ],
            "fallbacks": ["second"],
        }
    }
    runtimes = {"broken": FakeRuntime(fail=RuntimeError("boom")), "ok": FakeRuntime(scale=5.0)}
    stack = await build(runtimes, routes=routes)
    response = await stack.predict(request("r", 1.0))
    assert response.model_name == "ok" and response.parameters["variant"] == "second"
    np.testing.assert_array_equal(output(response, "y"), scaled(5.0, 1.0))
    assert response.parameters["fallback"] == "second"
    reason = str(response.parameters["fallback_reason"])
    assert reason.startswith("first: INTERNAL: model 'broken' version 1 failed")
    assert "boom" in reason
    failed = {"route": "r", "variant": "first", "reason": "INTERNAL"}
    assert stack.metric("gateway_fallbacks_total", **failed) == 1


async def test_a_static_variant_answers_when_every_model_fails(build: Build):
    routes = {
        "r": {
            "variants": [
                {"name": "first", "model": "broken", "weight": 1},
                {"name": "second", "model": "also-broken"},
                {"name": "default", "output": {"y": [0.25, 0.75]}},
            ],
            "fallbacks": ["second", "default"],
        }
    }
    runtimes = {
        "broken": FakeRuntime(fail=RuntimeError("boom")),
        "also-broken": FakeRuntime(fail=RuntimeError("bang")),
    }
    stack = await build(runtimes, routes=routes)
    response = await stack.predict(request("r", 1.0, 2.0, 3.0))
    assert (response.model_name, response.model_version) == ("r", "")
    (y,) = response.outputs
    assert y.name == "y" and y.datatype == "FP32"
    np.testing.assert_array_equal(y.data, [[0.25, 0.75]] * 3)  # the values, for every row
    assert response.parameters["variant"] == "default"
    assert response.parameters["fallback"] == "default"
    assert str(response.parameters["fallback_reason"]).startswith("first: INTERNAL")  # the first
    assert [len(rt.runs) for rt in runtimes.values()] == [1, 1]
    (line,) = stack.ledger.lines()
    assert line.variant == "default" and line.cost == 0.0  # answered, at no cost


async def test_a_static_answer_carries_every_parameter_a_response_documents(build: Build):
    """README: every response says batch_rows, cached_rows and cost (a static one: zeros)."""
    route = {
        "variants": [
            {"name": "first", "model": "broken", "weight": 1},
            {"name": "default", "output": {"y": [0.5, 0.5]}},
        ],
        "fallbacks": ["default"],
    }
    stack = await build({"broken": FakeRuntime(fail=RuntimeError("boom"))}, routes={"r": route})
    response = await stack.predict(request("r", 1.0))
    assert response.parameters["variant"] == "default"
    documented = ("queue_us", "compute_us", "batch_rows", "cached_rows", "cost")
    assert {k: response.parameters.get(k) for k in documented} == {
        "queue_us": 0,
        "compute_us": 0,
        "batch_rows": 0,
        "cached_rows": 0,
        "cost": 0.0,
    }


async def test_without_a_static_variant_the_first_failure_is_the_answer(build: Build):
    routes = {"r": {"variants": [{"name": "only", "model": "broken", "weight": 1}]}}
    stack = await build({"broken": FakeRuntime(fail=RuntimeError("boom"))}, routes=routes)
    with pytest.raises(RuntimeFailure, match="boom"):
        await stack.predict(request("r", 1.0))


HELD: dict[str, Any] = {
    "variants": [{"name": "main", "model": "held", "weight": 1}],
    "timeout_ms": 20,
}


async def test_an_attempt_past_the_route_timeout_falls_back(build: Build):
    route = {
        **HELD,
        "variants": [*HELD["variants"], {"name": "default", "output": {"y": [0.5, 0.5]}}],
        "fallbacks": ["default"],
    }
    held = FakeRuntime()
    held.gate.clear()  # the model never answers while the test holds it
    stack = await build({"held": held}, routes={"r": route})
    response = await stack.predict(request("r", 1.0))
    assert response.parameters["variant"] == "default"
    reason = str(response.parameters["fallback_reason"])
    assert reason.startswith("main: DEADLINE_EXCEEDED")
    assert "still running the request at its deadline" in reason  # not refused: cut short


async def test_an_attempt_past_the_route_timeout_with_nothing_to_fall_back_on_fails(build: Build):
    held = FakeRuntime()
    held.gate.clear()
    stack = await build({"held": held}, routes={"r": HELD})
    with pytest.raises(DeadlineExceeded, match="still running the request at its deadline"):
        await stack.predict(request("r", 1.0))


async def test_a_deadline_passed_in_the_queue_is_reported_so_however_late_the_loop_wakes(
    build: Build,
):
    """One timer decides at the deadline: queued or running. (A second guard for a running
    request, 2 ms later, used to win whenever the loop woke that late: "still running".)"""
    held = FakeRuntime()
    held.gate.clear()
    stack = await build({"held": held})
    first = asyncio.create_task(stack.predict(request("held", 1.0)))
    assert await asyncio.to_thread(held.started.wait, 10)  # the only instance is busy
    queued = asyncio.create_task(stack.predict(request("held", 2.0, timeout_s=0.02)))
    await asyncio.sleep(0)  # admitted and queued behind the first
    time.sleep(0.1)  # noqa: ASYNC251 - the loop stalls past the deadline, as on a loaded host
    with pytest.raises(DeadlineExceeded, match="in the queue"):
        await queued
    held.gate.set()
    await first
    assert held.runs == [1]  # no compute was spent on the expired request


async def test_a_route_at_max_concurrency_refuses_one_more(build: Build):
    route = {"variants": [{"name": "main", "model": "held", "weight": 1}], "max_concurrency": 1}
    held = FakeRuntime()
    held.gate.clear()
    stack = await build({"held": held}, routes={"capped": route})
    first = asyncio.create_task(stack.predict(request("capped", 1.0)))
    assert await asyncio.to_thread(held.started.wait, 10)  # the first is running
    with pytest.raises(Overloaded, match="route 'capped' has 1 requests in flight"):
        await stack.predict(request("capped", 2.0))
    assert stack.metric("gateway_limited_total", reason="concurrency") == 1
    held.gate.set()
    np.testing.assert_array_equal(output(await first, "y"), scaled(2.0, 1.0))
    await stack.predict(request("capped", 2.0))  # its place is free again
    assert held.runs == [1, 1]


# -- the cache -------------------------------------------------------------------------------


async def test_a_deterministic_model_answers_the_same_request_from_the_cache(build: Build):
    stack = await build({"m": FakeRuntime()}, configs={"m": {"deterministic": True}})
    first = await stack.predict(request("m", 1.0, 2.0))
    second = await stack.predict(request("m", 1.0, 2.0))
    assert first.parameters["cached_rows"] == 0 and second.parameters["cached_rows"] == 2
    np.testing.assert_array_equal(output(second, "y"), output(first, "y"))
    np.testing.assert_array_equal(output(second, "total"), output(first, "total"))
    assert stack.runtimes["m"].runs == [2]
    partly = await stack.predict(request("m", 2.0, 7.0))
    assert partly.parameters["cached_rows"] == 1 and stack.runtimes["m"].runs == [2, 1]
    np.testing.assert_array_equal(output(partly, "y"), scaled(2.0, 2.0, 7.0))


async def test_a_priority_the_queue_lacks_is_refused_even_when_the_cache_answers(build: Build):
    stack = await build({"m": FakeRuntime()}, configs={"m": {"deterministic": True}})
    await stack.predict(request("m", 1.0))
    with pytest.raises(InvalidRequest, match="'priority' must be an integer from 1"):
        await stack.predict(request("m", 1.0, priority=99))  # the row is in the cache
    assert stack.runtimes["m"].runs == [1]


async def test_the_cache_parameter_false_bypasses_the_cache(build: Build):
    stack = await build({"m": FakeRuntime()}, configs={"m": {"deterministic": True}})
    await stack.predict(request("m", 1.0))
    bypassed = await stack.predict(request("m", 1.0, cache=False))
    assert bypassed.parameters["cached_rows"] == 0 and stack.runtimes["m"].runs == [1, 1]


async def test_a_model_not_known_to_be_deterministic_is_never_cached(build: Build):
    deterministic = {"name": "v", "model": "m", "weight": 1, "deterministic": True}
    stack = await build({"m": FakeRuntime()}, routes={"r": {"variants": [deterministic]}})
    for _ in range(2):
        assert (await stack.predict(request("m", 1.0))).parameters["cached_rows"] == 0
    assert stack.runtimes["m"].runs == [1, 1]
    await stack.predict(request("r", 1.0))  # the variant says it is: its answers are cached
    assert (await stack.predict(request("r", 1.0))).parameters["cached_rows"] == 1
    assert stack.runtimes["m"].runs == [1, 1, 1]


# -- limits and budgets ----------------------------------------------------------------------


async def test_a_tenant_over_its_rate_is_refused_before_any_work(build: Build):
    stack = await build({"m": FakeRuntime()}, rate_limits={"t": RateLimit(rate=1.0, burst=1)})
    await stack.predict(request("m", 1.0, tenant="t"))
    with pytest.raises(RateLimited) as info:
        await stack.predict(request("m", 1.0, tenant="t"))
    assert info.value.retry_after_s == pytest.approx(1.0)
    await stack.predict(request("m", 1.0, tenant="other"))  # not limited
    assert stack.runtimes["m"].runs == [1, 1]
    stack.monotonic.advance(1.0)
    await stack.predict(request("m", 1.0, tenant="t"))


async def test_a_spent_reject_budget_refuses_until_its_next_window(build: Build):
    budget = {"name": "b", "tenant": "t", "limit": 1.0, "window_s": 3600, "policy": "reject"}
    configs = {"m": {"price": {"request": 1.0}}}
    stack = await build({"m": FakeRuntime()}, configs=configs, budgets=(budget,))
    first = await stack.predict(request("m", 1.0, tenant="t"))
    assert first.parameters["cost"] == pytest.approx(1.0)
    with pytest.raises(BudgetExceeded, match="budget 'b' is spent"):
        await stack.predict(request("m", 1.0, tenant="t"))
    assert stack.runtimes["m"].runs == [1]
    stack.unix.advance(3600.0)
    await stack.predict(request("m", 1.0, tenant="t"))


DEGRADABLE = {
    "variants": [
        {"name": "full", "model": "big", "weight": 1, "price": {"request": 1.0}},
        {"name": "cheap", "model": "small"},
    ]
}


async def test_a_spent_degrade_budget_serves_its_variant_until_the_next_window(build: Build):
    budget = {"name": "b", "tenant": "t", "limit": 1.0, "policy": "degrade", "degrade_to": "cheap"}
    runtimes = {"big": FakeRuntime(scale=2.0), "small": FakeRuntime(scale=3.0)}
    stack = await build(runtimes, routes={"r": DEGRADABLE}, budgets=(budget,))
    first = await stack.predict(request("r", 1.0, tenant="t"))
    assert first.parameters["variant"] == "full" and "fallback_reason" not in first.parameters
    degraded = await stack.predict(request("r", 1.0, tenant="t"))
    assert degraded.model_name == "small" and degraded.parameters["variant"] == "cheap"
    assert degraded.parameters["fallback"] == ""  # chosen, not fallen back to
    assert degraded.parameters["fallback_reason"] == "budget 'b' spent: degraded"
    np.testing.assert_array_equal(output(degraded, "y"), scaled(3.0, 1.0))
    other = await stack.predict(request("r", 1.0, tenant="u"))
    assert other.parameters["variant"] == "full"  # another tenant's budget is not spent
    stack.unix.advance(3600.0)
    renewed = await stack.predict(request("r", 1.0, tenant="t"))
    assert renewed.parameters["variant"] == "full"


# -- shadows ---------------------------------------------------------------------------------


async def test_shadow_copies_are_in_the_ledger_but_never_on_the_tenants_budget(build: Build):
    """Shadows used to be charged to the tenant's and surface's budgets like the primary: a
    100% shadow made a degrade budget spend (and degrade) far too early."""
    requests = 3
    route = {
        "variants": [
            {"name": "primary", "model": "m", "weight": 1, "price": {"request": 1.0}},
            {"name": "shadow", "model": "s", "price": {"request": 0.5}},
            {"name": "cheap", "model": "c"},
        ],
        "shadows": [{"variant": "shadow", "sample": 1.0}],
    }
    budget = {
        "name": "b",
        "tenant": "t",
        "limit": requests + 0.5,
        "policy": "degrade",
        "degrade_to": "cheap",
    }
    runtimes = {"m": FakeRuntime(scale=2.0), "s": FakeRuntime(scale=3.0), "c": FakeRuntime()}
    stack = await build(runtimes, routes={"r": route}, budgets=(budget,))
    for _ in range(requests):
        response = await stack.predict(request("r", 1.0, tenant="t", surface="web"))
        assert response.parameters["variant"] == "primary"
        np.testing.assert_array_equal(output(response, "y"), scaled(2.0, 1.0))  # not the shadow's
        await stack.shadows_done()
    assert len(runtimes["s"].runs) == requests

    ((_, _, spent),) = stack.ledger.budgets()
    assert spent == pytest.approx(requests * 1.0)  # the primaries' cost alone
    lines = {ln.variant: ln for ln in stack.ledger.lines()}
    shadow = lines["shadow"]
    assert (shadow.tenant, shadow.route, shadow.surface) == ("t", "r", "web")
    assert shadow.requests == requests and shadow.cost == pytest.approx(requests * 0.5)
    assert lines["primary"].cost == pytest.approx(requests * 1.0)
    # Under the limit still: the next request is not degraded.
    response = await stack.predict(request("r", 1.0, tenant="t"))
    assert response.parameters["variant"] == "primary"


async def test_a_shadow_copy_cancelled_before_it_ran_gives_its_place_back(build: Build):
    route = {
        "variants": [
            {"name": "primary", "model": "m", "weight": 1},
            {"name": "copy", "model": "s"},
        ],
        "shadows": [{"variant": "copy"}],
        "shadow_max_concurrency": 1,
    }
    stack = await build({"m": FakeRuntime(), "s": FakeRuntime()}, routes={"r": route})
    await stack.predict(request("r", 1.0))  # its shadow task is made, not yet started
    await stack.pipeline.router.close()  # cancels it before its first step
    assert stack.pipeline.router._shadow_caps["r"].in_flight == 0
    await stack.predict(request("r", 2.0))
    await stack.shadows_done()
    assert stack.runtimes["s"].runs == [1]  # the place was free for the next copy


async def test_a_traced_request_has_a_span_per_stage_and_its_batch_links_every_request(build):
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from gateway.settings import TelemetrySettings
    from gateway.telemetry import Tracing

    exporter = InMemorySpanExporter()
    tracing = Tracing(TelemetrySettings(), exporter)
    runtime = FakeRuntime(scale=3.0)
    batched: dict[str, dict[str, Any]] = {"m": {"dynamic_batching": {}}}
    stack = await build({"m": runtime}, configs=batched, tracer=tracing.tracer)
    runtime.gate.clear()  # the first run waits, so the next two requests queue together
    tracer = tracing.tracer

    async def served(*values: float) -> None:
        with tracer.start_as_current_span("ModelInfer"):
            await stack.predict(request("m", *values))

    first = asyncio.create_task(served(1.0))
    await asyncio.to_thread(runtime.started.wait, 10)
    later = [asyncio.create_task(served(2.0)), asyncio.create_task(served(3.0, 4.0))]
    for _ in range(1000):  # until both wait in the queue behind the running batch
        if stack.metric("gateway_queue_depth", model="m", version="1") == 2:
            break
        await asyncio.sleep(0)
    runtime.gate.set()
    await asyncio.gather(first, *later)
    spans = exporter.get_finished_spans()
    servers = [s for s in spans if s.name == "ModelInfer"]
    assert len(servers) == 3
    for server in servers:
        trace_id = server.context.trace_id
        children = {
            s.name: s
            for s in spans
            if s.parent is not None and s.parent.span_id == server.context.span_id
        }
        assert set(children) == {"route"}
        route = children["route"]
        stages = [
            s for s in spans if s.parent is not None and s.parent.span_id == route.context.span_id
        ]
        # no cache span: m is not deterministic, its answers are never cached
        assert sorted(s.name for s in stages) == ["assemble", "compute", "queue"]
        assert all(s.context.trace_id == trace_id for s in stages)
        queue, compute = (next(s for s in stages if s.name == n) for n in ("queue", "compute"))
        assert queue.end_time is not None and compute.start_time is not None
        assert compute.end_time is not None and route.end_time is not None
        assert queue.end_time <= compute.start_time + 1 and compute.end_time <= route.end_time
        attributes = dict(server.attributes or {})
        assert attributes["gateway.arm"] == "" and attributes["gateway.cached_rows"] == 0
    batches = [s for s in spans if s.name == "batch"]
    assert [dict(b.attributes or {})["gateway.batch_rows"] for b in batches] == [1, 3]
    # one batch for the two queued requests, linked into each one's trace (to its attempt)
    joined = {link.context.trace_id for link in batches[1].links}
    assert joined == {s.context.trace_id for s in servers[1:]}
    assert all(b.parent is None for b in batches)  # a trace of its own
    tracing.shutdown()
