"""Stage 7, shape: an answered request -> one PredictionEvent (on the writer thread, never on
the request path)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from gateway.api.v1 import events_pb2 as ev
from gateway.types import InferRequest, InferResponse, Tensor

if TYPE_CHECKING:
    from gateway.features.contract import Contract

__all__ = ["Pending", "Redact", "build_event"]

# A keyed hash standing in for a sensitive value (gateway.features.redact).
Redact = Callable[[bytes | str | float, bytes], str]

_NUMERIC_KINDS = ("b", "i", "u", "f")


@dataclass(slots=True)
class Pending:
    """What an event is built from, held from the answer until the writer takes it."""

    request: InferRequest
    response: InferResponse
    request_id: str
    contract: Contract | None  # the version's contract, when the request was assembled
    event_time_us: int
    total_ms: float
    nbytes: int  # request data held, for the memory bound


def build_event(
    pending: Pending, event_id: str, hash_key: bytes, redact: Redact, max_columns: int
) -> ev.PredictionEvent:
    request, response = pending.request, pending.response
    params = request.parameters
    answered = response.parameters
    assembly = response.assembly
    event = ev.PredictionEvent(
        event_id=event_id,
        request_id=pending.request_id,
        event_time_us=pending.event_time_us,
        tenant=_text(params.get("tenant")),
        surface=_text(params.get("surface")),
        route=request.model_name,
        model=response.model_name,
        version=response.model_version,
        arm=_text(params.get("arm")) or "primary",
        contract_version=assembly.contract.version if assembly is not None else "",
        rows=_rows(request, response),
        queue_ms=float(answered.get("queue_us", 0)) / 1000,
        compute_ms=float(answered.get("compute_us", 0)) / 1000,
        total_ms=pending.total_ms,
        entity_key=_text(params.get("entity_key")),
    )
    for key, value in params.items():
        if key.startswith("segment."):
            event.segments[key[len("segment.") :]] = _text(value)
    if assembly is not None and pending.contract is not None:
        _contract_features(event, request, pending.contract, hash_key, redact)
        for feature, counts in zip(pending.contract.features, assembly.counts, strict=True):
            present, defaulted, out_of_range, oov = (int(c) for c in counts)
            event.coverage.add(
                feature=feature.name,
                present=present,
                defaulted=defaulted,
                out_of_range=out_of_range,
                oov=oov,
            )
    else:
        for tensor in request.inputs:
            _input_columns(event, tensor, max_columns)
    for tensor in response.outputs:
        data = tensor.data
        if data.dtype.kind not in _NUMERIC_KINDS:
            continue
        width = math.prod(data.shape[1:]) if data.ndim > 1 else 1
        event.outputs.add(
            name=tensor.name, values=data.astype(np.float64).ravel().tolist(), width=width
        )
    return event


def _contract_features(
    event: ev.PredictionEvent,
    request: InferRequest,
    contract: Contract,
    hash_key: bytes,
    redact: Redact,
) -> None:
    specs = {f.name: f for f in contract.features}
    for tensor in request.inputs:
        spec = specs.get(tensor.name)
        if spec is None:
            continue
        column = event.features[tensor.name]
        if tensor.datatype == "BYTES":
            values = [_decoded(v) for v in tensor.data.ravel().tolist()]
            if spec.sensitive:
                column.hashed = True
                column.strings.extend(redact(v, hash_key) for v in values)
            else:
                column.strings.extend(values)
            continue
        numbers = tensor.data.astype(np.float64).ravel()
        if spec.sensitive:
            column.hashed = True
            column.strings.extend(redact(float(v), hash_key) for v in numbers.tolist())
        else:
            column.numbers.extend(numbers.tolist())


def _input_columns(event: ev.PredictionEvent, tensor: Tensor, max_columns: int) -> None:
    """A request that sent the model's own input: its columns, named ``input[j]``."""
    if tensor.datatype == "BYTES":
        if len(tensor.shape) <= 1:
            event.features[tensor.name].strings.extend(
                _decoded(v) for v in tensor.data.ravel().tolist()
            )
        return
    data = tensor.data
    if data.ndim == 1:
        event.features[tensor.name].numbers.extend(data.astype(np.float64).tolist())
        return
    matrix = data.reshape(data.shape[0], -1)
    if matrix.shape[1] > max_columns:
        return
    columns = matrix.astype(np.float64).T.tolist()
    for j, values in enumerate(columns):
        event.features[f"{tensor.name}[{j}]"].numbers.extend(values)


def _rows(request: InferRequest, response: InferResponse) -> int:
    for tensor in (*response.outputs, *request.inputs):
        shape = tensor.shape
        if shape:
            return int(shape[0])
    return 1


def _decoded(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


def _text(value: object) -> str:
    return "" if value is None else str(value)
