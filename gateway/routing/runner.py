"""Stage 2, carrying out a route: which variant answers a request, and what happens when it can't.

``Router.answer`` is the whole of it for the pipeline: a name that is not a route is one
attempt on that model; a route picks a variant (a spent budget may degrade it, match rules and
weights choose otherwise), tries it and then the route's fallbacks, each attempt under the
route's own timeout within the client's deadline, all under the route's concurrency cap. A
static variant answers without a model; shadow copies run after the primary answered, capped,
at the lowest priority, and are handed to ``on_shadow`` (they answer nobody).

An attempt is carried out by the pipeline (``serve``); this stage knows only which to make.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import numpy as np

from gateway.errors import (
    DeadlineExceeded,
    GatewayError,
    ModelNotFound,
    ModelNotReady,
    Overloaded,
    RuntimeFailure,
)
from gateway.routing.limits import ConcurrencyCap
from gateway.routing.table import Route, RouteTable
from gateway.settings import Budget, DecisionSpec, Price, VariantSpec
from gateway.telemetry import GatewayMetrics
from gateway.types import FREE, Answer, InferRequest, InferResponse, Tensor, TensorSpec

__all__ = ["Attempt", "OnShadow", "OutputSpecs", "Router", "Serve", "VariantHealth"]

log = logging.getLogger(__name__)

# What a failed attempt may fall back from: the variant could not answer. A bad request would
# fail on every variant, so it does not fall back.
_FALLBACK_ON = (Overloaded, DeadlineExceeded, RuntimeFailure, ModelNotReady, ModelNotFound)
_MAX_REASON = 200


@dataclass(slots=True)  # not frozen: made per request (see gateway.types)
class Attempt:
    """One try at answering a request: a model version, by when, at what price."""

    model: str
    version: str = ""  # empty: the newest loaded
    deadline: float | None = None  # on the loop clock
    price: Price | None = None  # the variant's, over the model config's
    deterministic: bool | None = None  # the variant's say on caching, over the model config's
    shadow: bool = False  # a shadow copy: queued at the model's lowest priority
    endpoint: str = ""  # a remote variant's server (host:port): ``model`` is its model there
    contract: str = ""  # a remote variant's local contract, "<model>" or "<model>@<version>"


@dataclass(slots=True)
class VariantHealth:
    """Attempts on one watched variant since its watch began (a rollout's candidate at its
    step): answered, failed (it could not answer: the fallback causes, never a bad request),
    and answered slower than ``slow_s``. Shadow copies count: they are its attempts too."""

    slow_s: float | None = None
    answered: int = 0
    failed: int = 0
    slow: int = 0

    @property
    def attempts(self) -> int:
        return self.answered + self.failed

    def took(self, seconds: float) -> None:
        self.answered += 1
        if self.slow_s is not None and seconds > self.slow_s:
            self.slow += 1


Serve = Callable[[InferRequest, Attempt], Awaitable[Answer]]
# A shadow copy's answer, the primary's, and when the copy started (perf_counter_ns).
OnShadow = Callable[[InferRequest, Answer, Answer, int], None]
# A model version's outputs by name (a static variant answers in their datatypes).
OutputSpecs = Callable[[str, str], Mapping[str, TensorSpec]]


class Router:
    """Routes in force, and the caps, counters and shadow tasks of carrying them out."""

    def __init__(
        self,
        routes: RouteTable,
        metrics: GatewayMetrics,
        serve: Serve,
        on_shadow: OnShadow,
        output_specs: OutputSpecs,
    ) -> None:
        self.routes = routes
        self._metrics = metrics
        self._serve = serve
        self._on_shadow = on_shadow
        self._output_specs = output_specs
        self._caps: dict[str, ConcurrencyCap] = {}
        self._shadow_caps: dict[str, ConcurrencyCap] = {}
        self._shadows: set[asyncio.Task[None]] = set()
        # (route, variant) -> its health, while something watches it (a rollout's step):
        # empty, the request path pays one truth test.
        self._watched: dict[tuple[str, str], VariantHealth] = {}
        # Requests by (route, variant, arm), read at scrape time (no metric lock per request).
        self._routed: dict[tuple[str, str, str], int] = {}
        metrics.counter_function(
            "gateway_routed",
            "Requests on a route by the variant that answered and its arm (primary, canary, "
            "shadow).",
            ["route", "variant", "arm"],
            lambda: list(self._routed.items()),
        )

    # NOTE: a plain function handing back the attempt's (or the route's) coroutine, not a
    # coroutine of its own: one frame less on every request (measured in bench_pipeline).
    def answer(
        self, request: InferRequest, deadline: float | None, degrade: Budget | None
    ) -> Awaitable[Answer]:
        """Answer ``request`` on its route, or on the model it names when it is no route.

        A pinned version talks to the model of that name (a route may share a model's name);
        routes have no versions, so a route with no model of its name is NOT_FOUND, saying so.
        """
        route = self.routes.get(request.model_name)
        if route is not None and request.model_version:
            try:
                self._output_specs(request.model_name, "")
            except ModelNotFound:
                models = sorted({v.local_model for v in route.spec.variants if v.local_model})
                instead = " or ".join(
                    f"model '{m}' with version '{request.model_version}'" for m in models
                )
                raise ModelNotFound(
                    f"'{route.name}' is a route, and routes have no versions: call it without "
                    f"a model version (its variants pick one)"
                    + (f", or call {instead}" if instead else "")
                ) from None
            except GatewayError:
                pass  # a model of that name, not ready: the attempt on it says so
            route = None
        if route is None:
            return self._serve(
                request, Attempt(request.model_name, request.model_version, deadline)
            )
        if route.spec.max_concurrency is None:  # uncapped: no bookkeeping per request
            return self._on_route(request, route, deadline, degrade)
        return self._capped(request, route, deadline, degrade)

    async def _capped(
        self, request: InferRequest, route: Route, deadline: float | None, degrade: Budget | None
    ) -> Answer:
        limit = route.spec.max_concurrency
        with self._cap(self._caps, route.name, limit, f"route '{route.name}'"):
            return await self._on_route(request, route, deadline, degrade)

    async def _on_route(
        self, request: InferRequest, route: Route, deadline: float | None, degrade: Budget | None
    ) -> Answer:
        reason = ""
        if degrade is not None and degrade.degrade_to in route.variants:
            chosen = route.variants[degrade.degrade_to]
            reason = f"budget '{degrade.name}' spent: degraded"
        else:
            chosen = route.choose(request.options)
        failure: GatewayError | None = None
        watched = self._watched
        for tried, variant in enumerate(route.chains[chosen.name]):
            health = watched.get((route.name, variant.name)) if watched else None
            started = time.perf_counter() if health is not None else 0.0
            try:
                if variant.output is not None:
                    answer = self._static(request, route, variant)
                else:
                    answer = await self._serve(
                        request, self._make_attempt(route, variant, deadline)
                    )
            except _FALLBACK_ON as err:
                if health is not None:
                    health.failed += 1
                self._metrics.fallbacks.labels(route.name, variant.name, err.grpc_status.name).inc()
                if failure is None:
                    failure = err
                    reason = f"{variant.name}: {err.grpc_status.name}: {err}"[:_MAX_REASON]
                if deadline is not None and asyncio.get_running_loop().time() >= deadline:
                    raise DeadlineExceeded(
                        f"route '{route.name}': no variant answered within the request's "
                        f"deadline (first failure: {reason})"
                    ) from None
                continue
            if health is not None:
                health.took(time.perf_counter() - started)
            self._label(answer, route, variant, variant.arm)
            if route.spec.decision is not None:
                _decide(answer, route.spec.decision)
            if tried or reason:
                answered = answer.response.parameters
                answered["fallback"] = variant.name if tried else ""
                answered["fallback_reason"] = reason
            for shadow in route.spec.shadows:
                if shadow.sample >= 1.0 or random.random() < shadow.sample:
                    self._shadow(request, route, route.variants[shadow.variant], answer)
            return answer
        assert failure is not None
        raise failure

    def _make_attempt(
        self, route: Route, variant: VariantSpec, deadline: float | None, shadow: bool = False
    ) -> Attempt:
        """An attempt on a model variant, under the route's own timeout within ``deadline``."""
        if route.spec.timeout_ms is not None:
            own = asyncio.get_running_loop().time() + route.spec.timeout_ms / 1000
            deadline = own if deadline is None else min(deadline, own)
        return Attempt(
            model=variant.model or "",
            version=variant.version,
            deadline=deadline,
            price=variant.price,
            deterministic=variant.deterministic,
            shadow=shadow,
            endpoint=variant.endpoint or "",
            contract=variant.contract or "",
        )

    def _static(self, request: InferRequest, route: Route, variant: VariantSpec) -> Answer:
        """A static variant's outputs for every row: the chain's last resort."""
        assert variant.output is not None
        rows = request.rows
        specs: Mapping[str, TensorSpec] = {}
        for candidate in route.spec.variants:
            if candidate.local_model is not None:
                try:
                    specs = self._output_specs(candidate.local_model, candidate.version)
                    break
                except GatewayError:
                    continue
        outputs = []
        for name, values in variant.output.items():
            spec = specs.get(name)
            datatype = spec.datatype if spec is not None and spec.datatype == "FP64" else "FP32"
            row = np.asarray(values, dtype=np.float64 if datatype == "FP64" else np.float32)
            outputs.append(Tensor(name, datatype, np.tile(row, (rows, 1))))
        parameters: dict[str, bool | int | float | str] = {
            "queue_us": 0,
            "compute_us": 0,
            "batch_rows": 0,
            "cached_rows": 0,
            "cost": 0.0,
        }
        return Answer(InferResponse(route.name, "", request.id, outputs, parameters), FREE)

    # -- shadows -----------------------------------------------------------------------------

    def _shadow(
        self, request: InferRequest, route: Route, variant: VariantSpec, primary: Answer
    ) -> None:
        """Copy the request onto a shadow variant, after the primary answered."""
        limit = route.spec.shadow_max_concurrency
        cap = self._cap(self._shadow_caps, route.name, limit, "")
        if not cap.try_acquire():  # past the cap a copy is skipped, never queued
            self._metrics.shadows.labels(route.name, variant.name, "skipped").inc()
            return
        task = asyncio.get_running_loop().create_task(
            self._run_shadow(request, route, variant, primary)
        )
        self._shadows.add(task)
        task.add_done_callback(functools.partial(self._shadow_done, cap))

    def _shadow_done(self, cap: ConcurrencyCap, task: asyncio.Task[None]) -> None:
        """A shadow task ended, however: even one cancelled before its first step."""
        self._shadows.discard(task)
        cap.release()

    async def _run_shadow(
        self,
        request: InferRequest,
        route: Route,
        variant: VariantSpec,
        primary: Answer,
    ) -> None:
        started = time.perf_counter_ns()
        attempt = self._make_attempt(route, variant, None, shadow=True)
        health = self._watched.get((route.name, variant.name))
        try:
            answer = await self._serve(request, attempt)
        except Exception as err:  # a shadow never fails anything but itself
            if health is not None and isinstance(err, _FALLBACK_ON):
                health.failed += 1
            self._metrics.shadows.labels(route.name, variant.name, "failed").inc()
            log.debug("shadow %s of route %s failed: %s", variant.name, route.name, err)
            return
        if health is not None:
            health.took((time.perf_counter_ns() - started) / 1e9)
        self._metrics.shadows.labels(route.name, variant.name, "ok").inc()
        self._label(answer, route, variant, "shadow")
        self._on_shadow(request, answer, primary, started)

    # -- health of watched variants ---------------------------------------------------------

    def watch(self, route: str, variant: str, slow_s: float | None = None) -> VariantHealth:
        """Count ``variant``'s attempts on ``route`` from now on (afresh if it was watched)."""
        health = self._watched[(route, variant)] = VariantHealth(slow_s)
        return health

    def unwatch(self, route: str, variant: str) -> None:
        self._watched.pop((route, variant), None)

    async def close(self) -> None:
        """Drop shadow copies still running: they answer nobody."""
        for task in list(self._shadows):
            task.cancel()
        if self._shadows:
            await asyncio.gather(*self._shadows, return_exceptions=True)

    # -- bookkeeping -------------------------------------------------------------------------

    def _label(self, answer: Answer, route: Route, variant: VariantSpec, arm: str) -> None:
        answer.route, answer.variant = route.name, variant.name
        answered = answer.response.parameters
        answered["route"] = route.name
        answered["variant"] = variant.name
        answered["arm"] = arm
        key = (route.name, variant.name, arm)
        self._routed[key] = self._routed.get(key, 0) + 1

    def _refused(self) -> None:
        self._metrics.limited.labels("concurrency").inc()

    def _cap(
        self, caps: dict[str, ConcurrencyCap], name: str, limit: int | None, what: str
    ) -> ConcurrencyCap:
        cap = caps.get(name)
        if cap is None:
            cap = caps[name] = ConcurrencyCap(limit, what, self._refused)
        cap.limit = limit  # the route may have changed; requests in flight still count
        return cap


def _decide(answer: Answer, decision: DecisionSpec) -> None:
    """Add the route's decision to the response: ``decision.name``, BOOL [rows, 1], the score
    output's first column at or above the threshold (nothing when the score is not in it)."""
    response = answer.response
    score = next((t for t in response.outputs if t.name == decision.output), None)
    if score is None or score.data.dtype.kind not in "iuf" or not score.data.ndim:
        return
    if any(t.name == decision.name for t in response.outputs):
        return  # the model has an output of that name (SetRoutes refuses it; settings warn)
    rows = score.data.shape[0]
    width = score.data.size // rows if rows else 1
    scores = score.data.reshape(rows, width)[:, :1].astype(np.float64)
    # A new list: the response's may be shared with whoever made it.
    response.outputs = [
        *response.outputs,
        Tensor(decision.name, "BOOL", scores >= decision.threshold),
    ]
    response.parameters["decision_threshold"] = decision.threshold
