"""Intervals for canary verdicts: how far a candidate's metric may lie from the stable one's,
given the rows (or requests) each was measured on. Pure numpy; each function states what it
assumes.

Every difference is candidate minus stable, with a two-sided interval at ``confidence``:

* AUC: DeLong's variance (DeLong, DeLong & Clarke-Pearson 1988, computed with midranks as in
  Sun & Xu 2014), paired when both versions scored the same labelled rows, unpaired otherwise;
  a normal interval around the difference.
* Log loss, accuracy: means of per-row values; a normal interval (rows independent, means
  near normal by the central limit theorem). Accuracy adds pseudo-counts (Agresti-Caffo
  unpaired, Agresti-Min paired) so a sample with no errors still has a width.
* Latency percentiles: distribution-free order-statistic intervals (no shape assumed,
  requests independent), one per version, combined into one for the difference.
* Cost per row (a ratio of sums over requests): a normal interval by the delta method.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "Difference",
    "accuracy_difference",
    "auc_difference",
    "binomial_upper_tail",
    "delong",
    "log_loss_difference",
    "min_samples_for_quantile",
    "normal_difference",
    "quantile_difference",
    "quantile_interval",
    "ratio_difference",
    "scale_to_decide",
]

Floats = NDArray[np.float64]
Bools = NDArray[np.bool_]


@dataclass(frozen=True)
class Difference:
    """candidate - stable: the estimate, its interval and (for normal intervals) its
    standard error; ``paired`` when both were measured on the same rows."""

    estimate: float
    low: float
    high: float
    se: float | None
    paired: bool


def z_value(confidence: float) -> float:
    """The standard normal quantile of a two-sided interval at ``confidence``."""
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def normal_difference(estimate: float, se: float, confidence: float, paired: bool) -> Difference:
    half = z_value(confidence) * se
    return Difference(estimate, estimate - half, estimate + half, se, paired)


def binomial_upper_tail(k: int, n: int, p: float) -> float:
    """P(B >= k), B ~ Binomial(n, p): how likely ``k`` or more events in ``n`` independent
    trials are at rate ``p``. Below (1 - c) / 2 exactly when the low end of the exact
    (Clopper-Pearson) interval at confidence c for k / n lies above ``p``.

    Summed term by term from ``k`` away from the mean, where the terms only shrink, until they
    no longer count: O(sqrt(n)) terms, never an array of n (it runs on the event loop)."""
    if k <= 0:
        return 1.0
    if k > n or p <= 0:
        return 0.0
    if p >= 1:
        return 1.0
    if k - 1 < n * p:  # below the mean: 1 - P(B <= k - 1), summed down from k - 1
        return max(0.0, 1.0 - _pmf_sum(n, p, k - 1, down=True))
    return min(1.0, _pmf_sum(n, p, k, down=False))


def _pmf_sum(n: int, p: float, start: int, down: bool) -> float:
    """P(B = start) + the terms beyond it, walking away from the mean (each smaller)."""
    log_term = (
        math.lgamma(n + 1)
        - math.lgamma(start + 1)
        - math.lgamma(n - start + 1)
        + start * math.log(p)
        + (n - start) * math.log1p(-p)
    )
    term = math.exp(log_term)
    odds = p / (1 - p)
    total, i = 0.0, start
    while term > 0.0:
        total += term
        if term < total * 1e-17:
            break
        if down:
            if i == 0:
                break
            term *= i / ((n - i + 1) * odds)
            i -= 1
        else:
            if i == n:
                break
            term *= (n - i) / (i + 1) * odds
            i += 1
    return total


def _midranks(x: Floats) -> Floats:
    """1-based ranks, ties given their average rank."""
    order = np.argsort(x, kind="mergesort")
    _, first, counts = np.unique(x[order], return_index=True, return_counts=True)
    ranks = np.empty(len(x))
    ranks[order] = np.repeat(first + (counts + 1) / 2, counts)
    return ranks


def delong(labels: Bools, scores: Floats) -> tuple[float, Floats, Floats]:
    """AUC and DeLong's structural components: for each positive, the share of negatives it
    outranks (``v10``); for each negative, the share of positives that outrank it (``v01``);
    ties count a half. Needs a positive and a negative."""
    positives, negatives = scores[labels], scores[~labels]
    m, n = len(positives), len(negatives)
    all_ranks = _midranks(np.concatenate([positives, negatives]))
    v10 = (all_ranks[:m] - _midranks(positives)) / n
    v01 = 1.0 - (all_ranks[m:] - _midranks(negatives)) / m
    return float(v10.mean()), v10, v01


def _covariance(a: Floats, b: Floats) -> float:
    return float(np.cov(a, b)[0, 1]) if len(a) > 1 else 0.0


def auc_difference(
    stable: tuple[Bools, Floats],
    candidate: tuple[Bools, Floats],
    confidence: float,
    paired: bool,
) -> Difference:
    """AUC(candidate) - AUC(stable) with DeLong's variance. ``paired``: the two score the same
    rows in the same order (the labels are the stable's), and the covariance of the two AUCs
    is taken off."""
    auc_s, v10_s, v01_s = delong(*stable)
    auc_c, v10_c, v01_c = delong(*candidate)
    m, n = len(v10_s), len(v01_s)

    def variance(v10: Floats, v01: Floats) -> float:
        return _covariance(v10, v10) / len(v10) + _covariance(v01, v01) / len(v01)

    var = variance(v10_s, v01_s) + variance(v10_c, v01_c)
    if paired:
        var -= 2 * (_covariance(v10_s, v10_c) / m + _covariance(v01_s, v01_c) / n)
    return normal_difference(auc_c - auc_s, math.sqrt(max(var, 0.0)), confidence, paired)


def _mean_difference(
    stable: Floats, candidate: Floats, confidence: float, paired: bool
) -> Difference:
    """Mean(candidate) - mean(stable): per-row differences when paired, Welch's standard error
    otherwise."""
    if paired:
        d = candidate - stable
        se = math.sqrt(float(d.var(ddof=1)) / len(d)) if len(d) > 1 else 0.0
        return normal_difference(float(d.mean()), se, confidence, paired)
    var = sum(float(x.var(ddof=1)) / len(x) if len(x) > 1 else 0.0 for x in (stable, candidate))
    return normal_difference(
        float(candidate.mean() - stable.mean()), math.sqrt(var), confidence, paired
    )


def row_log_loss(labels: Bools, scores: Floats) -> Floats:
    p = np.clip(scores, 1e-7, 1 - 1e-7)
    return -np.where(labels, np.log(p), np.log(1 - p))


def log_loss_difference(
    stable: tuple[Bools, Floats],
    candidate: tuple[Bools, Floats],
    confidence: float,
    paired: bool,
) -> Difference:
    """Log loss (scores clipped to [1e-7, 1 - 1e-7], as the report's) of the candidate minus
    the stable's, a normal interval over the per-row losses."""
    return _mean_difference(row_log_loss(*stable), row_log_loss(*candidate), confidence, paired)


def accuracy_difference(
    stable: tuple[Bools, Bools],
    candidate: tuple[Bools, Bools],
    confidence: float,
    paired: bool,
) -> Difference:
    """Accuracy of the candidate minus the stable's, from each row's (label, predicted label).

    Unpaired: Agresti-Caffo (a success and a failure added to each version). Paired:
    Agresti-Min (half a row added to each cell of the 2x2 agreement table). The estimate is
    the plain difference; the pseudo-counts only centre and widen the interval."""
    right_s = stable[0] == stable[1]
    right_c = candidate[0] == candidate[1]
    estimate = float(right_c.mean() - right_s.mean())
    z = z_value(confidence)
    if paired:
        n = len(right_s) + 2.0
        gained = float(np.sum(right_c & ~right_s)) + 0.5
        lost = float(np.sum(~right_c & right_s)) + 0.5
        centre = (gained - lost) / n
        se = math.sqrt(max((gained + lost) - (gained - lost) ** 2 / n, 0.0)) / n
    else:
        ns, nc = len(right_s) + 2.0, len(right_c) + 2.0
        ps, pc = (float(right_s.sum()) + 1) / ns, (float(right_c.sum()) + 1) / nc
        centre = pc - ps
        se = math.sqrt(ps * (1 - ps) / ns + pc * (1 - pc) / nc)
    return Difference(estimate, centre - z * se, centre + z * se, se, paired)


def _log_binomial_cdf(n: int, p: float) -> Floats:
    """P(B <= k) for k = 0 .. n, B ~ Binomial(n, p), from log factorials (float64 is exact
    enough for any n a window holds)."""
    k = np.arange(n + 1)
    log_fact = np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, n + 1)))])
    log_pmf = log_fact[n] - log_fact[k] - log_fact[n - k] + k * math.log(p)
    log_pmf += (n - k) * math.log1p(-p)
    cdf: Floats = np.minimum(np.cumsum(np.exp(log_pmf)), 1.0)
    return cdf


