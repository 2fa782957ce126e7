"""Stage 7, shape: an answered request -> one PredictionEvent, encoded in the writer's batches,
never on the request path.

What an event says is decided here, once: ``EventHeader`` (who answered, how long it took,
what it cost, its segments and feature coverage) and ``event_columns`` (its features, what
each numeric one was sent as, the model input a contract assembled, and its outputs). Two
encoders only write them: ``build_event`` (protobuf, the reference) and the
native encoder (native/_events_c.pyx); gateway.events._encoder picks one.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from gateway.api.v1 import events_pb2 as ev
from gateway.types import Coverage, InferRequest, InferResponse, ModelInput, Tensor

__all__ = [
    "Columns",
    "EventHeader",
    "Pending",
    "Redact",
    "build_event",
    "encode_event_py",
    "event_columns",
    "event_rows",
    "fallback_text",
    "output_columns",
    "served_input",
]

# A keyed hash standing in for a sensitive value (gateway.features.redact).
Redact = Callable[[bytes | str | float, bytes], str]

_NUMERIC_KINDS = ("b", "i", "u", "f")
_F64 = np.dtype("<f8")  # the wire's float64: little-endian whatever the host
_F32 = np.dtype("<f4")  # and its float32, the model input's


@dataclass(slots=True)
class Pending:
    """What an event is built from, held from the answer until the writer takes it."""

    request: InferRequest
    response: InferResponse
    request_id: str
    coverage: Coverage | None  # how its raw features were assembled (None: model inputs sent)
    event_time_us: int
    total_ms: float
    nbytes: int  # request data held (and the model input), for the memory bound
    model_input: ModelInput | None = None  # what the contract assembled (None: inputs sent)


def encode_event_py(
    pending: Pending, event_id: str, hash_key: bytes, redact: Redact, max_columns: int
) -> bytes:
    """The event's wire bytes: the reference the native encoder is tested against."""
    encoded: bytes = build_event(
        pending, event_id, hash_key, redact, max_columns
    ).SerializeToString()
    return encoded


@dataclass(slots=True, init=False)
class EventHeader:
    """What an event says of its answer besides its columns, decided once: made from a Pending
    by its constructor, then only written, by both encoders. The identity (tenant to
    contract_version) repeats across a version's events: the native encoder caches its
    encoding.

    (Set from the Pending in ``__init__``, not passed as 18 keywords: that call alone took
    about 1 us per event, a fifth of the native encoder's time.)
    """

    request_id: str
    event_time_us: int
    tenant: str
    surface: str
    route: str  # what the client called
    model: str  # and what answered it
    version: str
    arm: str
    contract_version: str  # "" unless raw features were assembled
    queue_ms: float
    compute_ms: float
    total_ms: float
    cost: float
    cached_rows: int
    fallback: str  # "variant: why", or ""
    entity_key: str
    segments: Mapping[str, str]
    # Coverage rows: the contract's features, and each one's counts in OUTCOMES order.
    coverage_features: Sequence[str]
    coverage_counts: list[list[int]]

    def __init__(self, pending: Pending) -> None:
        request, response = pending.request, pending.response
        options = request.options
        answered = response.parameters
        coverage = pending.coverage
        self.request_id = pending.request_id
        self.event_time_us = pending.event_time_us
        self.tenant = options.tenant
        self.surface = options.surface
        self.route = _text(answered.get("route")) or request.model_name
        self.model = response.model_name
        self.version = response.model_version
        self.arm = _text(answered.get("arm")) or "primary"
        self.queue_ms = float(answered.get("queue_us", 0)) / 1000
        self.compute_ms = float(answered.get("compute_us", 0)) / 1000
        self.total_ms = pending.total_ms
        self.cost = float(answered.get("cost", 0.0))
        self.cached_rows = int(answered.get("cached_rows", 0))
        self.fallback = fallback_text(answered)
        self.entity_key = options.entity_key
        self.segments = options.segments
        if coverage is None:
            self.contract_version = ""
            self.coverage_features, self.coverage_counts = (), []
        else:
            self.contract_version = coverage.contract_version
            self.coverage_features = coverage.features
            self.coverage_counts = coverage.counts.tolist()


@dataclass(slots=True)
class Columns:
    """What an event carries of an answer, decided once for both encoders: numeric features as
    one float64 matrix (little-endian, row-major) with the dtype kind each was sent as, string
    features (sensitive values already hashed), the numeric outputs (``name, float64 bytes,
    width``) and the model input a contract assembled (``columns, float32 bytes``)."""

    rows: int
    numeric_names: list[str]
    numbers: bytes
    strings: list[tuple[str, list[str], bool]]  # name, values, hashed
    outputs: list[tuple[str, bytes, int]]
    numeric_kinds: str = ""  # one numpy dtype kind per numeric column: b, i, u or f
    model_input: tuple[Sequence[str], bytes] | None = None


