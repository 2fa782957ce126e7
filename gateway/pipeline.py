"""The request path, top to bottom: each step is a call into one stage.

``predict`` takes a request through the limits (rate, budget, the event log's room), then its
route (gateway.routing), which makes one or more attempts; ``_serve`` carries one out: resolve
the model version, assemble raw features under its contract, bind the inputs to its signature,
look the rows up in the cache and batch the rest, shape the outputs and charge the cost. The
answer is then accounted in the ledger and recorded as a prediction event.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Final

import numpy as np
from numpy.typing import NDArray
from opentelemetry import trace

from gateway.accounting import Ledger, charge
from gateway.batching import BatcherConfig, MicroBatcher
from gateway.cache import CacheResult, ResponseCache, cacheable, identity
from gateway.errors import (
    DeadlineExceeded,
    GatewayError,
    ModelNotFound,
    Overloaded,
    RuntimeFailure,
)
from gateway.events import EventRecorder, Pending
from gateway.routing import Attempt, RateLimiter, RemoteCall, RemoteModels, Router, RouteTable
from gateway.runtime import LoadedVersion, ModelRepository
from gateway.runtime.signature import bind_inputs, select_outputs, to_output_tensor
from gateway.settings import Price
from gateway.telemetry import GatewayMetrics
from gateway.types import (
    Answer,
    Coverage,
    FeatureContract,
    Feeds,
    InferRequest,
    InferResponse,
    ModelInput,
    Outcome,
    ParameterValue,
    Tensor,
    TensorSpec,
)

__all__ = ["Pipeline"]


class Pipeline:
    """The stages of the request path, wired once by the Gateway (or a test)."""

    def __init__(
        self,
        repository: ModelRepository,
        metrics: GatewayMetrics,
        *,
        routes: RouteTable,
        limiter: RateLimiter,
        ledger: Ledger,
        cache: ResponseCache | None = None,
        events: EventRecorder | None = None,
        remote: RemoteModels | None = None,
        max_input_bytes: int = 64 * 1024 * 1024,
        loop_lag: Callable[[], float] = lambda: 0.0,
        tracer: trace.Tracer | None = None,
    ) -> None:
        self.repository = repository
        # Tracing on: a span per stage under the request's server span (None: no span work).
        self._tracer = tracer
        self.remote = remote
        self.limiter = limiter
        self.ledger = ledger
        self.cache = cache
        self._metrics = metrics
        self._events = events
        # What of an assembled matrix events carry (events.model_input; none without events).
        self._model_input = events.settings.model_input if events is not None else "off"
        self._max_input_bytes = max_input_bytes
        self._loop_lag = loop_lag
        self.router = Router(
            routes,
            metrics,
            serve=self._serve,
            on_shadow=self._on_shadow,
            output_specs=self._output_specs,
        )
        self._batchers: dict[LoadedVersion, MicroBatcher] = {}
        self._closing: set[asyncio.Task[None]] = set()

    @property
    def routes(self) -> RouteTable:
        return self.router.routes

    async def predict(self, request: InferRequest) -> InferResponse:
        """Limits -> route -> attempts (``_serve``) -> account -> record."""
        started = time.perf_counter_ns()
        options = request.options
        deadline = _deadline(request)
        if self.limiter.shared is None:
            self.limiter.take(options.tenant)
        else:  # the replicas' buckets, in Redis, waited for no longer than the deadline
            await self.limiter.take_shared(options.tenant, deadline)
        degrade = self.ledger.check(options.tenant, options.surface)
        if self._events is not None:
            self._events.admit()
        tracer = self._tracer
        if tracer is None:
            answer = await self.router.answer(request, deadline, degrade)
        else:
            with tracer.start_as_current_span("route") as span:
                answer = await self.router.answer(request, deadline, degrade)
                span.set_attribute("gateway.route", answer.route)
                span.set_attribute("gateway.variant", answer.variant)
        if deadline is not None and asyncio.get_running_loop().time() > deadline:
            # Answered, but only after the loop came back to it: late is not OK.
            raise DeadlineExceeded(
                "the answer was ready after the request's deadline (the gateway is "
                "saturated); it is dropped"
            )
        self._account(request, answer, budgeted=True)
        if tracer is not None:
            _annotate(trace.get_current_span(), answer)
        if self._events is not None:
            if tracer is None:
                self._record(request, answer, started)
            else:
                with tracer.start_as_current_span("record"):
                    self._record(request, answer, started)
        return answer.response

    async def _serve(self, request: InferRequest, attempt: Attempt) -> Answer:
        """One attempt on one model version: version -> assemble -> bind -> cache/batch ->
        outputs -> charge."""
        if attempt.endpoint:
            return await self._serve_remote(request, attempt)
        started = time.perf_counter_ns()
        loaded = self.repository.get(attempt.model, attempt.version)
        tracer = self._tracer
        try:
            if tracer is None:
                inputs, coverage, model_input = self._assemble(loaded, request.inputs)
                feeds, rows = bind_inputs(loaded, inputs)
                specs = select_outputs(loaded, request.requested_outputs)
                computed = await self._compute(loaded, attempt, request, feeds, rows, coverage)
            else:
                with tracer.start_as_current_span("assemble") as span:
                    span.set_attribute("gateway.model", loaded.name)
                    inputs, coverage, model_input = self._assemble(loaded, request.inputs)
                    feeds, rows = bind_inputs(loaded, inputs)
                    specs = select_outputs(loaded, request.requested_outputs)
                began = time.time_ns()
                computed = await self._compute(loaded, attempt, request, feeds, rows, coverage)
                _stage_spans(tracer, began, time.time_ns(), computed.lookup_ns, computed.outcome)
            outputs = self._shape(loaded, specs, computed.outputs)
        except GatewayError as err:
            loaded.stats.record_failure(time.perf_counter_ns() - started, failure_reason(err))
            raise
        price = loaded.config.price if attempt.price is None else attempt.price
        outcome = computed.outcome
        cost = charge(price, outcome, computed.lookup_ns)
        response = _response(
            request=request,
            loaded=loaded,
            outputs=outputs,
            outcome=outcome,
            cached_rows=computed.cached_rows,
            cost=cost.total,
            coverage=coverage,
        )
        queue_ns, compute_ns = (outcome.queue_ns, outcome.compute_ns) if outcome else (0, 0)
        loaded.stats.record_request(
            rows,
            time.perf_counter_ns() - started,
            queue_ns,
            0,
            compute_ns,
            0,
            computed.cached_rows,
            computed.lookup_ns,
        )
        return Answer(
            response=response,
            cost=cost,
            cached_rows=computed.cached_rows,
            coverage=coverage,
            model_input=model_input,
        )

    async def _serve_remote(self, request: InferRequest, attempt: Attempt) -> Answer:
        """One attempt on a remote variant: assemble (under the contract it names, if any) ->
        cache/call -> outputs -> charge (the calls' time at the price per compute-second)."""
        if self.remote is None:
            raise RuntimeFailure(f"remote {attempt.endpoint}: this gateway calls no endpoints")
        inputs, coverage, model_input = request.inputs, None, None
        if attempt.contract:
            model, _, version = attempt.contract.partition("@")
            loaded = self.repository.get(model, version)
            inputs, coverage, model_input = self._assemble(loaded, inputs)
        call = RemoteCall(self.remote, attempt, request.id)
        layout = call.layout()
        rows = request.rows
        feeds = {t.name: t.data for t in inputs} if layout is not None else {}
        cache = self.cache
        if (
            cache is None
            or layout is None  # its outputs not seen yet: nothing to name cached rows by
            or not attempt.deterministic
            # "The newest" there may change under cached rows without a word: pinned only.
            or not attempt.version
            or not request.options.cache
            or not _batched(feeds, rows)
            or not cacheable(feeds)
        ):
            outputs = (await call.infer(inputs, request.requested_outputs)).outputs
            cached_rows, lookup_ns = 0, 0
        else:
            contract_version = coverage.contract_version if coverage is not None else ""
            # Named apart from every local model (no local name holds a NUL), by the remote's
            # outputs and by the inputs' names, types and row shapes (sent as they came, they
            # are not bound to a signature here): rows of another signature never meet.
            sent = (f"{t.name}:{t.datatype}:{t.data.shape[1:]}" for t in inputs)
            who = identity(
                "\x00".join((*call.identity(layout), *sent)), attempt.version, contract_version, 0
            )
            types = {t.name: t.datatype for t in inputs}
            result = await cache.infer(who, feeds, rows, call.rows(layout, types), attempt.deadline)
            computed = [
                Tensor(name, datatype, values)
                for (name, datatype), values in zip(layout, result.outputs, strict=True)
            ]
            outputs = call.select(computed, request.requested_outputs)
            cached_rows, lookup_ns = result.cached_rows, result.lookup_ns
        cost = charge(attempt.price or _FREE_PRICE, call.outcome, lookup_ns)
        parameters = _parameters(None, cached_rows, cost.total, coverage)
        parameters["remote_us"] = call.took_ns // 1000
        response = InferResponse(attempt.model, call.version, request.id, outputs, parameters)
        return Answer(
            response=response,
            cost=cost,
            cached_rows=cached_rows,
            coverage=coverage,
            model_input=model_input,
        )

    # -- the stages of an attempt ------------------------------------------------------------

    def _assemble(
        self, loaded: LoadedVersion, inputs: list[Tensor]
    ) -> tuple[list[Tensor], Coverage | None, ModelInput | None]:
        """Raw features -> the model's input under the version's contract (unless the
        request sends the model's own input, which passes through untouched), with what
        its event carries of it: the coverage, and the matrix by column name."""
        contract = loaded.contract
        if contract is None or _sends_model_inputs(loaded, inputs):
            return inputs, None, None
        assembled = contract.assemble(inputs, _ContractLabel(loaded), self._max_input_bytes)
        loaded.coverage += assembled.coverage.counts
        matrix = assembled.matrix
        model_input = Tensor(loaded.runtime.inputs[0].name, "FP32", matrix)
        return [model_input], assembled.coverage, self._served(contract, matrix)

    def _served(self, contract: FeatureContract, matrix: NDArray[np.float32]) -> ModelInput | None:
        """The part of an assembled matrix its event carries (events.model_input)."""
        if self._model_input == "all":
            return ModelInput(contract.columns, matrix)
        if self._model_input == "off":
            return None
        names, positions = contract.public_columns
        if len(names) == matrix.shape[1]:  # no sensitive feature: the matrix as it is
            return ModelInput(names, matrix)
        return ModelInput(names, matrix[:, positions]) if names else None

    # NOTE: a plain function handing back the cache's (or the batcher's) coroutine, not a
    # coroutine of its own: one frame less on every request (measured in bench_pipeline).
    def _compute(
        self,
        loaded: LoadedVersion,
        attempt: Attempt,
        request: InferRequest,
        feeds: Feeds,
        rows: int,
        coverage: Coverage | None,
    ) -> Awaitable[CacheResult]:
        """The rows' outputs, from the cache where it may answer, else from the batcher."""
        batcher = self._batcher(loaded)
        # A shadow copy queues behind every primary request. The level is checked here, before
        # the cache, so that a bad priority is refused whether or not the cache answers.
        priority = batcher.level(request.options.priority, lowest=attempt.shadow)
        deadline = attempt.deadline

        def compute(part: Feeds, count: int) -> Awaitable[Outcome]:
            # The batcher answers DEADLINE_EXCEEDED at the deadline, queued or running.
            return batcher.infer(part, count, priority, deadline)

        cache = self.cache
        deterministic = attempt.deterministic
        if deterministic is None:
            deterministic = loaded.config.deterministic
        if (
            cache is None
            or not deterministic
            or not rows
            or not request.options.cache
            or not cacheable(feeds)
        ):
            return _uncached(compute(feeds, rows))
        contract_version = coverage.contract_version if coverage is not None else ""
        who = cache.identity(
            loaded.name, loaded.version_label, contract_version, loaded.generation, loaded.digest
        )
        return cache.infer(who, feeds, rows, compute, deadline)

    def _shape(
        self,
        loaded: LoadedVersion,
        specs: list[TensorSpec],
        computed: Sequence[NDArray[np.generic]],
    ) -> list[Tensor]:
        """The outputs asked for, in the order asked, as response tensors."""
        position = self._batcher(loaded).output_position
        return [to_output_tensor(spec, computed[position[spec.name]]) for spec in specs]

    def _batcher(self, loaded: LoadedVersion) -> MicroBatcher:
        batcher = self._batchers.get(loaded)
        if batcher is None:
            config = BatcherConfig.of(loaded.name, loaded.version_label, loaded.config)
            batcher = self._batchers[loaded] = MicroBatcher(
                config, loaded.runtimes, loaded.stats, self._metrics, self._loop_lag, self._tracer
            )
        return batcher

    def _output_specs(self, model: str, version: str) -> Mapping[str, TensorSpec]:
        return self.repository.get(model, version).output_specs

    # -- after the answer --------------------------------------------------------------------

    def _account(self, request: InferRequest, answer: Answer, *, budgeted: bool) -> None:
        options, response = request.options, answer.response
        self.ledger.add(
            tenant=options.tenant,
            # A route's runner names the route and variant; a model asked for names itself.
            route=answer.route or request.model_name,
            variant=answer.variant or f"{response.model_name}@{response.model_version}",
            surface=options.surface,
            rows=request.rows,
            cached_rows=answer.cached_rows,
            cost=answer.cost,
            budgeted=budgeted,
        )

    def _record(self, request: InferRequest, answer: Answer, started: int) -> None:
        events = self._events
        assert events is not None
        parameters = answer.response.parameters
        request_id = parameters.get("request_id")
        if request_id is None:
            request_id = parameters["request_id"] = request.id or events.request_id()
        model_input = answer.model_input
        held = request.nbytes or sum(t.nbytes for t in request.inputs)
        if model_input is not None:  # held until written, as the request's bytes are
            held += model_input.matrix.nbytes
        events.record(
            Pending(
                request=request,
                response=answer.response,
                request_id=str(request_id),
                coverage=answer.coverage,
                event_time_us=time.time_ns() // 1000,
                total_ms=(time.perf_counter_ns() - started) / 1e6,
                nbytes=held,
                model_input=model_input,
            )
        )

    def _on_shadow(
        self, request: InferRequest, shadow: Answer, primary: Answer, started: int
    ) -> None:
        """A shadow copy answered: in the ledger apart from any budget (the tenant did not
        ask for it), and in events under the primary's request id."""
        request_id = primary.response.parameters.get("request_id")
        if request_id is not None:
            shadow.response.parameters["request_id"] = request_id
        self._account(request, shadow, budgeted=False)
        if self._events is not None:
            self._record(request, shadow, started)

    # -- model versions come and go ----------------------------------------------------------

    def describe(self, name: str, version: str = "") -> LoadedVersion:
        """The model version behind ``name`` for metadata: a model, or a route's main variant
        (the model variant of most weight), so OIP clients that read metadata first work on
        routes too."""
        route = self.routes.get(name) if not version else None
        if route is None:
            return self.repository.get(name, version)
        models = [v for v in route.spec.variants if v.local_model is not None]
        if not models:
            raise ModelNotFound(
                f"route '{name}' has no local model variant: no model to describe (its remote "
                "variants' servers describe theirs)"
            )
        main = max(models, key=lambda v: v.weight)
        return self.repository.get(main.local_model or "", main.version)

    def route_versions(self, name: str) -> list[LoadedVersion] | None:
        """The loaded model versions a route's variants serve on (None: not a route)."""
        route = self.routes.get(name)
        if route is None:
            return None
        found: dict[int, LoadedVersion] = {}
        for variant in route.spec.variants:
            if variant.local_model is None:
                continue
            try:
                loaded = self.repository.get(variant.local_model, variant.version)
            except GatewayError:
                continue
            found.setdefault(id(loaded), loaded)
        return list(found.values())

    def retire(self, loaded: LoadedVersion) -> None:
        """A version stopped serving: let its queue drain, then free its instance threads."""
        batcher = self._batchers.pop(loaded, None)
        if batcher is not None:
            task = asyncio.get_running_loop().create_task(batcher.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        await self.router.close()
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
    contract = loaded.contract
    return any(t.name in specs and not (contract and contract.takes(t.name)) for t in inputs)


def _response(
    *,
    request: InferRequest,
    loaded: LoadedVersion,
    outputs: list[Tensor],
    outcome: Outcome | None,
    cached_rows: int,
    cost: float,
    coverage: Coverage | None,
) -> InferResponse:
    parameters = _parameters(outcome, cached_rows, cost, coverage)
    return InferResponse(loaded.name, loaded.version_label, request.id, outputs, parameters)


def _parameters(
    outcome: Outcome | None, cached_rows: int, cost: float, coverage: Coverage | None
) -> dict[str, ParameterValue]:
    """What a response reports of how it was made (its timings, its cache hits, its cost and
    its features' coverage)."""
    parameters: dict[str, ParameterValue] = {
        "queue_us": outcome.queue_ns // 1000 if outcome else 0,
        "compute_us": outcome.compute_ns // 1000 if outcome else 0,
        "batch_rows": outcome.batch_rows if outcome else 0,
        "cached_rows": cached_rows,
        "cost": cost,
    }
    if coverage is not None:
        parameters["contract_version"] = coverage.contract_version
        # One sum over the features, columns in OUTCOMES order.
        _present, defaulted, out_of_range, oov = coverage.counts.sum(axis=0).tolist()
        parameters["features_defaulted"] = defaulted
        parameters["features_oov"] = oov
        parameters["features_out_of_range"] = out_of_range
    return parameters


_FREE_PRICE: Final = Price()


def _batched(feeds: Feeds, rows: int) -> bool:
    """Every input has ``rows`` rows (what the cache splits a request by)."""
    return bool(rows) and all(a.ndim and a.shape[0] == rows for a in feeds.values())


async def _uncached(computing: Awaitable[Outcome]) -> CacheResult:
    outcome = await computing
    return CacheResult(outcome.outputs, outcome, 0, 0)


def _stage_spans(
    tracer: trace.Tracer, began: int, ended: int, lookup_ns: int, outcome: Outcome | None
) -> None:
    """The cache lookup, the wait in the queue and the model run of an attempt, as spans laid
    out from their measured durations (they ran in the batcher, not in this task)."""
    at = began
    if lookup_ns:
        tracer.start_span("cache", start_time=at).end(end_time=at + lookup_ns)
        at += lookup_ns
    if outcome is None:
        return
    queue_end = min(at + outcome.queue_ns, ended)
    tracer.start_span("queue", start_time=at).end(end_time=queue_end)
    compute = tracer.start_span(
        "compute",
        start_time=queue_end,
        attributes={"gateway.batch_rows": outcome.batch_rows},
    )
    compute.end(end_time=min(queue_end + outcome.compute_ns, ended))


def _annotate(span: trace.Span, answer: Answer) -> None:
    """What the request's server span says of its answer: arm, cached rows, cost."""
    parameters = answer.response.parameters
    span.set_attribute("gateway.arm", str(parameters.get("arm", "")))
    span.set_attribute("gateway.cached_rows", answer.cached_rows)
    span.set_attribute("gateway.cost", answer.cost.total)


def failure_reason(err: GatewayError) -> str:
    """Triton's reason for a failed request (nv_inference_request_failure): the scheduler
    turned it away (its queue full, its deadline), the runtime failed, or anything else."""
    if isinstance(err, Overloaded | DeadlineExceeded):
        return "REJECTED"
    if isinstance(err, RuntimeFailure):
        return "BACKEND"
    return "OTHER"


def _deadline(request: InferRequest) -> float | None:
    """The request's deadline on the loop clock: the gRPC deadline or ``timeout_ms``, counted
    from the request's arrival at the transport, not from when the loop got to it."""
    left = request.time_left(time.monotonic())
    if left is None:
        return None
    if left <= 0:
        waited = ""
        if request.arrived is not None:
            waited_ms = (time.monotonic() - request.arrived) * 1000
            waited = f" (it waited {waited_ms:.0f} ms to be taken up)"
        raise DeadlineExceeded(f"the request's deadline had passed before it was served{waited}")
    return asyncio.get_running_loop().time() + left
