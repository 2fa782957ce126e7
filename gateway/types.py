"""Transport-free value types shared by the stages of the request path.

Every stage may import this module and no stage imports another, so what two stages exchange
is defined here: the request and its parsed options, tensors and model signatures, the
``ModelRuntime`` seam, a batch's ``Outcome``, a request's ``Charge``, the ``Coverage`` of an
assembly, and the ``FeatureContract`` a model version serves under.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final, Literal, Protocol

import numpy as np
from numpy.typing import NDArray

from gateway.errors import InvalidRequest

__all__ = [
    "DEFAULT_OPTIONS",
    "FREE",
    "MAX_TEXT_CHARS",
    "NUMPY_DTYPES",
    "OUTCOMES",
    "WIRE_DTYPES",
    "Answer",
    "AssembledInput",
    "Charge",
    "Coverage",
    "FeatureContract",
    "Feeds",
    "InferRequest",
    "InferResponse",
    "ModelIndexEntry",
    "ModelInput",
    "ModelRuntime",
    "ModelState",
    "Outcome",
    "ParameterValue",
    "RequestOptions",
    "Tensor",
    "TensorSpec",
]

ParameterValue = bool | int | float | str
# A model's inputs by name, as they go to the batcher, the cache and the runtime.
Feeds = Mapping[str, NDArray[np.generic]]

# OIP datatype -> numpy dtype. BYTES elements are Python ``bytes`` in an object array.
NUMPY_DTYPES: Final[dict[str, np.dtype[np.generic]]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(np.object_),
}
# Raw contents (raw_input_contents, raw_output_contents) are little-endian whatever the host.
WIRE_DTYPES: Final = {name: dtype.newbyteorder("<") for name, dtype in NUMPY_DTYPES.items()}


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """A model input or output as the model declares it; -1 marks a dynamic dimension."""

    name: str
    datatype: str
    shape: tuple[int, ...]


class Tensor:
    """A named tensor. BYTES tensors hold ``bytes`` objects in an object array.

    A BYTES tensor that arrived as raw OIP bytes keeps that buffer (``raw``, already checked
    to hold exactly its elements) and makes the objects only when ``data`` is first read: the
    feature kernel reads the buffer itself, without an object per value.
    """

    # NOTE: native/_features_c.pyx ``gather`` reads ``_data`` and ``_shape`` directly.
    __slots__ = ("_data", "_shape", "datatype", "name", "parameters", "raw")

    def __init__(
        self,
        name: str,
        datatype: str,
        data: NDArray[np.generic] | None = None,
        parameters: dict[str, ParameterValue] | None = None,
        *,
        raw: bytes | None = None,
        shape: tuple[int, ...] | None = None,
    ) -> None:
        if data is None and (raw is None or shape is None):
            raise ValueError("a Tensor needs data, or raw BYTES contents and a shape")
        self.name = name
        self.datatype = datatype
        self._data = data
        self.parameters = {} if parameters is None else parameters
        self.raw = raw
        self._shape = shape

    @property
    def data(self) -> NDArray[np.generic]:
        if self._data is None:
            assert self.raw is not None and self._shape is not None
            from gateway import _hotloops

            items = _hotloops.decode_bytes(self.raw, math.prod(self._shape))
            array = np.empty(len(items), dtype=object)
            array[:] = items
            self._data = array.reshape(self._shape)
        return self._data

    @property
    def shape(self) -> tuple[int, ...]:
        if self._data is None:
            assert self._shape is not None
            return self._shape
        return self._data.shape

    @property
    def nbytes(self) -> int:
        return len(self.raw) if self.raw is not None else int(self.data.nbytes)

    def __repr__(self) -> str:
        return f"Tensor({self.name!r}, {self.datatype}, shape={list(self.shape)})"


# -- request options: parsed once, at the edge ----------------------------------------------

_EMPTY: Final[Mapping[str, str]] = MappingProxyType({})
_SEGMENT = "segment."
MAX_TEXT_CHARS: Final = 1024  # a tenant, surface, sticky key, entity key or segment value
MAX_DIMS: Final = 64  # dimensions of a tensor (numpy's limit)
# A tensor's dimensions, zeros aside, multiply to at most this: numpy refuses an array whose
# extent times its item size passes 2^63, even one with no elements.
MAX_EXTENT: Final = 2**48
_ASCII_INT = re.compile(r"[0-9]{1,18}")


def ascii_int(text: str) -> int | None:
    """The number ``text`` writes in ASCII digits (at most 18, so within int64), or None.

    The one parser of numbers in client and file text: ``str.isdigit()`` also accepts digits
    such as '²' that ``int()`` then refuses.
    """
    return int(text) if _ASCII_INT.fullmatch(text) else None


# NOTE: the values made per request are slotted dataclasses, not frozen ones: a frozen
# dataclass's __init__ sets each field through object.__setattr__, about 4x the cost. They are
# not mutated once made.


@dataclass(slots=True, eq=False)
class RequestOptions:
    """What a request asks of the gateway beyond its tensors, parsed from its parameters.

    ``labels`` is every parameter as text: what route match rules compare (``segment.geo``,
    ``tier``, ...). Parameters the gateway does not know are kept there and otherwise ignored,
    as Triton ignores them.
    """

    tenant: str = ""
    surface: str = ""
    sticky_key: str | None = None
    segments: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    priority: int | None = None  # 1 is first; checked against the model's levels per attempt
    timeout_ms: float | None = None
    cache: bool = True
    entity_key: str = ""
    labels: Mapping[str, str] = field(default_factory=lambda: _EMPTY)

    @classmethod
    def parse(cls, parameters: Mapping[str, ParameterValue]) -> RequestOptions:
        """Validate request parameters; a bad one is INVALID_ARGUMENT naming it."""
        if not parameters:
            return DEFAULT_OPTIONS
        segments: dict[str, str] = {}
        labels: dict[str, str] = {}
        for key, value in parameters.items():
            labels[key] = _label(value)
            if key.startswith(_SEGMENT):  # kept as sent (a bool as True), as events store it
                segments[key[len(_SEGMENT) :]] = _bounded(key, str(value))
        sticky = parameters.get("sticky_key")
        if sticky is not None and (isinstance(sticky, bool) or not isinstance(sticky, str | int)):
            raise InvalidRequest(f"parameter 'sticky_key' must be a string, got {sticky!r}")
        return cls(
            tenant=_bounded("tenant", _text(parameters.get("tenant"))),
            surface=_bounded("surface", _text(parameters.get("surface"))),
            sticky_key=None if sticky is None else _bounded("sticky_key", str(sticky)),
            segments=segments or _EMPTY,
            priority=_priority(parameters.get("priority")),
            timeout_ms=_timeout_ms(parameters.get("timeout_ms")),
            cache=_cache(parameters.get("cache")),
            entity_key=_bounded("entity_key", _text(parameters.get("entity_key"))),
            labels=labels,
        )

    def for_tenant(self, tenant: str) -> RequestOptions:
        """These options for a caller whose credential names ``tenant``: the ``tenant``
        parameter, if any, is replaced (in what route rules match too)."""
        if self.tenant == tenant and self.labels.get("tenant") == tenant:
            return self
        return dataclasses.replace(self, tenant=tenant, labels={**self.labels, "tenant": tenant})


DEFAULT_OPTIONS: Final = RequestOptions()


def _text(value: ParameterValue | None) -> str:
    return "" if value is None else str(value)


def _label(value: ParameterValue) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _bounded(name: str, text: str) -> str:
    if len(text) > MAX_TEXT_CHARS:
        raise InvalidRequest(
            f"parameter '{name}' has {len(text)} characters; at most {MAX_TEXT_CHARS} are kept"
        )
    return text


def _priority(value: ParameterValue | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, str) and (number := ascii_int(value.strip())) is not None:
        value = number
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidRequest(
            f"parameter 'priority' must be an integer from 1 (first), got {value!r}"
        )
    return value


def _timeout_ms(value: ParameterValue | None) -> float | None:
    if value is None:
        return None
    timeout_ms = -1.0
    if not isinstance(value, bool):
        with contextlib.suppress(ValueError):
            timeout_ms = float(value)
    if not 0 < timeout_ms < math.inf:
        raise InvalidRequest(f"parameter 'timeout_ms' must be a positive number, got {value!r}")
    return timeout_ms


def _cache(value: ParameterValue | None) -> bool:
    """The ``cache`` parameter: absent or true uses the cache, false bypasses it."""
    if value is None or value is True or value == "true":
        return True
    if value is False or value == "false":
        return False
    raise InvalidRequest(f"parameter 'cache' must be true or false, got {value!r}")


@dataclass(slots=True)
class InferRequest:
    model_name: str
    model_version: str = ""
    id: str = ""
    inputs: list[Tensor] = field(default_factory=list)
    requested_outputs: list[str] = field(default_factory=list)
    options: RequestOptions = DEFAULT_OPTIONS  # never changed once made: shared
    timeout_s: float | None = None  # what the transport's deadline leaves, at arrival
    arrived: float | None = None  # time.monotonic() when the transport received it
    # Bytes of raw tensor contents as received, for memory bounds; 0: not known (typed
    # contents, or made in process), count the tensors.
    nbytes: int = 0

    def time_left(self, now: float) -> float | None:
        """Seconds left at ``now`` (time.monotonic()) of the request's deadline, the gRPC
        deadline's or ``timeout_ms``'s (the sooner), counted from its arrival; None: none."""
        timeout_s = self.timeout_s
        timeout_ms = self.options.timeout_ms
        if timeout_ms is not None and (timeout_s is None or timeout_ms / 1000 < timeout_s):
            timeout_s = timeout_ms / 1000
        if timeout_s is None:
            return None
        if self.arrived is not None:
            timeout_s -= now - self.arrived
        return timeout_s

    @property
    def rows(self) -> int:
        """The batch dimension of the first input that has one (1 for scalars)."""
        for tensor in self.inputs:
            shape = tensor.shape
            if shape:
                return int(shape[0])
        return 1


@dataclass(slots=True)
class InferResponse:
    model_name: str
    model_version: str
    id: str
    outputs: list[Tensor]
    parameters: dict[str, ParameterValue] = field(default_factory=dict)


# -- what stages hand each other -------------------------------------------------------------


class ModelRuntime(Protocol):
    """What the scheduler needs from a loaded model: its signature and a blocking run."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    provider: str

    def run(
        self, feeds: Mapping[str, NDArray[np.generic]], output_names: Sequence[str]
    ) -> list[NDArray[np.generic]]: ...


