"""Stage 3, the kernel plan: a contract version compiled to flat arrays, and the codes in them.

This module is the one definition of every code the assembly kernel reads or returns: the
native kernel (native/_features_c.pyx) and its Python twin (_kernel_py.py) both run the plan
built here, and a test checks the native constants against these.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

import numpy as np
from numpy.typing import NDArray

from gateway.features.spec import (
    BucketizeStep,
    ClipStep,
    FeatureSpec,
    NullDefault,
    StandardizeStep,
    Step,
)

__all__ = ["KernelPlan", "compile_plan"]

# Kernel codes: the native kernel and its Python twin read the same plan.
NUMERIC, CATEGORICAL = 0, 1
RANGE_NONE, RANGE_REJECT, RANGE_CLIP, RANGE_FLAG = 0, 1, 2, 3
STEP_STANDARDIZE, STEP_LOG1P, STEP_CLIP, STEP_BUCKETIZE = 1, 2, 3, 4
RANGE_CODES: Final = {"reject": RANGE_REJECT, "clip": RANGE_CLIP, "flag": RANGE_FLAG}

# Errors the kernel returns as (feature, row, code).
ERROR_NULL_REJECTED, ERROR_OUT_OF_RANGE, ERROR_NOT_BYTES = 1, 2, 3
# Columns of a feature's coverage counts, in gateway.types.OUTCOMES order.
COUNT_PRESENT, COUNT_DEFAULTED, COUNT_OUT_OF_RANGE, COUNT_OOV = 0, 1, 2, 3


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


def compile_plan(features: list[FeatureSpec]) -> KernelPlan:
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
            range_policy.append(RANGE_CODES[feature.range.policy])
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
    if isinstance(step, StandardizeStep):
        return STEP_STANDARDIZE, step.standardize.mean, step.standardize.std, []
    if isinstance(step, ClipStep):
        return STEP_CLIP, step.clip.min, step.clip.max, []
    assert isinstance(step, BucketizeStep)
    return STEP_BUCKETIZE, 0.0, 0.0, list(step.bucketize.boundaries)
