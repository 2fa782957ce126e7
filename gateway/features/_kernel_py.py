"""Feature assembly kernel, pure-Python/numpy reference: the specification of native/_features_c.

``run(prepared, columns, rows, out, counts)`` fills ``out`` (float32 [rows, width], zeroed by
the caller) and ``counts`` (int64 [features, 4], columns ``COUNT_*``: present, defaulted,
out_of_range, oov) from one column per feature, in contract order:

* numeric: a float64 array of ``rows`` values, NaN meaning null; or None (every row null);
* categorical: an object array of ``bytes`` (or None), or the raw OIP BYTES buffer of the
  ``rows`` values (4-byte little-endian lengths, each followed by the value; as the wire
  carries them, already checked), ``b""``/None meaning null; or None.

A bad value fails the run, returned as ``(feature, row, code)`` for the lowest bad row (the
first feature in contract order among those bad in that row): ``ERROR_NULL_REJECTED``,
``ERROR_OUT_OF_RANGE`` (reject policy) or ``ERROR_NOT_BYTES`` (a categorical element that is
neither bytes nor None); every code is _plan's. ``None`` means success; after a failure ``out``
and ``counts`` are unspecified. Numeric columns may be float64, float32, int64, int32 or bool
arrays.

Numeric per row: null -> default (counted ``defaulted``, no range check) else ``present``, and
outside [lo, hi] -> rejected / clipped / flagged (counted ``out_of_range``); then the steps:
standardize ``(v - mean) / std``; log1p as C's ``log1p`` (-inf at -1, NaN below); clip;
bucketize = the number of boundaries <= v (NaN -> 0). The float64 result is cast to float32.
Categorical per row: null -> the default bucket (``defaulted``), else the value's bucket (its
vocabulary position + 1, or 0 counted ``oov``): one-hot writes 1.0 in column ``offset +
bucket``, index writes the bucket number.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from gateway import _hotloops_py
from gateway.features._plan import (
    CATEGORICAL,
    COUNT_DEFAULTED,
    COUNT_OOV,
    COUNT_OUT_OF_RANGE,
    COUNT_PRESENT,
    ERROR_NOT_BYTES,
    ERROR_NULL_REJECTED,
    ERROR_OUT_OF_RANGE,
    RANGE_CLIP,
    RANGE_NONE,
    RANGE_REJECT,
    STEP_BUCKETIZE,
    STEP_CLIP,
    STEP_LOG1P,
    STEP_STANDARDIZE,
    KernelPlan,
)

Error = tuple[int, int, int] | None


class Prepared:
    """The plan with a dict per vocabulary (the native kernel builds hash tables instead)."""

    def __init__(self, plan: KernelPlan) -> None:
        self.plan = plan
        self.lookups = [
            None if values is None else {v: i + 1 for i, v in enumerate(values)}
            for values in plan.vocab
        ]


def prepare(plan: KernelPlan) -> Prepared:
    return Prepared(plan)


def _log1p(x: float) -> float:
    if x > -1.0:
        return math.log1p(x)
    return -math.inf if x == -1.0 else math.nan


def _steps(plan: KernelPlan, f: int, v: NDArray[np.float64]) -> NDArray[np.float64]:
    start = int(plan.step_start[f])
    for s in range(start, start + int(plan.step_count[f])):
        code, a, b = int(plan.step_code[s]), float(plan.step_a[s]), float(plan.step_b[s])
        if code == STEP_STANDARDIZE:
            v = (v - a) / b
        elif code == STEP_LOG1P:
            v = np.array([_log1p(x) for x in v.tolist()], dtype=np.float64)
        elif code == STEP_CLIP:
            v = np.where(v < a, a, np.where(v > b, b, v))
        elif code == STEP_BUCKETIZE:
            first = int(plan.bound_start[s])
            edges = plan.bounds[first : first + int(plan.bound_count[s])]
            buckets = np.searchsorted(edges, v, side="right").astype(np.float64)
            v = np.where(np.isnan(v), 0.0, buckets)
    return v


def _numeric(
    plan: KernelPlan,
    f: int,
    column: NDArray[np.float64] | None,
    rows: int,
    out: NDArray[np.float32],
    counts: NDArray[np.int64],
) -> Error:
    v = np.full(rows, np.nan) if column is None else np.array(column, dtype=np.float64)
    null = np.isnan(v)
    policy = int(plan.range_policy[f])
    lo, hi = float(plan.range_lo[f]), float(plan.range_hi[f])
    outside = ~null & ((v < lo) | (v > hi)) if policy != RANGE_NONE else np.zeros(rows, bool)
    bad = np.zeros(rows, dtype=bool)
    if plan.null_reject[f]:
        bad |= null
    if policy == RANGE_REJECT:
        bad |= outside
    if bad.any():
        row = int(np.argmax(bad))
        return f, row, ERROR_NULL_REJECTED if null[row] else ERROR_OUT_OF_RANGE
    counts[f, COUNT_PRESENT] += int(rows - null.sum())
    counts[f, COUNT_DEFAULTED] += int(null.sum())
    counts[f, COUNT_OUT_OF_RANGE] += int(outside.sum())
    v[null] = plan.defaults[f]
    if policy == RANGE_CLIP:
        v = np.where(outside & (v < lo), lo, np.where(outside & (v > hi), hi, v))
    out[:, int(plan.offsets[f])] = _steps(plan, f, v).astype(np.float32)
    return None


def _categorical(
    prepared: Prepared,
    f: int,
    column: NDArray[Any] | bytes | None,
    rows: int,
    out: NDArray[np.float32],
    counts: NDArray[np.int64],
) -> Error:
    plan = prepared.plan
    if isinstance(column, bytes):
        values = np.empty(rows, dtype=object)
        values[:] = _hotloops_py.decode_bytes(column, rows)
        column = values
    lookup = prepared.lookups[f]
    assert lookup is not None
    reject = bool(plan.null_reject[f])
    default = int(plan.defaults[f])
    buckets = np.empty(rows, dtype=np.int64)
    present = defaulted = oov = 0
    for row in range(rows):
        item = None if column is None else column[row]
        if item is None or item == b"":
            if item is not None and not isinstance(item, bytes):
                return f, row, ERROR_NOT_BYTES
            if reject:
                return f, row, ERROR_NULL_REJECTED
            buckets[row] = default
            defaulted += 1
            continue
        if not isinstance(item, bytes):
            return f, row, ERROR_NOT_BYTES
        bucket = lookup.get(item, 0)
        buckets[row] = bucket
        present += 1
        oov += bucket == 0
    counts[f, COUNT_PRESENT] += present
    counts[f, COUNT_DEFAULTED] += defaulted
    counts[f, COUNT_OOV] += oov
    offset = int(plan.offsets[f])
    if plan.one_hot[f]:
        out[np.arange(rows), offset + buckets] = 1.0
    else:
        out[:, offset] = buckets.astype(np.float32)
    return None


def gather(
    index: dict[str, int],
    accepted: tuple[frozenset[str], ...],
    tensors: Sequence[Any],
    ignore_unknown: bool,
    n_features: int,
) -> tuple[list[Any], int] | None:
    """The native kernel's shortcut for gathering a request's columns; here every request
    goes through Contract.assemble's own loop, the reference."""
    return None


def run(
    prepared: Prepared,
    columns: list[Any],
    rows: int,
    out: NDArray[np.float32],
    counts: NDArray[np.int64],
) -> Error:
    plan = prepared.plan
    errors = []
    # IEEE results, as C gives them: overflow to inf, inf - inf to NaN, without warnings.
    with np.errstate(all="ignore"):
        for f in range(plan.features):
            if plan.kinds[f] == CATEGORICAL:
                error = _categorical(prepared, f, columns[f], rows, out, counts)
            else:
                error = _numeric(plan, f, columns[f], rows, out, counts)
            if error is not None:
                errors.append(error)
    if not errors:
        return None
    return min(errors, key=lambda e: (e[1], e[0]))