def event_columns(pending: Pending, hash_key: bytes, redact: Redact, max_columns: int) -> Columns:
    request, response = pending.request, pending.response
    rows = event_rows(request, response)
    names: list[str] = []
    kinds: list[str] = []
    blocks: list[NDArray[np.float64]] = []
    strings: list[tuple[str, list[str], bool]] = []
    if pending.coverage is not None:
        _contract_features(
            request, pending.coverage, hash_key, redact, names, kinds, blocks, strings
        )
    else:
        for tensor in request.inputs:
            _input_columns(tensor, rows, max_columns, names, kinds, blocks, strings)
    numbers = b""
    if len(blocks) == 1:
        numbers = blocks[0].tobytes()
    elif blocks:
        numbers = np.hstack(blocks).astype(_F64, copy=False).tobytes()
    return Columns(
        rows,
        names,
        numbers,
        strings,
        output_columns(response, rows),
        "".join(kinds),
        served_input(pending.model_input, max_columns),
    )


def served_input(
    model_input: ModelInput | None, max_columns: int
) -> tuple[Sequence[str], bytes] | None:
    """The model input an event carries (``columns, float32 bytes``): none unless a contract
    assembled it, and none wider than ``max_columns`` (the bound of a pass-through input)."""
    if model_input is None or len(model_input.columns) > max_columns:
        return None
    return model_input.columns, np.ascontiguousarray(model_input.matrix, _F32).tobytes()


def output_columns(response: InferResponse, rows: int) -> list[tuple[str, bytes, int]]:
    """The numeric outputs of one value row per request row: ``name, float64 bytes, width``."""
    outputs = []
    for tensor in response.outputs:
        data = tensor.data
        if data.dtype.kind not in _NUMERIC_KINDS or not data.ndim or data.shape[0] != rows:
            continue
        outputs.append((tensor.name, data.astype(_F64).tobytes(), math.prod(data.shape[1:])))
    return outputs


def build_event(
    pending: Pending, event_id: str, hash_key: bytes, redact: Redact, max_columns: int
) -> ev.PredictionEvent:
    header = EventHeader(pending)
    columns = event_columns(pending, hash_key, redact, max_columns)
    event = ev.PredictionEvent(
        event_id=event_id,
        request_id=header.request_id,
        event_time_us=header.event_time_us,
        tenant=header.tenant,
        surface=header.surface,
        route=header.route,
        model=header.model,
        version=header.version,
        arm=header.arm,
        contract_version=header.contract_version,
        rows=columns.rows,
        cached_rows=header.cached_rows,
        fallback=header.fallback,
        queue_ms=header.queue_ms,
        compute_ms=header.compute_ms,
        total_ms=header.total_ms,
        cost=header.cost,
        entity_key=header.entity_key,
    )
    if header.segments:  # not as a constructor argument: that costs 1 us even when empty
        event.segments.update(header.segments)
    rows = zip(header.coverage_features, header.coverage_counts, strict=True)
    for feature, (present, defaulted, out_of_range, oov) in rows:
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
        event.features.numeric_kinds = columns.numeric_kinds
    for name, data, width in columns.outputs:
        event.outputs.add(name=name, values=data, width=width)
    if columns.model_input is not None:
        input_columns, matrix = columns.model_input
        event.model_input.columns.extend(input_columns)
        event.model_input.values = matrix
    return event


def _contract_features(
    request: InferRequest,
    coverage: Coverage,
    hash_key: bytes,
    redact: Redact,
    names: list[str],
    kinds: list[str],
    blocks: list[NDArray[np.float64]],
    strings: list[tuple[str, list[str], bool]],
) -> None:
    features, sensitive = coverage.positions, coverage.sensitive
    numeric: list[NDArray[np.generic]] = []
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
        if hidden:
            column = tensor.data.astype(np.float64).ravel()
            strings.append((tensor.name, [redact(v, hash_key) for v in column.tolist()], True))
            continue
        names.append(tensor.name)
        kinds.append(tensor.data.dtype.kind)
        numeric.append(tensor.data.reshape(-1))
    if numeric:
        # One cast for all columns (their common type, then float64), not one per feature.
        blocks.append(np.column_stack(numeric).astype(_F64, copy=False))


def _input_columns(
    tensor: Tensor,
    rows: int,
    max_columns: int,
    names: list[str],
    kinds: list[str],
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
    matrix = tensor.data if len(shape) == 2 else tensor.data.reshape(rows, -1)
    if matrix.shape[1] > max_columns:
        return
    if len(shape) == 1:
        names.append(tensor.name)
    else:
        names.extend(_column_names(tensor.name, matrix.shape[1]))
    kinds.append(tensor.data.dtype.kind * matrix.shape[1])
    blocks.append(matrix.astype(_F64))


@functools.lru_cache(maxsize=256)
def _column_names(name: str, width: int) -> tuple[str, ...]:
    return tuple(f"{name}[{j}]" for j in range(width))


def event_rows(request: InferRequest, response: InferResponse) -> int:
    """The rows an event counts: the first output's (or input's) leading dimension."""
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