def quantile_interval(samples: Floats, p: float, confidence: float) -> tuple[float, float] | None:
    """A distribution-free interval for the ``p`` quantile: order statistics X(l) <= X(u)
    chosen so P(X(l) <= q <= X(u)) = P(l <= B < u) >= confidence, B ~ Binomial(n, p), for any
    continuous distribution of independent samples. None when n is too small for one."""
    n = len(samples)
    tail = (1 - confidence) / 2
    if n < min_samples_for_quantile(p, confidence):
        return None
    cdf = _log_binomial_cdf(n, p)  # cdf[k] = P(B <= k)
    # l: the largest with P(B < l) <= tail; u: the smallest with P(B < u) >= 1 - tail.
    lower = int(np.searchsorted(cdf, tail, side="right"))  # P(B <= l - 1) <= tail
    upper = int(np.searchsorted(cdf, 1 - tail, side="left")) + 1
    if lower < 1 or upper > n:
        return None  # at the edge of min_samples_for_quantile, by rounding
    ordered = np.sort(samples)
    return float(ordered[lower - 1]), float(ordered[upper - 1])


def min_samples_for_quantile(p: float, confidence: float) -> int:
    """The fewest samples for which ``quantile_interval`` exists: the largest sample must
    still leave a tail of at most (1 - confidence) / 2 above it (and the smallest below)."""
    tail = (1 - confidence) / 2
    return math.ceil(math.log(tail) / math.log(max(p, 1 - p)))


