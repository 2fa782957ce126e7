"""Feature contracts: ``features.yaml`` beside a model, read, validated and compiled.

A contract version (``v1``, ``v2``, ...) names every raw feature a model consumes and how each
becomes columns of the model's dense FP32 input::

    versions:
      v1:
        input: features              # the model input it builds (default: the model's only one)
        unknown_features: reject     # or ignore: what to do with a feature the contract lacks
        features:
          - name: amount
            kind: float              # float | int | bool | categorical
            owner: risk-data
            description: Card transaction amount, USD.
            null_policy: reject      # or {default: 0.0}; a null is NaN, or an absent feature
            range: {min: 0, max: 50000, policy: clip}   # reject | clip | flag
            transform: [log1p, {standardize: {mean: 3.5, std: 1.2}}]
          - name: country
            kind: categorical        # a null is an empty string, or an absent feature
            owner: risk-data
            description: Issuing country.
            vocabulary: [US, BR, DE]
            encoding: one_hot        # or index; column/index 0 is the out-of-vocabulary bucket
            null_policy: {default: ~} # a vocabulary value, or ~ for the OOV bucket
            sensitive: true          # never shown in clear in errors, logs or events

Numeric values are processed in float64 and written as float32: range check on the raw value
(not on a default), then the transform steps in order. Columns are laid out in contract order;
a categorical takes one column (``index``) or ``1 + len(vocabulary)`` (``one_hot``).
"""

from __future__ import annotations

import hashlib
import itertools
import math
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Final, Literal

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gateway.errors import SettingsError
from gateway.settings import describe_validation_error, read_yaml

__all__ = [
    "CONTRACT_FILE",
    "Contract",
    "FeatureSpec",
    "KernelPlan",
    "load_contract",
    "load_contracts",
]

CONTRACT_FILE: Final = "features.yaml"
_VERSION = re.compile(r"^v[1-9][0-9]*$")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")

# Kernel codes: the native kernel and its Python twin read the same plan.
NUMERIC, CATEGORICAL = 0, 1
RANGE_NONE, RANGE_REJECT, RANGE_CLIP, RANGE_FLAG = 0, 1, 2, 3
STEP_STANDARDIZE, STEP_LOG1P, STEP_CLIP, STEP_BUCKETIZE = 1, 2, 3, 4
_RANGE_CODES: Final = {"reject": RANGE_REJECT, "clip": RANGE_CLIP, "flag": RANGE_FLAG}

# OIP datatypes a feature of each kind accepts (online), in the order error messages list them.
ACCEPTED_DATATYPES: Final[dict[str, tuple[str, ...]]] = {
    "float": ("FP32", "FP64", "INT32", "INT64"),
    "int": ("INT32", "INT64"),
    "bool": ("BOOL",),
    "categorical": ("BYTES",),
}
# The datatype ModelMetadata advertises for a feature of each kind.
ADVERTISED_DATATYPE: Final = {
    "float": "FP32",
    "int": "INT64",
    "bool": "BOOL",
    "categorical": "BYTES",
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Range(_Strict):
    min: float | None = None
    max: float | None = None
    policy: Literal["reject", "clip", "flag"] = "reject"

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if self.min is None and self.max is None:
            raise ValueError("give min, max or both")
        if any(v is not None and math.isnan(v) for v in (self.min, self.max)):
            raise ValueError("min and max must be numbers, not NaN")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min} is over max {self.max}")
        return self

    @property
    def bounds(self) -> tuple[float, float]:
        lo = -math.inf if self.min is None else self.min
        hi = math.inf if self.max is None else self.max
        return lo, hi


class _Standardize(_Strict):
    mean: float
    std: float = Field(gt=0)


class _Clip(_Strict):
    min: float
    max: float

    @model_validator(mode="after")
    def _ordered(self) -> _Clip:
        if not self.min <= self.max:
            raise ValueError(f"clip min {self.min} is over max {self.max}")
        return self


class _Bucketize(_Strict):
    boundaries: list[float] = Field(min_length=1)

    @field_validator("boundaries")
    @classmethod
    def _increasing(cls, v: list[float]) -> list[float]:
        if any(math.isnan(b) for b in v) or any(b >= c for b, c in itertools.pairwise(v)):
            raise ValueError("boundaries must be strictly increasing numbers")
        return v


class _StandardizeStep(_Strict):
    standardize: _Standardize


class _ClipStep(_Strict):
    clip: _Clip


class _BucketizeStep(_Strict):
    bucketize: _Bucketize


Step = Literal["identity", "log1p"] | _StandardizeStep | _ClipStep | _BucketizeStep


class NullDefault(_Strict):
    default: float | str | None


