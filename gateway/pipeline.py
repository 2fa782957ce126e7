"""The request path, top to bottom: resolve the model version, bind inputs, run, shape outputs."""

from __future__ import annotations

import time

from gateway.batching.scheduler import DirectScheduler
from gateway.errors import GatewayError
from gateway.runtime.repository import ModelRepository
from gateway.runtime.signature import bind_inputs, select_outputs, to_output_tensor
from gateway.types import InferRequest, InferResponse

__all__ = ["Pipeline"]


class Pipeline:
    def __init__(self, repository: ModelRepository, scheduler: DirectScheduler) -> None:
        self.repository = repository
        self._scheduler = scheduler

    async def predict(self, request: InferRequest) -> InferResponse:
        started = time.perf_counter_ns()
        loaded = self.repository.get(request.model_name, request.model_version)
        try:
            feeds, rows = bind_inputs(loaded, request.inputs)
            output_specs = select_outputs(loaded, request.requested_outputs)
            outcome = await self._scheduler.infer(
                loaded, feeds, [spec.name for spec in output_specs], rows
            )
            outputs = [
                to_output_tensor(spec, array)
                for spec, array in zip(output_specs, outcome.outputs, strict=True)
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
            },
        )
