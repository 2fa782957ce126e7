"""Stage 7, shape: an answered request -> one PredictionEvent, encoded in the writer's batches,
never on the request path."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from gateway._hotloops import NO_EXTENSIONS
from gateway.api.v1 import events_pb2 as ev
from gateway.types import Coverage, InferRequest, InferResponse, Tensor

__all__ = [
    "USING_EXTENSION",
    "Columns",
    "Pending",
    "Redact",
    "build_event",
    "encode_event",
    "event_columns",
    "fallback_text",
]

# A keyed hash standing in for a sensitive value (gateway.features.redact).
Redact = Callable[[bytes | str | float, bytes], str]

_NUMERIC_KINDS = ("b", "i", "u", "f")
_F64 = np.dtype("<f8")  # the wire's float64: little-endian whatever the host


@dataclass(slots=True)
class Pending:
    """What an event is built from, held from the answer until the writer takes it."""

    request: InferRequest
    response: InferResponse
    request_id: str
    coverage: Coverage | None  # how its raw features were assembled (None: model inputs sent)
    event_time_us: int
    total_ms: float
    nbytes: int  # request data held, for the memory bound


def encode_event_py(
    pending: Pending, event_id: str, hash_key: bytes, redact: Redact, max_columns: int
) -> bytes:
    """The event's wire bytes: the reference the native encoder is tested against."""
    encoded: bytes = build_event(
        pending, event_id, hash_key, redact, max_columns
    ).SerializeToString()
    return encoded


@dataclass(slots=True)
class Columns:
    """What an event carries of an answer, decided once for both encoders: numeric features as
    one float64 matrix (little-endian, row-major), string features (sensitive values already
    hashed), and the numeric outputs (``name, float64 bytes, width``)."""

    rows: int
    numeric_names: list[str]
    numbers: bytes
    strings: list[tuple[str, list[str], bool]]  # name, values, hashed
    outputs: list[tuple[str, bytes, int]]


def event_columns(pending: Pending, hash_key: bytes, redact: Redact, max_columns: int) -> Columns:
    request, response = pending.request, pending.response
    rows = _rows(request, response)
    names: list[str] = []
    blocks: list[NDArray[np.float64]] = []
    strings: list[tuple[str, list[str], bool]] = []
    if pending.coverage is not None:
        _contract_features(request, pending.coverage, hash_key, redact, names, blocks, strings)
    else:
        for tensor in request.inputs:
            _input_columns(tensor, rows, max_columns, names, blocks, strings)
    numbers = b""
    if blocks:
        matrix = blocks[0] if len(blocks) == 1 else np.hstack(blocks)
        numbers = matrix.astype(_F64, copy=False).tobytes()
    outputs = []
    for tensor in response.outputs:
        data = tensor.data
        if data.dtype.kind not in _NUMERIC_KINDS or not data.ndim or data.shape[0] != rows:
            continue
        outputs.append((tensor.name, data.astype(_F64).tobytes(), math.prod(data.shape[1:])))
    return Columns(rows, names, numbers, strings, outputs)


