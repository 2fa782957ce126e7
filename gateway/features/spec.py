"""Stage 3, the contract file: ``features.yaml``'s schema, validated by pydantic.

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

import itertools
import math
import re
from typing import Annotated, Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "ACCEPTED_DATATYPES",
    "ADVERTISED_DATATYPE",
    "ContractFile",
    "ContractVersionSpec",
    "FeatureSpec",
    "NullDefault",
    "Range",
    "Step",
]

_VERSION = re.compile(r"^v[1-9][0-9]*$")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")

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


class StandardizeStep(_Strict):
    standardize: _Standardize


class ClipStep(_Strict):
    clip: _Clip


class BucketizeStep(_Strict):
    bucketize: _Bucketize


Step = Literal["identity", "log1p"] | StandardizeStep | ClipStep | BucketizeStep


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
