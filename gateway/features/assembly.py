"""Stage 3, offline: named columns -> the model's dense FP32 input, as the server builds it.

Training and backfills hand ``assemble_columns`` numpy arrays, lists or a pyarrow Table; it
ends where a request does (``Contract.assemble``): in ``build_input``, with the same type
checks, the same kernel and the same errors.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from gateway.features.contract import (
    Contract,
    ContractViolation,
    build_input,
    checked_column,
    listing,
)
from gateway.features.spec import FeatureSpec
from gateway.types import OUTCOMES

__all__ = ["Assembly", "assemble_columns"]


@dataclass(frozen=True, slots=True)
class Assembly:
    """An assembled batch: the matrix, and per feature how many values were present,
    defaulted, out of range and out of vocabulary (``counts[feature] = [p, d, r, o]``)."""

    contract: Contract
    matrix: NDArray[np.float32]
    counts: NDArray[np.int64]

    @property
    def rows(self) -> int:
        return int(self.matrix.shape[0])

    def total(self, outcome: str) -> int:
        return int(self.counts[:, OUTCOMES.index(outcome)].sum())

    def coverage(self) -> dict[str, dict[str, int]]:
        """``{feature: {outcome: count}}`` for this batch."""
        return {
            feature.name: dict(zip(OUTCOMES, (int(c) for c in row), strict=True))
            for feature, row in zip(self.contract.features, self.counts, strict=True)
        }


# -- offline: arrays, lists, pyarrow ---------------------------------------------------------


def assemble_columns(contract: Contract, columns: Mapping[str, Any] | Any) -> Assembly:
    """Assemble named columns (numpy arrays, lists, pyarrow arrays, or a pyarrow Table).

    A column the contract does not know is refused or ignored as the contract says; a missing
    column is all nulls. Returns exactly what the server builds from the same rows.
    """
    named = _named_columns(columns)
    label = f"contract {contract.version}"
    prepared: list[Any] = [None] * len(contract.features)
    rows: int | None = None
    first = ""
    for name, values in named.items():
        f = contract.index.get(name)
        if f is None:
            if contract.ignore_unknown:
                continue
            raise ContractViolation(f"unknown feature '{name}': {label} takes {listing(contract)}")
        feature = contract.features[f]
        datatype, array = _offline_column(feature, values)
        if rows is None:
            rows, first = len(array), name
        elif len(array) != rows:
            raise ContractViolation(
                f"feature '{name}' has {len(array)} rows but '{first}' has {rows}"
            )
        prepared[f] = checked_column(feature, datatype, array, label)
    if rows is None:
        raise ContractViolation(f"no column of {label} was given")
    matrix, counts = build_input(contract, prepared, rows, label)
    return Assembly(contract, matrix, counts)


def _named_columns(columns: Mapping[str, Any] | Any) -> Mapping[str, Any]:
    if isinstance(columns, Mapping):
        return columns
    names = getattr(columns, "column_names", None)  # a pyarrow Table (pyarrow is optional)
    if names is not None and hasattr(columns, "column"):
        return {name: columns.column(name) for name in names}
    raise TypeError(
        f"columns must be a mapping of name -> values or a pyarrow Table, got {type(columns)}"
    )


def _offline_column(feature: FeatureSpec, values: Any) -> tuple[str, NDArray[Any]]:
    """Values as the OIP datatype and array a request would carry them in."""
    if hasattr(values, "to_numpy") and not isinstance(values, np.ndarray):
        values = values.to_numpy(zero_copy_only=False)  # pyarrow: nulls become NaN / None
    array = np.asarray(values) if not isinstance(values, list) else _from_list(values)
    if array.ndim != 1:
        raise ContractViolation(f"feature '{feature.name}' must be one-dimensional")
    if feature.kind == "categorical" and array.dtype.kind in "OUS":
        return "BYTES", _as_bytes(feature, array)
    kind = array.dtype.kind
    if kind == "f":
        return ("FP32" if array.dtype.itemsize <= 4 else "FP64"), array
    if kind in "iu":
        return ("INT32" if array.dtype.itemsize <= 4 and kind == "i" else "INT64"), array
    if kind == "b":
        return "BOOL", array
    if kind == "O" and feature.kind != "categorical":
        return _numeric_objects(feature, array)
    return "BYTES", array


def _from_list(values: list[Any]) -> NDArray[Any]:
    """Python values keep their types (numpy would turn ["US", 3] into two strings)."""
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def _numeric_objects(feature: FeatureSpec, array: NDArray[Any]) -> tuple[str, NDArray[Any]]:
    """A numeric column holding None (null) or mixed Python numbers."""
    present = [v for v in array if v is not None]
    if all(isinstance(v, bool | np.bool_) for v in present):
        datatype = "BOOL"
    elif all(isinstance(v, int | np.integer) and not isinstance(v, bool) for v in present):
        datatype = "INT64"
    elif all(isinstance(v, int | float | np.number) for v in present):
        datatype = "FP64"
    else:
        return "BYTES", array
    return datatype, np.array([math.nan if v is None else float(v) for v in array])


def _as_bytes(feature: FeatureSpec, array: NDArray[Any]) -> NDArray[Any]:
    out = np.empty(len(array), dtype=object)
    for row, value in enumerate(array):
        if value is None or isinstance(value, bytes):
            out[row] = value
        elif isinstance(value, str):
            out[row] = value.encode("utf-8", "surrogatepass")
        elif isinstance(value, float) and math.isnan(value):
            out[row] = None  # pandas' missing string
        else:
            raise ContractViolation(
                f"feature '{feature.name}' row {row} is {type(value).__name__}, not a string"
            )
    return out