class FeatureSpec(_Strict):
    """One raw feature of a contract version."""

    name: Annotated[str, Field(pattern=_NAME.pattern, max_length=128)]
    kind: Literal["float", "int", "bool", "categorical"]
    owner: str = Field(min_length=1)
    description: str = Field(min_length=1)
    null_policy: Literal["reject"] | NullDefault = "reject"
    range: Range | None = None
    transform: list[Step] = Field(default_factory=list, max_length=16)
    vocabulary: list[str] | None = None
    encoding: Literal["index", "one_hot"] = "one_hot"
    sensitive: bool = False

    @field_validator("transform", mode="before")
    @classmethod
    def _one_step_is_a_list(cls, v: Any) -> Any:
        return [v] if isinstance(v, str | dict) else v

    @model_validator(mode="after")
    def _consistent(self) -> FeatureSpec:
        if self.kind == "categorical":
            if not self.vocabulary:
                raise ValueError("a categorical feature needs a non-empty vocabulary")
            if len(set(self.vocabulary)) != len(self.vocabulary):
                raise ValueError("vocabulary has duplicate values")
            if "" in self.vocabulary:
                raise ValueError("vocabulary cannot hold '' (an empty string is a null)")
            if self.range is not None or self.transform:
                raise ValueError("range and transform apply to numeric features only")
        else:
            if self.vocabulary is not None:
                raise ValueError("vocabulary applies to categorical features only")
            if self.kind == "bool" and (self.range is not None or self.transform):
                raise ValueError("a bool feature takes no range or transform")
        if isinstance(self.null_policy, NullDefault):
            self._check_default(self.null_policy.default)
        return self

    def _check_default(self, value: float | str | None) -> None:
        if self.kind == "categorical":
            if value is not None and value not in (self.vocabulary or []):
                raise ValueError(
                    f"null default {value!r} is not in the vocabulary (~ picks the OOV bucket)"
                )
            return
        if isinstance(value, str) or value is None or math.isnan(value):
            raise ValueError(f"null default of a {self.kind} feature must be a number")
        if self.kind == "bool" and value not in (0, 1):
            raise ValueError("null default of a bool feature must be true or false")
        if self.range is not None:
            lo, hi = self.range.bounds
            if not lo <= value <= hi:
                raise ValueError(f"null default {value} is outside the range [{lo}, {hi}]")

    @property
    def width(self) -> int:
        if self.kind == "categorical" and self.encoding == "one_hot":
            return 1 + len(self.vocabulary or [])
        return 1

    @property
    def column_names(self) -> list[str]:
        if self.kind == "categorical" and self.encoding == "one_hot":
            return [f"{self.name}=<oov>", *(f"{self.name}={v}" for v in self.vocabulary or [])]
        return [self.name]


class ContractVersionSpec(_Strict):
    description: str = ""
    input: str | None = Field(None, description="Model input it builds; default: the only one.")
    unknown_features: Literal["reject", "ignore"] = "reject"
    features: list[FeatureSpec] = Field(min_length=1, max_length=4096)

    @model_validator(mode="after")
    def _unique_names(self) -> ContractVersionSpec:
        seen: set[str] = set()
        for feature in self.features:
            if feature.name in seen:
                raise ValueError(f"feature '{feature.name}' is declared twice")
            seen.add(feature.name)
        return self


class ContractFile(_Strict):
    versions: dict[str, ContractVersionSpec] = Field(min_length=1)

    @field_validator("versions")
    @classmethod
    def _version_names(cls, v: dict[str, ContractVersionSpec]) -> dict[str, ContractVersionSpec]:
        bad = [name for name in v if not _VERSION.match(name)]
        if bad:
            raise ValueError(f"contract versions are named v1, v2, ...; got {bad}")
        return v


@dataclass(frozen=True, eq=False)
class KernelPlan:
    """A contract version as flat arrays: what the native kernel and its twin execute.

    Per feature f: ``kinds[f]``, output column ``offsets[f]``, ``null_reject[f]``,
    ``defaults[f]`` (a raw numeric value, or a categorical's bucket index), range policy and
    bounds, and its transform steps ``steps[step_start[f] : step_start[f] + step_count[f]]``
    (code, a, b, and for bucketize ``bounds[bound_start[s] : + bound_count[s]]``). Categorical
    features have ``vocab[f]`` (UTF-8 values, bucket i + 1 for value i) and ``one_hot[f]``.
    """

    width: int
    kinds: NDArray[np.int8]
    offsets: NDArray[np.int64]
    null_reject: NDArray[np.int8]
    defaults: NDArray[np.float64]
    range_policy: NDArray[np.int8]
    range_lo: NDArray[np.float64]
    range_hi: NDArray[np.float64]
    one_hot: NDArray[np.int8]
    step_start: NDArray[np.int64]
    step_count: NDArray[np.int64]
    step_code: NDArray[np.int8]
    step_a: NDArray[np.float64]
    step_b: NDArray[np.float64]
    bound_start: NDArray[np.int64]
    bound_count: NDArray[np.int64]
    bounds: NDArray[np.float64]
    vocab: tuple[tuple[bytes, ...] | None, ...]

    @property
    def features(self) -> int:
        return len(self.kinds)


