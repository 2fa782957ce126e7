"""Transport-free value types shared by the stages of the request path."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np
from numpy.typing import NDArray

if TYPE_CHECKING:
    from gateway.features.assembly import Assembly

ParameterValue = bool | int | float | str


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

    def __repr__(self) -> str:
        return f"Tensor({self.name!r}, {self.datatype}, shape={list(self.shape)})"


@dataclass(slots=True)
class InferRequest:
    model_name: str
    model_version: str = ""
    id: str = ""
    inputs: list[Tensor] = field(default_factory=list)
    requested_outputs: list[str] = field(default_factory=list)
    parameters: dict[str, ParameterValue] = field(default_factory=dict)
    timeout_s: float | None = None  # what the transport's deadline leaves, at arrival


@dataclass(slots=True)
class InferResponse:
    model_name: str
    model_version: str
    id: str
    outputs: list[Tensor]
    parameters: dict[str, ParameterValue] = field(default_factory=dict)
    # The request's features as assembled (contract version, per-feature coverage counts),
    # when it sent raw features: kept for the prediction event.
    assembly: Assembly | None = None


ModelState = Literal["READY", "LOADING", "UNLOADING", "UNAVAILABLE"]


@dataclass(frozen=True, slots=True)
class ModelIndexEntry:
    """One row of the repository index: a model version and its state."""

    name: str
    version: str
    state: ModelState
    reason: str = ""
