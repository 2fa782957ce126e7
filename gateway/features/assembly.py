"""Raw named columns -> the model's dense FP32 input, under a contract: online and offline.

Both paths end in ``_assemble``: the same type checks, the same kernel, the same errors. The
server hands it request tensors (``assemble_tensors``); training and backfills hand it numpy
arrays, lists or a pyarrow Table (``assemble_columns``), and get the matrix the server builds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
from numpy.typing import NDArray

from gateway.errors import InvalidRequest
from gateway.features import kernel
from gateway.features.contract import ACCEPTED_DATATYPES, Contract, FeatureSpec
from gateway.types import Tensor

__all__ = ["OUTCOMES", "Assembly", "ContractViolation", "assemble_columns", "assemble_tensors"]

OUTCOMES: Final = ("present", "defaulted", "out_of_range", "oov")
_NULL_REJECTED, _OUT_OF_RANGE, _NOT_BYTES = 1, 2, 3
_LISTED_FEATURES: Final = 20


class ContractViolation(InvalidRequest):
    """Input that breaks a feature contract; the message names the feature and first bad row."""


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


# -- online: request tensors -----------------------------------------------------------------


def assemble_tensors(
    contract: Contract, tensors: Sequence[Tensor], label: object, max_bytes: int
) -> Assembly:
    """Assemble a request that sends one tensor ([N] or [N, 1]) per raw feature.

    On the request path of every such request: the loop does only what it must per tensor
    (the kernel reads each column in its own dtype); ``label`` names the model in errors and
    is formatted only when one is raised.
    """
    index = contract.index
    accepted = contract.accepted_datatypes
    columns: list[Any] = [None] * len(contract.features)
    rows = -1
    for tensor in tensors:
        f = index.get(tensor.name)
        if f is None:
            if contract.ignore_unknown:
                continue
            raise ContractViolation(
                f"unknown feature '{tensor.name}': {label} takes {_listing(contract)}"
            )
        shape = tensor.shape
        if len(shape) != 1 and (len(shape) != 2 or shape[1] != 1):
            raise ContractViolation(
                f"feature '{tensor.name}' has shape {list(shape)}; a raw feature is sent "
                "as [N] or [N, 1], one value per row"
            )
        # Raw BYTES go to the kernel as the wire buffer: no object per value.
        data: Any = tensor.raw if tensor.raw is not None else tensor.data
        if len(shape) != 1 and tensor.raw is None:
            data = data.reshape(-1)
        if tensor.datatype not in accepted[f]:
            _checked(contract.features[f], tensor.datatype, data, label)  # raises, naming it
        if columns[f] is not None:
            raise ContractViolation(f"feature '{tensor.name}' is given more than once")
        if shape[0] != rows:
            if rows >= 0:
                first = next(
                    contract.features[g].name for g, c in enumerate(columns) if c is not None
                )
                raise ContractViolation(
                    f"feature '{tensor.name}' has {shape[0]} rows but '{first}' has {rows}"
                )
            rows = shape[0]
        columns[f] = data
    if rows < 0:
        raise ContractViolation(
            f"the request sends none of the features {label} takes: {_listing(contract)}"
        )
    size = rows * contract.width * 4
    if size > max_bytes:
        raise ContractViolation(
            f"{rows} rows assemble into {size} bytes of model input, over "
            f"server.max_message_bytes {max_bytes}; send fewer rows per request"
        )
    return _assemble(contract, columns, rows, label)


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
            raise ContractViolation(f"unknown feature '{name}': {label} takes {_listing(contract)}")
        feature = contract.features[f]
        datatype, array = _offline_column(feature, values)
        if rows is None:
            rows, first = len(array), name
        elif len(array) != rows:
            raise ContractViolation(
                f"feature '{name}' has {len(array)} rows but '{first}' has {rows}"
            )
        prepared[f] = _checked(feature, datatype, array, label)
    if rows is None:
        raise ContractViolation(f"no column of {label} was given")
    return _assemble(contract, prepared, rows, label)


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


# -- shared ----------------------------------------------------------------------------------


def _checked(
    feature: FeatureSpec, datatype: str, data: NDArray[Any], label: object
) -> NDArray[Any]:
    """The column, when its datatype suits the feature's kind (the kernel reads it as is)."""
    accepted = ACCEPTED_DATATYPES[feature.kind]
    if datatype not in accepted:
        raise ContractViolation(
            f"feature '{feature.name}' is {feature.kind} in {label} and is sent as "
            f"{' or '.join(accepted)}, got {datatype}"
        )
    return data


def _assemble(contract: Contract, columns: list[Any], rows: int, label: object) -> Assembly:
    for f in contract.required:
        if columns[f] is None:
            raise ContractViolation(
                f"feature '{contract.features[f].name}' is missing; {label} requires it "
                "(null_policy: reject)"
            )
    out = np.zeros((rows, contract.width), dtype=np.float32)
    counts = np.zeros((len(contract.features), len(OUTCOMES)), dtype=np.int64)
    error = kernel.run(contract.kernel, columns, rows, out, counts)
    if error is not None:
        raise _violation(contract, columns, error, label)
    return Assembly(contract, out, counts)


def _violation(
    contract: Contract, columns: list[Any], error: tuple[int, int, int], label: object
) -> ContractViolation:
    f, row, code = error
    feature = contract.features[f]
    where = f"feature '{feature.name}' row {row}"
    if code == _NULL_REJECTED:
        what = "empty" if feature.kind == "categorical" else "NaN"
        return ContractViolation(f"{where} is null ({what}) and {label} forbids nulls for it")
    if code == _OUT_OF_RANGE:
        assert feature.range is not None
        value = contract.shown(feature, float(columns[f][row]))
        lo, hi = feature.range.bounds
        return ContractViolation(
            f"{where}: {value} is outside the range [{lo:g}, {hi:g}] that {label} enforces"
        )
    item = columns[f][row]
    return ContractViolation(f"{where} is {type(item).__name__}, not bytes")


def _listing(contract: Contract) -> str:
    names = [f.name for f in contract.features]
    shown = ", ".join(names[:_LISTED_FEATURES])
    more = len(names) - _LISTED_FEATURES
    return shown + (f" and {more} more" if more > 0 else "")