def _compile_plan(features: list[FeatureSpec]) -> KernelPlan:
    kinds: list[int] = []
    offsets: list[int] = []
    null_reject: list[int] = []
    defaults: list[float] = []
    range_policy: list[int] = []
    range_lo: list[float] = []
    range_hi: list[float] = []
    one_hot: list[int] = []
    step_start: list[int] = []
    step_count: list[int] = []
    step_code: list[int] = []
    step_a: list[float] = []
    step_b: list[float] = []
    bound_start: list[int] = []
    bound_count: list[int] = []
    bounds: list[float] = []
    vocab: list[tuple[bytes, ...] | None] = []
    offset = 0
    for feature in features:
        categorical = feature.kind == "categorical"
        kinds.append(CATEGORICAL if categorical else NUMERIC)
        offsets.append(offset)
        offset += feature.width
        null_reject.append(1 if feature.null_policy == "reject" else 0)
        default = (
            feature.null_policy.default if isinstance(feature.null_policy, NullDefault) else None
        )
        if categorical:
            values = feature.vocabulary or []
            defaults.append(0.0 if default is None else 1.0 + values.index(str(default)))
            vocab.append(tuple(v.encode("utf-8") for v in values))
        else:
            defaults.append(0.0 if default is None else float(default))
            vocab.append(None)
        one_hot.append(1 if categorical and feature.encoding == "one_hot" else 0)
        if feature.range is None:
            range_policy.append(RANGE_NONE)
            range_lo.append(-math.inf)
            range_hi.append(math.inf)
        else:
            range_policy.append(_RANGE_CODES[feature.range.policy])
            lo, hi = feature.range.bounds
            range_lo.append(lo)
            range_hi.append(hi)
        step_start.append(len(step_code))
        for step in feature.transform:
            code, a, b, edges = _step(step)
            if code == 0:
                continue
            step_code.append(code)
            step_a.append(a)
            step_b.append(b)
            bound_start.append(len(bounds))
            bound_count.append(len(edges))
            bounds.extend(edges)
        step_count.append(len(step_code) - step_start[-1])

    def i8(v: list[int]) -> NDArray[np.int8]:
        return np.array(v, dtype=np.int8)

    def i64(v: list[int]) -> NDArray[np.int64]:
        return np.array(v, dtype=np.int64)

    def f64(v: list[float]) -> NDArray[np.float64]:
        return np.array(v, dtype=np.float64)

    return KernelPlan(
        width=offset,
        kinds=i8(kinds),
        offsets=i64(offsets),
        null_reject=i8(null_reject),
        defaults=f64(defaults),
        range_policy=i8(range_policy),
        range_lo=f64(range_lo),
        range_hi=f64(range_hi),
        one_hot=i8(one_hot),
        step_start=i64(step_start),
        step_count=i64(step_count),
        step_code=i8(step_code),
        step_a=f64(step_a),
        step_b=f64(step_b),
        bound_start=i64(bound_start),
        bound_count=i64(bound_count),
        bounds=f64(bounds),
        vocab=tuple(vocab),
    )


def _step(step: Step) -> tuple[int, float, float, list[float]]:
    if step == "identity":
        return 0, 0.0, 0.0, []
    if step == "log1p":
        return STEP_LOG1P, 0.0, 0.0, []
    if isinstance(step, _StandardizeStep):
        return STEP_STANDARDIZE, step.standardize.mean, step.standardize.std, []
    if isinstance(step, _ClipStep):
        return STEP_CLIP, step.clip.min, step.clip.max, []
    assert isinstance(step, _BucketizeStep)
    return STEP_BUCKETIZE, 0.0, 0.0, list(step.bucketize.boundaries)


class Contract:
    """One compiled contract version: its features, the columns it writes, its kernel plan."""

    def __init__(self, version: str, spec: ContractVersionSpec, source: str = "") -> None:
        self.version = version
        self.spec = spec
        self.source = source
        self.features: tuple[FeatureSpec, ...] = tuple(spec.features)
        self.index: dict[str, int] = {f.name: i for i, f in enumerate(self.features)}
        self.plan = _compile_plan(spec.features)
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
        from gateway.features import kernel

        return kernel.prepare(self.plan)

    def shown(self, feature: FeatureSpec, value: object) -> str:
        """A value as errors may show it: a sensitive feature's value never appears in clear."""
        if feature.sensitive:
            return "a withheld value (sensitive feature)"
        return repr(value)


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