@dataclass(slots=True)
class Outcome:
    """A request's outputs (all model outputs, in model order) and where its time went."""

    outputs: list[NDArray[np.generic]]
    queue_ns: int
    compute_ns: int  # the whole batch's run
    batch_rows: int
    share_ns: int  # this request's rows' share of compute_ns (what its cost is charged on)


class Charge:
    """One request's cost and its parts (made per request: a plain slotted class)."""

    __slots__ = ("compute", "compute_s", "lookup", "request", "total")

    def __init__(self, compute_s: float, compute: float, request: float, lookup: float) -> None:
        self.compute_s = compute_s  # this request's share of its batches' compute time
        self.compute = compute
        self.request = request
        self.lookup = lookup
        self.total = compute + request + lookup


FREE: Final = Charge(0.0, 0.0, 0.0, 0.0)

# What became of each raw feature value in an assembly, in the order of a coverage row.
OUTCOMES: Final = ("present", "defaulted", "out_of_range", "oov")


@dataclass(slots=True)
class Coverage:
    """How a request's raw features were assembled: per feature (contract order), how many
    values were present, defaulted, out of range and out of vocabulary."""

    contract_version: str
    features: Sequence[str]
    positions: Mapping[str, int]  # feature -> its place in ``features`` (the contract's own)
    sensitive: frozenset[str]  # features whose values never leave in clear
    counts: NDArray[np.int64]  # [feature, OUTCOMES]


