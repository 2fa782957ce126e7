"""The request path, top to bottom: limits, route, then per attempt: resolve the version,
assemble features under its contract (unless the request sends the model's own input), bind
inputs, look rows up in the cache, schedule the rest, shape outputs; then account the cost and
record the prediction event.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass

import numpy as np

from gateway.batching import MicroBatcher
from gateway.cache import ResponseCache, cacheable
from gateway.costs import FREE, Charge, Ledger, charge
from gateway.errors import (
    DeadlineExceeded,
    GatewayError,
    InvalidRequest,
    ModelNotFound,
    ModelNotReady,
    Overloaded,
    RateLimited,
    RuntimeFailure,
)
from gateway.events import EventRecorder, Pending
from gateway.features.assembly import Assembly, assemble_tensors
from gateway.features.contract import Contract
from gateway.routing import ConcurrencyCap, RateLimiter, Route, RouteTable
from gateway.runtime.repository import LoadedVersion, ModelRepository
from gateway.runtime.signature import bind_inputs, select_outputs, to_output_tensor
from gateway.settings import Budget, QueuePolicy, VariantSpec
from gateway.telemetry import GatewayMetrics
from gateway.types import InferRequest, InferResponse, ParameterValue, Tensor

__all__ = ["Pipeline", "Traffic"]

log = logging.getLogger(__name__)

# What a failed attempt may fall back from: the variant could not answer. A bad request would
# fail on every variant, so it does not fall back.
_FALLBACK_ON = (Overloaded, DeadlineExceeded, RuntimeFailure, ModelNotReady, ModelNotFound)
_MAX_REASON = 200
_RUNNING_GRACE_S = 0.002


@dataclass
class Traffic:
    """The control plane the pipeline consults: routes, limits, the cache and the ledger."""

    routes: RouteTable
    limiter: RateLimiter
    ledger: Ledger
    cache: ResponseCache | None = None


@dataclass(slots=True)
class _Served:
    response: InferResponse
    cost: Charge
    cached_rows: int
    contract: Contract | None  # the version's, when the request was assembled


class Pipeline:
    def __init__(
        self,
        repository: ModelRepository,
        metrics: GatewayMetrics,
        traffic: Traffic,
        max_input_bytes: int = 64 * 1024 * 1024,
        events: EventRecorder | None = None,
    ) -> None:
        self.repository = repository
        self.traffic = traffic
        self._metrics = metrics
        self._max_input_bytes = max_input_bytes
        self._events = events
        self._batchers: dict[LoadedVersion, MicroBatcher] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._caps: dict[str, ConcurrencyCap] = {}
        self._shadow_caps: dict[str, ConcurrencyCap] = {}
        self._shadows: set[asyncio.Task[None]] = set()
        # Requests by (route, variant, arm), read at scrape time (no metric lock per request).
        self._routed: dict[tuple[str, str, str], int] = {}
        metrics.counter_function(
            "gateway_routed",
            "Requests on a route by the variant that answered and its arm (primary, canary, "
            "shadow).",
            ["route", "variant", "arm"],
            lambda: list(self._routed.items()),
        )

    async def predict(self, request: InferRequest) -> InferResponse:
        started = time.perf_counter_ns()
        traffic = self.traffic
        params = request.parameters
        tenant = _text(params.get("tenant"))
        if traffic.limiter.enabled:
            try:
                traffic.limiter.take(tenant)
            except RateLimited:
                self._metrics.limited.labels("rate").inc()
                raise
        surface = _text(params.get("surface"))
        degrade = traffic.ledger.check(tenant, surface)
        events = self._events
        if events is not None:
            events.admit()
        route = traffic.routes.get(request.model_name) if not request.model_version else None
        if route is None:
            loaded = self.repository.get(request.model_name, request.model_version)
            served = await self._serve(
                request, loaded, None, _deadline(request), started, loaded.config.deterministic
            )
            variant = f"{loaded.name}@{loaded.version}"
            route_name = request.model_name
        else:
            served, variant = await self._route(request, route, degrade, started)
            route_name = route.name
        response = served.response
        rows = _rows(request)
        traffic.ledger.add(tenant, route_name, variant, surface, rows, served.cached_rows,
                           served.cost)  # fmt: skip
        if events is not None:
            self._record(request, served, started)
        return response

    def describe(self, name: str, version: str = "") -> LoadedVersion:
        """The model version behind ``name`` for metadata: a model, or a route's main variant
        (the model variant of most weight), so OIP clients that read metadata first work on
        routes too."""
        route = self.traffic.routes.get(name) if not version else None
        if route is None:
            return self.repository.get(name, version)
        models = [v for v in route.spec.variants if v.model is not None]
        if not models:
            raise ModelNotFound(f"route '{name}' has only static variants: no model to describe")
        main = max(models, key=lambda v: v.weight)
        return self.repository.get(main.model or "", main.version)

    def route_versions(self, name: str) -> list[LoadedVersion] | None:
        """The loaded model versions a route's variants serve on (None: not a route)."""
        route = self.traffic.routes.get(name)
        if route is None:
            return None
        found: dict[int, LoadedVersion] = {}
        for variant in route.spec.variants:
            if variant.model is None:
                continue
            try:
                loaded = self.repository.get(variant.model, variant.version)
            except GatewayError:
                continue
            found.setdefault(id(loaded), loaded)
        return list(found.values())

    # -- routes ------------------------------------------------------------------------------

    async def _route(
        self, request: InferRequest, route: Route, degrade: Budget | None, started: int
    ) -> tuple[_Served, str]:
        """Serve on the chosen variant, or down the route's fallbacks; returns the variant."""
        spec = route.spec
        cap = None
        if spec.max_concurrency is not None:
            cap = self._cap(self._caps, route.name, spec.max_concurrency, f"route '{route.name}'")
            try:
                cap.__enter__()
            except Overloaded:
                self._metrics.limited.labels("concurrency").inc()
                raise
        try:
            reason = ""
            if degrade is not None and degrade.degrade_to in route.variants:
                chosen = route.variants[degrade.degrade_to]
                reason = f"budget '{degrade.name}' spent: degraded"
            else:
                chosen = route.choose(request.parameters)
            client_deadline = _deadline(request)
            failure: GatewayError | None = None
            for attempt, variant in enumerate(route.chains[chosen.name]):
                try:
                    served = await self._attempt(request, route, variant, client_deadline, started)
                except _FALLBACK_ON as err:
                    self._metrics.fallbacks.labels(
                        route.name, variant.name, err.grpc_status.name
                    ).inc()
                    if failure is None:
                        failure = err
                        reason = f"{variant.name}: {err.grpc_status.name}: {err}"[:_MAX_REASON]
                    if (
                        client_deadline is not None
                        and asyncio.get_running_loop().time() >= client_deadline
                    ):
                        raise DeadlineExceeded(
                            f"route '{route.name}': no variant answered within the request's "
                            f"deadline (first failure: {reason})"
                        ) from None
                    continue
                answered = served.response.parameters
                answered["route"] = route.name
                answered["variant"] = variant.name
                answered["arm"] = variant.arm
                if attempt or reason:
                    answered["fallback"] = variant.name if attempt else ""
                    answered["fallback_reason"] = reason
                self._count(route.name, variant.name, variant.arm)
                if spec.shadows:
                    self._shadow(request, route, served)
                return served, variant.name
            assert failure is not None
            raise failure
        finally:
            if cap is not None:
                cap.__exit__()

    async def _attempt(
        self,
        request: InferRequest,
        route: Route,
        variant: VariantSpec,
        client_deadline: float | None,
        started: int,
        shadow: bool = False,
    ) -> _Served:
        if variant.output is not None:
            return self._static(request, route, variant)
        loaded = self.repository.get(variant.model or "", variant.version)
        deadline = client_deadline
        if route.spec.timeout_ms is not None:
            own = asyncio.get_running_loop().time() + route.spec.timeout_ms / 1000
            deadline = own if deadline is None else min(deadline, own)
        deterministic = variant.deterministic
        if deterministic is None:
            deterministic = loaded.config.deterministic
        return await self._serve(
            request, loaded, variant, deadline, started, deterministic, lowest=shadow
        )

    def _static(self, request: InferRequest, route: Route, variant: VariantSpec) -> _Served:
        """A static variant's outputs for every row: the chain's last resort."""
        assert variant.output is not None
        rows = _rows(request)
        specs = {}
        for candidate in route.spec.variants:
            if candidate.model is not None:
                try:
                    specs = self.repository.get(candidate.model, candidate.version).output_specs
                    break
                except GatewayError:
                    continue
        outputs = []
        for name, values in variant.output.items():
            spec = specs.get(name)
            datatype = spec.datatype if spec is not None else "FP32"
            dtype = np.float64 if datatype == "FP64" else np.float32
            row = np.asarray(values, dtype=dtype)
            outputs.append(Tensor(name, datatype if datatype in ("FP32", "FP64") else "FP32",
                                  np.tile(row, (rows, 1))))  # fmt: skip
        response = InferResponse(
            route.name, "", request.id, outputs, {"queue_us": 0, "compute_us": 0}
        )
        return _Served(response, FREE, 0, None)

    def _shadow(self, request: InferRequest, route: Route, primary: _Served) -> None:
        """Copy the request onto the route's shadow variants, after the primary answered."""
        for shadow in route.spec.shadows:
            if shadow.sample < 1.0 and random.random() >= shadow.sample:
                continue
            cap = self._cap(self._shadow_caps, route.name, route.spec.shadow_max_concurrency, "")
            if cap.limit is not None and cap.in_flight >= cap.limit:
                self._metrics.shadows.labels(route.name, shadow.variant, "skipped").inc()
                continue
            cap.in_flight += 1
            task = asyncio.get_running_loop().create_task(
                self._run_shadow(request, route, route.variants[shadow.variant], cap, primary)
            )
            self._shadows.add(task)
            task.add_done_callback(self._shadows.discard)

    async def _run_shadow(
        self,
        request: InferRequest,
        route: Route,
        variant: VariantSpec,
        cap: ConcurrencyCap,
        primary: _Served,
    ) -> None:
        started = time.perf_counter_ns()
        try:
            served = await self._attempt(request, route, variant, None, started, shadow=True)
        except Exception as err:  # a shadow never fails anything but itself
            self._metrics.shadows.labels(route.name, variant.name, "failed").inc()
            log.debug("shadow %s of route %s failed: %s", variant.name, route.name, err)
            return
        finally:
            cap.in_flight -= 1
        answered = served.response.parameters
        answered.update(route=route.name, variant=variant.name, arm="shadow")
        request_id = primary.response.parameters.get("request_id")
        if request_id is not None:
            answered["request_id"] = request_id
        self._metrics.shadows.labels(route.name, variant.name, "ok").inc()
        self._count(route.name, variant.name, "shadow")
        params = request.parameters
        self.traffic.ledger.add(_text(params.get("tenant")), route.name, variant.name,
                                _text(params.get("surface")), _rows(request),
                                served.cached_rows, served.cost)  # fmt: skip
        if self._events is not None:
            self._record(request, served, started)

    def _cap(
        self, caps: dict[str, ConcurrencyCap], name: str, limit: int | None, what: str
    ) -> ConcurrencyCap:
        cap = caps.get(name)
        if cap is None:
            cap = caps[name] = ConcurrencyCap(limit, what)
        cap.limit = limit  # the route may have changed; requests in flight still count
        return cap

    def _count(self, route: str, variant: str, arm: str) -> None:
        key = (route, variant, arm)
        self._routed[key] = self._routed.get(key, 0) + 1

    # -- one model version -------------------------------------------------------------------

    async def _serve(
        self,
        request: InferRequest,
        loaded: LoadedVersion,
        variant: VariantSpec | None,
        deadline: float | None,
        started: int,
        use_cache: bool,
        lowest: bool = False,
    ) -> _Served:
        """One attempt on one model version; ``lowest``: queue at its lowest priority (a
        shadow copy: primary requests go first)."""
        try:
            inputs = request.inputs
            assembly = None
            if loaded.contract is not None and not _sends_model_inputs(loaded, inputs):
                assembly = self._assemble(loaded, inputs)
                inputs = [Tensor(loaded.runtime.inputs[0].name, "FP32", assembly.matrix)]
            feeds, rows = bind_inputs(loaded, inputs)
            output_specs = select_outputs(loaded, request.requested_outputs)
            given = request.parameters
            if lowest:
                priority: int | None = loaded.config.queue.priority_levels
            else:
                priority = _priority(given, loaded.config.queue) if given else None
            batcher = self._batcher(loaded)

            async def compute(part: dict[str, np.ndarray], count: int):  # type: ignore[no-untyped-def]
                if deadline is None:
                    return await batcher.infer(part, count, priority, deadline)
                # The batcher drops a request still queued at its deadline; this stops the
                # wait for one already running (its result is discarded).
                try:
                    async with asyncio.timeout_at(deadline + _RUNNING_GRACE_S):
                        return await batcher.infer(part, count, priority, deadline)
                except TimeoutError:
                    raise DeadlineExceeded(
                        f"model '{loaded.name}' version {loaded.version} was still running "
                        "the request at its deadline"
                    ) from None

            cache = self.traffic.cache
            if (
                use_cache
                and cache is not None
                and rows
                and (not given or _cache_wanted(given))
                and cacheable(feeds)
            ):
                contract_version = assembly.contract.version if assembly is not None else ""
                who = cache.identity(loaded, contract_version)
                model_outputs, outcome, cached_rows, lookup_ns = await cache.infer(
                    who, feeds, rows, compute
                )
            else:
                outcome = await compute(feeds, rows)
                model_outputs, cached_rows, lookup_ns = outcome.outputs, 0, 0
            position = batcher.output_position
            outputs = [
                to_output_tensor(spec, model_outputs[position[spec.name]]) for spec in output_specs
            ]
        except GatewayError:
            loaded.stats.record_failure(time.perf_counter_ns() - started)
            raise
        total_ns = time.perf_counter_ns() - started
        queue_ns = outcome.queue_ns if outcome is not None else 0
        compute_ns = outcome.compute_ns if outcome is not None else 0
        loaded.stats.record_request(rows, total_ns, queue_ns, 0, compute_ns, 0)
        price = (
            variant.price
            if variant is not None and variant.price is not None
            else loaded.config.price
        )
        cost = charge(price, outcome, lookup_ns)
        parameters: dict[str, ParameterValue] = {
            "queue_us": queue_ns // 1000,
            "compute_us": compute_ns // 1000,
            "batch_rows": outcome.batch_rows if outcome is not None else 0,
            "cached_rows": cached_rows,
            "cost": cost.total,
        }
        if assembly is not None:
            parameters["contract_version"] = assembly.contract.version
            parameters["features_defaulted"] = assembly.total("defaulted")
            parameters["features_oov"] = assembly.total("oov")
            parameters["features_out_of_range"] = assembly.total("out_of_range")
        response = InferResponse(
            model_name=loaded.name,
            model_version=loaded.version_label,
            id=request.id,
            outputs=outputs,
            parameters=parameters,
            assembly=assembly,
        )
        return _Served(
            response, cost, cached_rows, loaded.contract if assembly is not None else None
        )

    def _record(self, request: InferRequest, served: _Served, started: int) -> None:
        events = self._events
        assert events is not None
        parameters = served.response.parameters
        request_id = parameters.get("request_id")
        if request_id is None:
            request_id = parameters["request_id"] = request.id or events.request_id()
        events.record(
            Pending(
                request,
                served.response,
                str(request_id),
                served.contract,
                time.time_ns() // 1000,
                (time.perf_counter_ns() - started) / 1e6,
                _nbytes(request.inputs),
            )
        )

    def _assemble(self, loaded: LoadedVersion, inputs: list[Tensor]) -> Assembly:
        contract = loaded.contract
        assert contract is not None
        assembly = assemble_tensors(contract, inputs, _ContractLabel(loaded), self._max_input_bytes)
        loaded.coverage += assembly.counts
        return assembly

    def _batcher(self, loaded: LoadedVersion) -> MicroBatcher:
        batcher = self._batchers.get(loaded)
        if batcher is None:
            batcher = self._batchers[loaded] = MicroBatcher(
                loaded.name,
                loaded.version_label,
                loaded.runtimes,
                loaded.config.max_batch_size,
                loaded.config.dynamic_batching,
                loaded.config.queue,
                loaded.stats,
                self._metrics,
                loaded.config.execution,
                loaded.config.inline_below_us,
            )
        return batcher

    def retire(self, loaded: LoadedVersion) -> None:
        """A version stopped serving: let its queue drain, then free its instance threads."""
        batcher = self._batchers.pop(loaded, None)
        if batcher is not None:
            task = asyncio.get_running_loop().create_task(batcher.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        # Shadow copies still running are dropped: they answer nobody.
        for task in list(self._shadows):
            task.cancel()
        if self._shadows:
            await asyncio.gather(*self._shadows, return_exceptions=True)
        for loaded in list(self._batchers):
            self.retire(loaded)
        if self._closing:
            await asyncio.gather(*self._closing)


class _ContractLabel:
    """Names the contract and model version in an error; formatted only when one is raised."""

    __slots__ = ("loaded",)

    def __init__(self, loaded: LoadedVersion) -> None:
        self.loaded = loaded

    def __str__(self) -> str:
        version = self.loaded.contract.version if self.loaded.contract else "?"
        return f"contract {version} of model '{self.loaded.name}' version {self.loaded.version}"


def _sends_model_inputs(loaded: LoadedVersion, inputs: list[Tensor]) -> bool:
    """A request naming the model's own input passes through its contract untouched (and is
    then checked against the model's signature, which names anything else it sends)."""
    specs = loaded.input_specs
    features = loaded.contract.index if loaded.contract is not None else {}
    return any(t.name in specs and t.name not in features for t in inputs)


def _cache_wanted(parameters: dict[str, ParameterValue]) -> bool:
    """The ``cache`` parameter: absent or true uses the cache, false bypasses it."""
    value = parameters.get("cache")
    if value is None or value is True or value == "true":
        return True
    if value is False or value == "false":
        return False
    raise InvalidRequest(f"parameter 'cache' must be true or false, got {value!r}")


def _rows(request: InferRequest) -> int:
    for tensor in request.inputs:
        shape = tensor.shape
        if shape:
            return int(shape[0])
    return 1


def _text(value: ParameterValue | None) -> str:
    return "" if value is None else str(value)


def _nbytes(inputs: list[Tensor]) -> int:
    return sum(len(t.raw) if t.raw is not None else t.data.nbytes for t in inputs)


def _priority(parameters: dict[str, ParameterValue], policy: QueuePolicy) -> int | None:
    value = parameters.get("priority")
    if value is None:
        return None
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or not 1 <= value <= policy.priority_levels
    ):
        raise InvalidRequest(
            f"parameter 'priority' must be an integer from 1 (first) to "
            f"{policy.priority_levels}, got {value!r}"
        )
    return value


def _deadline(request: InferRequest) -> float | None:
    """The request's deadline on the loop clock: the gRPC deadline or ``timeout_ms``."""
    timeouts = [] if request.timeout_s is None else [request.timeout_s]
    value = request.parameters.get("timeout_ms")
    if value is not None:
        try:
            timeout_ms = float(value)
        except ValueError:
            timeout_ms = -1.0
        if isinstance(value, bool) or not timeout_ms > 0:
            raise InvalidRequest(f"parameter 'timeout_ms' must be a positive number, got {value!r}")
        timeouts.append(timeout_ms / 1000)
    if not timeouts:
        return None
    timeout_s = min(timeouts)
    if timeout_s <= 0:
        raise DeadlineExceeded("the request's deadline had passed when it arrived")
    return asyncio.get_running_loop().time() + timeout_s
