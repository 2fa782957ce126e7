"""The request path, top to bottom: resolve the version, bind inputs, schedule, shape outputs."""

from __future__ import annotations

import asyncio
import time

from gateway.batching import MicroBatcher
from gateway.errors import DeadlineExceeded, GatewayError, InvalidRequest
from gateway.runtime.repository import LoadedVersion, ModelRepository
from gateway.runtime.signature import bind_inputs, select_outputs, to_output_tensor
from gateway.settings import QueuePolicy
from gateway.telemetry import GatewayMetrics
from gateway.types import InferRequest, InferResponse, ParameterValue

__all__ = ["Pipeline"]


class Pipeline:
    def __init__(self, repository: ModelRepository, metrics: GatewayMetrics) -> None:
        self.repository = repository
        self._metrics = metrics
        self._batchers: dict[LoadedVersion, MicroBatcher] = {}
        self._closing: set[asyncio.Task[None]] = set()

    async def predict(self, request: InferRequest) -> InferResponse:
        started = time.perf_counter_ns()
        loaded = self.repository.get(request.model_name, request.model_version)
        try:
            feeds, rows = bind_inputs(loaded, request.inputs)
            output_specs = select_outputs(loaded, request.requested_outputs)
            parameters = request.parameters
            priority = _priority(parameters, loaded.config.queue) if parameters else None
            deadline = _deadline(request) if parameters or request.timeout_s is not None else None
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
        return InferResponse(
            model_name=loaded.name,
            model_version=loaded.version_label,
            id=request.id,
            outputs=outputs,
            parameters={
                "queue_us": outcome.queue_ns // 1000,
                "compute_us": outcome.compute_ns // 1000,
                "batch_rows": outcome.batch_rows,
            },
        )

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
