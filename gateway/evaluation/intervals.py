"""One-sided intervals for the quality alert rules: each quality metric of labelled rows with
the bounds a rule compares with its threshold, so a rule fires on evidence, not noise.

- AUC: Hanley and McNeil's (1982) standard error, normal bounds;
- log loss: the mean of per-row losses, normal bounds (the central limit theorem: rows are
  taken as independent);
- accuracy: Wilson's score interval;
- ECE (10 equal-width bins): a seeded percentile bootstrap (200 resamples). ECE is biased
  upwards on few rows, and the bootstrap does not remove that: give its rules enough rows.

``confidence`` is one-sided: the lower bound is exceeded with that probability, and so is the
upper one; 0.5 gives the point estimate for both.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
from numpy.typing import NDArray

__all__ = ["auc", "quality_interval"]

_BOOTSTRAP = 200
_BINS = 10


def quality_interval(
    metric: str, labels: NDArray[np.bool_], scores: NDArray[np.float64], confidence: float
) -> tuple[float, float, float]:
    """(estimate, lower, upper) of ``metric`` over labelled rows; needs both classes."""
    z = NormalDist().inv_cdf(confidence)
    n = int(labels.size)
    if metric == "auc":
        positives = int(labels.sum())
        a = auc(labels, scores)
        q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
        negatives = n - positives
        variance = (
            a * (1 - a) + (positives - 1) * (q1 - a * a) + (negatives - 1) * (q2 - a * a)
        ) / (positives * negatives)
        half = z * math.sqrt(max(variance, 0.0))
        return a, a - half, a + half
    if metric == "log_loss":
        p = np.clip(scores, 1e-7, 1 - 1e-7)
        losses = -np.where(labels, np.log(p), np.log(1 - p))
        mean = float(losses.mean())
        half = z * float(losses.std(ddof=1)) / math.sqrt(n) if n > 1 else math.inf
        return mean, mean - half, mean + half
    if metric == "accuracy":
        p_hat = float(np.mean((scores >= 0.5) == labels))
        centre = (p_hat + z * z / (2 * n)) / (1 + z * z / n)
        half = z * math.sqrt(p_hat * (1 - p_hat) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        return p_hat, centre - half, centre + half
    if metric == "ece":
        estimate = float(_ece(labels, scores, np.arange(n)[None, :])[0])
        resamples = np.random.default_rng(0).integers(0, n, size=(_BOOTSTRAP, n))
        spread = _ece(labels, scores, resamples)
        lower, upper = np.quantile(spread, [1 - confidence, confidence])
        return estimate, float(lower), float(upper)
    raise ValueError(f"no interval for metric {metric!r}")


def auc(labels: NDArray[np.bool_], scores: NDArray[np.float64]) -> float:
    """Mann-Whitney U over ranks, ties given their average rank."""
    positives = int(labels.sum())
    negatives = int(labels.size) - positives
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    _, first, counts = np.unique(scores[order], return_index=True, return_counts=True)
    ranks[order] = np.repeat(first + (counts + 1) / 2, counts)
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def _ece(
    labels: NDArray[np.bool_], scores: NDArray[np.float64], picks: NDArray[np.int64]
) -> NDArray[np.float64]:
    """Expected calibration error of each row of ``picks`` (indices of rows)."""
    resamples, n = picks.shape
    bins = np.minimum((scores * _BINS).astype(np.int64), _BINS - 1)
    flat = (bins[picks] + _BINS * np.arange(resamples)[:, None]).ravel()
    size = resamples * _BINS
    scored = np.bincount(flat, weights=scores[picks].ravel(), minlength=size)
    observed = np.bincount(flat, weights=labels[picks].ravel().astype(np.float64), minlength=size)
    gaps = np.abs(scored - observed).reshape(resamples, _BINS)
    return np.asarray(gaps.sum(axis=1) / n, dtype=np.float64)