@dataclass(slots=True)
class AssembledInput:
    """A contract's output for one request: the model's input matrix and its coverage."""

    matrix: NDArray[np.float32]
    coverage: Coverage


@dataclass(frozen=True, slots=True)
class ModelInput:
    """The matrix a contract assembled and the model ran on, its columns named as the contract
    names them: what a prediction event carries so training sees exactly what serving saw."""

    columns: Sequence[str]
    matrix: NDArray[np.float32]  # [rows, len(columns)]


@dataclass(slots=True)
class Answer:
    """A response and what it cost: what one attempt hands back up the request path.

    ``route`` and ``variant`` say what answered on a route (set by its runner); for a model
    asked for by name they stay empty, its response names it.
    """

    response: InferResponse
    cost: Charge
    cached_rows: int = 0
    coverage: Coverage | None = None  # when the request's raw features were assembled
    route: str = ""
    variant: str = ""
    model_input: ModelInput | None = None  # what they were assembled into


class FeatureContract(Protocol):
    """A compiled feature contract as the other stages see it (gateway.features makes them)."""

    @property
    def version(self) -> str: ...
    @property
    def source(self) -> str: ...
    @property
    def input_name(self) -> str | None: ...
    @property
    def width(self) -> int: ...
    @property
    def feature_names(self) -> list[str]: ...
    @property
    def columns(self) -> list[str]:
        """The name of every column of the matrix it assembles, in order."""
        ...

    @property
    def public_columns(self) -> tuple[list[str], NDArray[np.intp]]:
        """The columns no sensitive feature fills: names and positions."""
        ...

    def takes(self, name: str) -> bool:
        """Whether ``name`` is one of the contract's raw features."""
        ...

    def advertised_inputs(self) -> list[TensorSpec]:
        """The raw features as metadata lists them: one [-1, 1] input each."""
        ...

    @property
    def optional_features(self) -> frozenset[str]:
        """The raw features a request may leave out (their null default fills them)."""
        ...

    def assemble(self, tensors: Sequence[Tensor], label: object, max_bytes: int) -> AssembledInput:
        """The model input for a request's raw feature tensors; ``label`` names the model
        version in errors (formatted only when one is raised)."""
        ...


ModelState = Literal["READY", "LOADING", "UNLOADING", "UNAVAILABLE"]


@dataclass(frozen=True, slots=True)
class ModelIndexEntry:
    """One row of the repository index: a model version and its state."""

    name: str
    version: str
    state: ModelState
    reason: str = ""