def build_event(
    pending: Pending, event_id: str, hash_key: bytes, redact: Redact, max_columns: int
) -> ev.PredictionEvent:
    request, response = pending.request, pending.response
    options = request.options
    answered = response.parameters
    coverage = pending.coverage
    columns = event_columns(pending, hash_key, redact, max_columns)
    event = ev.PredictionEvent(
        event_id=event_id,
        request_id=pending.request_id,
        event_time_us=pending.event_time_us,
        tenant=options.tenant,
        surface=options.surface,
        route=_text(answered.get("route")) or request.model_name,
        model=response.model_name,
        version=response.model_version,
        arm=_text(answered.get("arm")) or "primary",
        contract_version=coverage.contract_version if coverage is not None else "",
        rows=columns.rows,
        queue_ms=float(answered.get("queue_us", 0)) / 1000,
        compute_ms=float(answered.get("compute_us", 0)) / 1000,
        total_ms=pending.total_ms,
        cost=float(answered.get("cost", 0.0)),
        cached_rows=int(answered.get("cached_rows", 0)),
        fallback=fallback_text(answered),
        entity_key=options.entity_key,
    )
    for key, value in options.segments.items():
        event.segments[key] = value
    if coverage is not None:
        for feature, counts in zip(coverage.features, coverage.counts, strict=True):
            present, defaulted, out_of_range, oov = (int(c) for c in counts)
            event.coverage.add(
                feature=feature,
                present=present,
                defaulted=defaulted,
                out_of_range=out_of_range,
                oov=oov,
            )
    for name, values, hashed in columns.strings:
        event.features.strings.add(name=name, values=values, hashed=hashed)
    if columns.numeric_names:
        event.features.numeric_names.extend(columns.numeric_names)
        event.features.numbers = columns.numbers
    for name, data, width in columns.outputs:
        event.outputs.add(name=name, values=data, width=width)
    return event


def _contract_features(
    request: InferRequest,
    coverage: Coverage,
    hash_key: bytes,
    redact: Redact,
    names: list[str],
    blocks: list[NDArray[np.float64]],
    strings: list[tuple[str, list[str], bool]],
) -> None:
    features, sensitive = coverage.features, coverage.sensitive
    numeric: list[NDArray[np.float64]] = []
    for tensor in request.inputs:
        if tensor.name not in features:
            continue
        hidden = tensor.name in sensitive
        if tensor.datatype == "BYTES":
            values = [_decoded(v) for v in tensor.data.ravel().tolist()]
            if hidden:
                values = [redact(v, hash_key) for v in values]
            strings.append((tensor.name, values, hidden))
            continue
        column = tensor.data.astype(np.float64).ravel()
        if hidden:
            strings.append((tensor.name, [redact(v, hash_key) for v in column.tolist()], True))
            continue
        names.append(tensor.name)
        numeric.append(column)
    if numeric:
        blocks.append(np.column_stack(numeric))


def _input_columns(
    tensor: Tensor,
    rows: int,
    max_columns: int,
    names: list[str],
    blocks: list[NDArray[np.float64]],
    strings: list[tuple[str, list[str], bool]],
) -> None:
    """A request that sent the model's own input: its columns, named ``input[j]``."""
    shape = tensor.shape
    if not shape or shape[0] != rows:
        return
    if tensor.datatype == "BYTES":
        if len(shape) == 1:
            strings.append((tensor.name, [_decoded(v) for v in tensor.data.tolist()], False))
        return
    matrix = tensor.data.reshape(rows, -1)
    if matrix.shape[1] > max_columns:
        return
    if len(shape) == 1:
        names.append(tensor.name)
    else:
        names.extend(_column_names(tensor.name, matrix.shape[1]))
    blocks.append(matrix.astype(np.float64))


@functools.lru_cache(maxsize=256)
def _column_names(name: str, width: int) -> tuple[str, ...]:
    return tuple(f"{name}[{j}]" for j in range(width))


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


def fallback_text(answered: Mapping[str, object]) -> str:
    """``variant: why`` when a fallback answered (or a budget degraded the request)."""
    reason = answered.get("fallback_reason")
    if not reason:
        return ""
    return f"{answered.get('fallback') or answered.get('variant', '')}: {reason}"


def _text(value: object) -> str:
    return "" if value is None else str(value)


# Last in the module: the native encoder imports event_columns and fallback_text from here.
# The writer encodes every prediction: natively (native/_events_c.pyx, the same event written
# straight to the wire format, 2-3x faster) unless extensions are off or not built.
if TYPE_CHECKING or NO_EXTENSIONS:
    encode_event, USING_EXTENSION = encode_event_py, False
else:
    try:
        from gateway._events_c import encode_event

        USING_EXTENSION = True
    except ImportError:  # pragma: no cover - exercised when the build is absent
        encode_event, USING_EXTENSION = encode_event_py, False
