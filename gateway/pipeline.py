"""The request path, top to bottom: resolve the version, assemble features under the version's
contract (unless the request sends the model's own input), bind inputs, schedule, shape outputs,
record the prediction event.
"""

from __future__ import annotations

import asyncio
import time

from gateway.batching import MicroBatcher
from gateway.errors import DeadlineExceeded, GatewayError, InvalidRequest
from gateway.events import EventRecorder, Pending
from gateway.features.assembly import Assembly, assemble_tensors
from gateway.runtime.repository import LoadedVersion, ModelRepository
from gateway.runtime.signature import bind_inputs, select_outputs, to_output_tensor
from gateway.settings import QueuePolicy
from gateway.telemetry import GatewayMetrics
from gateway.types import InferRequest, InferResponse, ParameterValue, Tensor

__all__ = ["Pipeline"]


class Pipeline:
    def __init__(
        self,
        repository: ModelRepository,
        metrics: GatewayMetrics,
        max_input_bytes: int = 64 * 1024 * 1024,
        events: EventRecorder | None = None,
    ) -> None:
        self.repository = repository
        self._metrics = metrics
        self._max_input_bytes = max_input_bytes
        self._events = events
        self._batchers: dict[LoadedVersion, MicroBatcher] = {}
        self._closing: set[asyncio.Task[None]] = set()

    async def predict(self, request: InferRequest) -> InferResponse:
        started = time.perf_counter_ns()
        loaded = self.repository.get(request.model_name, request.model_version)
        events = self._events
        if events is not None:
            events.admit()
        try:
            inputs = request.inputs
            assembly = None
            if loaded.contract is not None and not _sends_model_inputs(loaded, inputs):
                assembly = self._assemble(loaded, inputs)
                inputs = [Tensor(loaded.runtime.inputs[0].name, "FP32", assembly.matrix)]
            feeds, rows = bind_inputs(loaded, inputs)
            output_specs = select_outputs(loaded, request.requested_outputs)
            given = request.parameters
            priority = _priority(given, loaded.config.queue) if given else None
            deadline = _deadline(request) if given or request.timeout_s is not None else None
            batcher = self._batcher(loaded)
            outcome = await batcher.infer(feeds, rows, priority, deadline)
            position = batcher.output_position
            outputs = [
                to_output_tensor(spec, outcome.outputs[position[spec.name]])
                for spec in output_specs
            ]
        except GatewayError:
            loaded.stats.record_failure(time.perf_counter_ns() - started)
            raise
        total_ns = time.perf_counter_ns() - started
        loaded.stats.record_request(rows, total_ns, outcome.queue_ns, 0, outcome.compute_ns, 0)
        parameters: dict[str, ParameterValue] = {
            "queue_us": outcome.queue_ns // 1000,
            "compute_us": outcome.compute_ns // 1000,
            "batch_rows": outcome.batch_rows,
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
        if events is not None:
            request_id = request.id or events.request_id()
            parameters["request_id"] = request_id
            events.record(
                Pending(
                    request,
                    response,
                    request_id,
                    loaded.contract if assembly is not None else None,
                    time.time_ns() // 1000,
                    total_ns / 1e6,
                    _nbytes(request.inputs),
                )
            )
        return response

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
