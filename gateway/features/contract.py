"""Stage 3, contracts: a ``features.yaml`` version compiled, and a request assembled under it.

A ``Contract`` is one version of a model's feature contract (gateway.features.spec says what
the file holds): its features, the columns it writes, and its kernel plan. ``assemble`` turns
a request's raw feature tensors into the model's dense FP32 input; the offline API
(gateway.features.assembly) ends in the same ``build_input``, so training and serving build
the same matrix from the same rows.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any, Final

import numpy as np
from numpy.typing import NDArray
from pydantic import ValidationError

from gateway.errors import InvalidRequest, SettingsError
from gateway.features import kernel
from gateway.features._plan import (
    ERROR_NOT_BYTES,
    ERROR_NULL_REJECTED,
    ERROR_OUT_OF_RANGE,
    compile_plan,
)
from gateway.features.spec import (
    ACCEPTED_DATATYPES,
    ADVERTISED_DATATYPE,
    ContractFile,
    ContractVersionSpec,
    FeatureSpec,
)
from gateway.settings import describe_validation_error, read_yaml
from gateway.types import OUTCOMES, AssembledInput, Coverage, Tensor, TensorSpec

__all__ = [
    "CONTRACT_FILE",
    "Contract",
    "ContractViolation",
    "load_contract",
    "load_contracts",
    "model_contracts",
    "redact",
]

CONTRACT_FILE: Final = "features.yaml"
_LISTED_FEATURES: Final = 20


class ContractViolation(InvalidRequest):
    """Input that breaks a feature contract; the message names the feature and first bad row."""


class Contract:
    """One compiled contract version: its features, the columns it writes, its kernel plan."""

    def __init__(self, version: str, spec: ContractVersionSpec, source: str = "") -> None:
        self.version = version
        self.spec = spec
        self.source = source
        self.features: tuple[FeatureSpec, ...] = tuple(spec.features)
        self.index: dict[str, int] = {f.name: i for i, f in enumerate(self.features)}
        self.plan = compile_plan(spec.features)
        self.width = self.plan.width
        self.input_name = spec.input
        self.ignore_unknown = spec.unknown_features == "ignore"
        # Per feature, the OIP datatypes it accepts; the features that must be sent.
        self.accepted_datatypes: tuple[frozenset[str], ...] = tuple(
            frozenset(ACCEPTED_DATATYPES[f.kind]) for f in self.features
        )
        self.required: tuple[int, ...] = tuple(
            i for i, f in enumerate(self.features) if f.null_policy == "reject"
        )

    def __repr__(self) -> str:
        return f"Contract({self.version}, {len(self.features)} features, width {self.width})"

    @cached_property
    def feature_names(self) -> list[str]:
        return [f.name for f in self.features]

    @cached_property
    def columns(self) -> list[str]:
        """The name of every column of the matrix, in order (one-hot columns as name=value)."""
        return [name for feature in self.features for name in feature.column_names]

    @cached_property
    def kernel(self) -> Any:
        """The plan prepared for the kernel in use (native or twin); built once."""
        return kernel.prepare(self.plan)

    @cached_property
    def public_columns(self) -> tuple[list[str], NDArray[np.intp]]:
        """The matrix columns no sensitive feature fills: their names and positions."""
        names: list[str] = []
        positions: list[int] = []
        at = 0
        for feature in self.features:
            for name in feature.column_names:
                if not feature.sensitive:
                    names.append(name)
                    positions.append(at)
                at += 1
        return names, np.array(positions, np.intp)

    @cached_property
    def sensitive(self) -> frozenset[str]:
        """The features whose values never appear in clear (errors, logs, events)."""
        return frozenset(f.name for f in self.features if f.sensitive)

    def takes(self, name: str) -> bool:
        return name in self.index

    def advertised_inputs(self) -> list[TensorSpec]:
        return [TensorSpec(f.name, ADVERTISED_DATATYPE[f.kind], (-1, 1)) for f in self.features]

    @cached_property
    def optional_features(self) -> frozenset[str]:
        """The features whose null policy is a default: absent, they are null."""
        required = set(self.required)
        return frozenset(f.name for i, f in enumerate(self.features) if i not in required)

    def assemble(self, tensors: Sequence[Tensor], label: object, max_bytes: int) -> AssembledInput:
        """Assemble a request that sends one tensor ([N] or [N, 1]) per raw feature.

        On the request path of every such request: the loop does only what it must per tensor
        (the kernel reads each column in its own dtype); ``label`` names the model in errors
        and is formatted only when one is raised.
        """
        gathered = kernel.gather(
            self.index, self.accepted_datatypes, tensors, self.ignore_unknown, len(self.features)
        )
        columns, rows = self._gather(tensors, label) if gathered is None else gathered
        size = rows * self.width * 4
        if size > max_bytes:
            raise ContractViolation(
                f"{rows} rows assemble into {size} bytes of model input, over "
                f"server.max_message_bytes {max_bytes}; send fewer rows per request"
            )
        matrix, counts = build_input(self, columns, rows, label)
        return AssembledInput(
            matrix,
            Coverage(self.version, self.feature_names, self.index, self.sensitive, counts),
        )

    def _gather(self, tensors: Sequence[Tensor], label: object) -> tuple[list[Any], int]:
        """The columns in contract order and the rows; a tensor that does not fit the
        contract raises, naming it. (The reference of the native kernel's ``gather``.)"""
        index = self.index
        accepted = self.accepted_datatypes
        columns: list[Any] = [None] * len(self.features)
        rows = -1
        for tensor in tensors:
            f = index.get(tensor.name)
            if f is None:
                if self.ignore_unknown:
                    continue
                raise ContractViolation(
                    f"unknown feature '{tensor.name}': {label} takes {listing(self)}"
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
                checked_column(self.features[f], tensor.datatype, data, label)  # raises
            if columns[f] is not None:
                raise ContractViolation(f"feature '{tensor.name}' is given more than once")
            if shape[0] != rows:
                if rows >= 0:
                    first = next(
                        self.features[g].name for g, c in enumerate(columns) if c is not None
                    )
                    raise ContractViolation(
                        f"feature '{tensor.name}' has {shape[0]} rows but '{first}' has {rows}"
                    )
                rows = shape[0]
            columns[f] = data
        if rows < 0:
            raise ContractViolation(
                f"the request sends none of the features {label} takes: {listing(self)}"
            )
        return columns, rows

    def shown(self, feature: FeatureSpec, value: object) -> str:
        """A value as errors may show it: a sensitive feature's value never appears in clear."""
        if feature.sensitive:
            return "a withheld value (sensitive feature)"
        return repr(value)


def checked_column(
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


def build_input(
    contract: Contract, columns: list[Any], rows: int, label: object
) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
    """Run the kernel over checked columns: the model input and the coverage counts."""
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
    return out, counts


def _violation(
    contract: Contract, columns: list[Any], error: tuple[int, int, int], label: object
) -> ContractViolation:
    f, row, code = error
    feature = contract.features[f]
    where = f"feature '{feature.name}' row {row}"
    if code == ERROR_NULL_REJECTED:
        what = "empty" if feature.kind == "categorical" else "NaN"
        return ContractViolation(f"{where} is null ({what}) and {label} forbids nulls for it")
    if code == ERROR_OUT_OF_RANGE:
        assert feature.range is not None
        value = contract.shown(feature, float(columns[f][row]))
        lo, hi = feature.range.bounds
        return ContractViolation(
            f"{where}: {value} is outside the range [{lo:g}, {hi:g}] that {label} enforces"
        )
    assert code == ERROR_NOT_BYTES, code
    item = columns[f][row]
    return ContractViolation(f"{where} is {type(item).__name__}, not bytes")


def listing(contract: Contract) -> str:
    """The contract's feature names, the first few of them, for an error message."""
    names = contract.feature_names
    shown = ", ".join(names[:_LISTED_FEATURES])
    more = len(names) - _LISTED_FEATURES
    return shown + (f" and {more} more" if more > 0 else "")


def redact(value: bytes | str | float, key: bytes) -> str:
    """A keyed hash of a sensitive value: joinable across events, not reversible."""
    data = value.encode("utf-8") if isinstance(value, str) else value
    if isinstance(data, float | int):
        data = repr(float(data)).encode()
    return hashlib.blake2b(data, key=key[:64], digest_size=16).hexdigest()


def _contract_path(path: Path) -> Path:
    return path / CONTRACT_FILE if path.is_dir() else path


def load_contracts(path: Path | str) -> dict[str, Contract]:
    """Every version in a ``features.yaml`` (or a model directory holding one)."""
    file = _contract_path(Path(path))
    try:
        parsed = ContractFile.model_validate(read_yaml(file))
    except ValidationError as err:
        raise SettingsError(describe_validation_error(err, str(file))) from None
    return {
        version: Contract(version, spec, str(file))
        for version, spec in sorted(parsed.versions.items(), key=lambda kv: int(kv[0][1:]))
    }


def model_contracts(model_dir: Path) -> tuple[dict[str, Contract], Path] | None:
    """A model directory's contracts and their file, when it has a ``features.yaml``."""
    file = model_dir / CONTRACT_FILE
    if not file.exists():
        return None
    return load_contracts(file), file


def load_contract(path: Path | str, version: str | None = None) -> Contract:
    """One contract version (default: the highest) from ``features.yaml`` or its directory."""
    contracts = load_contracts(path)
    if version is None:
        return list(contracts.values())[-1]
    try:
        return contracts[version]
    except KeyError:
        raise SettingsError(
            f"{_contract_path(Path(path))}: no contract version '{version}' "
            f"(has {', '.join(contracts)})"
        ) from None
