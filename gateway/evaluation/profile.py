"""Distribution profiles: the reference a model was trained on, and how far serving drifted.

A reference profile (``<model>/reference.json`` in the model repository, written from the
training data) holds per feature:

- numeric: 101 quantiles, decile bin edges with the share of rows per bin, min / max, the
  share missing;
- categorical: the share of each category.

Drift compares a sample with it: PSI over the reference bins (categories) for every feature,
then a second measure suited to the type: Wasserstein-1 (from quantiles, in units of the
reference's standard deviation) for numbers, Jensen-Shannon divergence (base 2, 0..1) for
categories. Also the share of values outside the reference range, or out of its vocabulary.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "REFERENCE_FILE",
    "categorical_drift",
    "categorical_profile",
    "load_reference",
    "numeric_drift",
    "numeric_profile",
    "psi",
    "write_reference",
]

REFERENCE_FILE = "reference.json"
_QUANTILES = np.linspace(0.0, 1.0, 101)
_SHOWN_QUANTILES = (5, 25, 50, 75, 95)  # of the 101 kept, those a report shows
_SHOWN_CATEGORIES = 10
_EPS = 1e-4  # floor of a bin's share in PSI / JS: an empty bin must not give infinity


def numeric_profile(values: Iterable[float] | NDArray[Any]) -> dict[str, Any]:
    data = np.asarray(values, dtype=np.float64)
    finite = data[np.isfinite(data)]
    if finite.size == 0:
        return {"kind": "numeric", "count": int(data.size), "missing": 1.0}
    deciles = np.quantile(finite, _QUANTILES[10:-10:10])
    edges = np.unique(deciles)  # discrete features repeat edges
    counts = np.bincount(np.searchsorted(edges, finite, side="right"), minlength=edges.size + 1)
    return {
        "kind": "numeric",
        "count": int(data.size),
        "missing": float(1 - finite.size / data.size),
        "min": float(finite.min()),
        "max": float(finite.max()),
        "mean": float(finite.mean()),
        "std": float(finite.std()),
        "quantiles": np.quantile(finite, _QUANTILES).tolist(),
        "edges": edges.tolist(),
        "fractions": (counts / finite.size).tolist(),
    }


def categorical_profile(values: Iterable[object]) -> dict[str, Any]:
    items = [_category(v) for v in values]
    present = [v for v in items if v]
    counts = Counter(present)
    total = max(len(present), 1)
    return {
        "kind": "categorical",
        "count": len(items),
        "missing": float(1 - len(present) / max(len(items), 1)),
        "frequencies": {k: c / total for k, c in sorted(counts.items())},
    }


def psi(expected: NDArray[np.float64], actual: NDArray[np.float64]) -> float:
    """Population stability index of two share vectors over the same bins."""
    e = np.clip(expected, _EPS, None)
    a = np.clip(actual, _EPS, None)
    return float(np.sum((a - e) * np.log(a / e)))


def numeric_drift(profile: Mapping[str, Any], values: NDArray[np.float64]) -> dict[str, Any]:
    finite = values[np.isfinite(values)]
    n = int(finite.size)
    result: dict[str, Any] = {
        "count": n,
        "missing": float(1 - n / values.size) if values.size else 0.0,
    }
    if n == 0 or "edges" not in profile:
        return result
    edges = np.asarray(profile["edges"])
    counts = np.bincount(np.searchsorted(edges, finite, side="right"), minlength=edges.size + 1)
    reference_q = np.asarray(profile["quantiles"])
    scale = profile["std"] or 1.0
    quantiles = np.quantile(finite, _QUANTILES)
    result.update(
        psi=psi(np.asarray(profile["fractions"]), counts / n),
        wasserstein=float(np.mean(np.abs(quantiles - reference_q)) / scale),
        out_of_range=float(np.mean((finite < profile["min"]) | (finite > profile["max"]))),
        mean=float(finite.mean()),
    )
    # The distribution itself, beside the reference's: quantiles, and shares per reference bin.
    result["quantiles"] = {f"p{q:02d}": float(quantiles[q]) for q in _SHOWN_QUANTILES}
    result["reference_quantiles"] = {f"p{q:02d}": float(reference_q[q]) for q in _SHOWN_QUANTILES}
    result["histogram"] = (counts / n).tolist()
    return result


def categorical_drift(profile: Mapping[str, Any], values: Iterable[object]) -> dict[str, Any]:
    items = [_category(v) for v in values]
    present = [v for v in items if v]
    n = len(present)
    result: dict[str, Any] = {"count": n, "missing": float(1 - n / len(items)) if items else 0.0}
    if n == 0:
        return result
    reference: Mapping[str, float] = profile["frequencies"]
    counts = Counter(present)
    oov = sum(c for k, c in counts.items() if k not in reference)
    categories = sorted(reference)
    expected = np.array([reference[c] for c in categories] + [0.0])
    actual = np.array([counts.get(c, 0) / n for c in categories] + [oov / n])
    result.update(psi=psi(expected, actual), js=_jensen_shannon(expected, actual), oov=oov / n)
    top = counts.most_common(_SHOWN_CATEGORIES)
    result["frequencies"] = {k: c / n for k, c in top}
    result["reference_frequencies"] = {k: float(reference.get(k, 0.0)) for k, _ in top}
    return result


def _jensen_shannon(p: NDArray[np.float64], q: NDArray[np.float64]) -> float:
    m = (p + q) / 2

    def kl(a: NDArray[np.float64], b: NDArray[np.float64]) -> float:
        mask = a > 0
        return float(np.sum(a[mask] * np.log2(a[mask] / b[mask])))

    return max(0.0, (kl(p, m) + kl(q, m)) / 2)


def _category(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, float) and math.isnan(value):
        return ""
    return str(value)


def write_reference(path: Path, reference: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(reference, indent=1, sort_keys=True) + "\n")


def load_reference(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data