def quantile_difference(
    stable: Floats, candidate: Floats, p: float, confidence: float
) -> Difference | None:
    """The ``p`` quantile of the candidate minus the stable's: each version's order-statistic
    interval at sqrt(confidence), so both hold together with probability >= confidence
    (independent samples) and then so does [low_c - high_s, high_c - low_s]. None when a
    version has too few samples."""
    each = math.sqrt(confidence)
    s, c = quantile_interval(stable, p, each), quantile_interval(candidate, p, each)
    if s is None or c is None:
        return None
    estimate = float(np.quantile(candidate, p) - np.quantile(stable, p))
    return Difference(estimate, c[0] - s[1], c[1] - s[0], None, False)


def ratio_difference(
    stable: tuple[Floats, Floats], candidate: tuple[Floats, Floats], confidence: float
) -> Difference:
    """sum(numerator) / sum(denominator) of the candidate minus the stable's (cost per row
    over requests), a normal interval by the delta method: the ratio's variance is that of
    the mean residual numerator - ratio * denominator over the mean denominator squared."""
    estimate, var = 0.0, 0.0
    for sign, (num, den) in ((-1.0, stable), (1.0, candidate)):
        ratio = float(num.sum() / den.sum())
        residual = num - ratio * den
        if len(num) > 1:
            var += float(residual.var(ddof=1)) / len(num) / float(den.mean()) ** 2
        estimate += sign * ratio
    return normal_difference(estimate, math.sqrt(var), confidence, False)


def scale_to_decide(
    regression: Difference, margin: float, confidence: float, power: float
) -> float | None:
    """How many times the current sample would decide the criterion with probability
    ``power`` if the estimate were the truth: the interval must shrink (as 1 / sqrt(n)) until
    it lies on one side of the margin. None when the estimate sits on the margin (no sample
    size decides it) or the interval has no width to shrink."""
    z = z_value(confidence)
    half = (regression.high - regression.low) / 2
    gap = abs(margin - regression.estimate)
    if gap == 0 or half == 0:
        return None
    se = half / z
    return max(((z + NormalDist().inv_cdf(power)) * se / gap) ** 2, 1.0)
