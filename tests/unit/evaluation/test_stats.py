"""The verdict's statistics against independent computations: brute-force AUC and DeLong
components, textbook formulas, exact binomial sums, and the coverage their intervals claim
measured by simulation (seeded)."""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import pytest

from gateway.evaluation import stats


def brute_components(
    labels: np.ndarray, scores: np.ndarray
) -> tuple[float, np.ndarray, np.ndarray]:
    """AUC and DeLong's components by comparing every positive with every negative."""
    positives, negatives = scores[labels], scores[~labels]
    psi = (positives[:, None] > negatives[None, :]) + 0.5 * (
        positives[:, None] == negatives[None, :]
    )
    return float(psi.mean()), psi.mean(axis=1), psi.mean(axis=0)


def binormal(rng: np.random.Generator, n: int, rate: float, shift: float):
    labels = rng.random(n) < rate
    return labels, rng.normal(0, 1, n) + shift * labels


def test_delong_components_match_every_pair_compared_ties_included():
    rng = np.random.default_rng(1)
    labels = rng.random(300) < 0.2
    scores = np.round(rng.normal(0, 1, 300) + labels, 1)  # rounding makes ties
    auc, v10, v01 = stats.delong(labels, scores)
    want_auc, want_v10, want_v01 = brute_components(labels, scores)
    assert auc == pytest.approx(want_auc, abs=1e-12)
    np.testing.assert_allclose(v10, want_v10, atol=1e-12)
    np.testing.assert_allclose(v01, want_v01, atol=1e-12)


def test_a_small_auc_difference_by_hand():
    # positives 0.9, 0.6; negatives 0.7, 0.2: 3 of 4 pairs ordered, AUC 0.75.
    labels = np.array([True, True, False, False])
    stable = np.array([0.9, 0.6, 0.7, 0.2])
    candidate = np.array([0.9, 0.8, 0.7, 0.2])  # every pair ordered: AUC 1
    paired = stats.auc_difference((labels, stable), (labels, candidate), 0.95, paired=True)
    assert paired.estimate == pytest.approx(0.25)
    # Components: stable v10 (1, .5), v01 (.5, 0); candidate v10 (1, 1), v01 (0, 0).
    # var = var(v10_s - v10_c)/2 + var(v01_s - v01_c)/2 = 0.125/2 + 0.125/2
    assert paired.se == pytest.approx(math.sqrt(0.125))
    unpaired = stats.auc_difference((labels, stable), (labels, candidate), 0.95, paired=False)
    assert unpaired.se == pytest.approx(math.sqrt(0.125 / 2 + 0.125 / 2))


def test_identical_scores_on_the_same_rows_differ_by_exactly_nothing():
    rng = np.random.default_rng(2)
    labels, scores = binormal(rng, 500, 0.1, 1.0)
    d = stats.auc_difference((labels, scores), (labels, scores.copy()), 0.95, paired=True)
    assert (d.estimate, d.low, d.high) == (0.0, 0.0, 0.0)
    assert d.paired


def test_delong_variance_matches_the_spread_of_auc_over_repeated_samples():
    rng = np.random.default_rng(3)
    aucs, ses = [], []
    for _ in range(300):  # the se of AUC - 1 against a two-row version without variance
        labels, scores = binormal(rng, 600, 0.1, 1.0)
        aucs.append(stats.delong(labels, scores)[0])
        zero = (np.array([True, False]), np.array([1.0, 0.0]))
        ses.append(stats.auc_difference(zero, (labels, scores), 0.95, paired=False).se or 0.0)
    assert np.median(ses) == pytest.approx(np.std(aucs, ddof=1), rel=0.12)


@pytest.mark.parametrize("paired", [False, True])
def test_auc_difference_intervals_cover_the_truth_at_their_confidence(paired: bool):
    rng = np.random.default_rng(4 + paired)
    covered, trials = 0, 400
    for _ in range(trials):
        labels, base = binormal(rng, 800, 0.15, 1.0)
        if paired:
            # two scorers of the same rows, correlated, with equal true AUC
            a = base + rng.normal(0, 0.5, 800)
            b = base + rng.normal(0, 0.5, 800)
            d = stats.auc_difference((labels, a), (labels, b), 0.95, paired=True)
        else:
            other = binormal(rng, 800, 0.15, 1.0)
            d = stats.auc_difference((labels, base), other, 0.95, paired=False)
        covered += d.low <= 0.0 <= d.high
    assert 0.92 <= covered / trials <= 0.98


def test_pairing_narrows_the_interval_of_correlated_scorers():
    rng = np.random.default_rng(6)
    labels, base = binormal(rng, 2000, 0.1, 1.0)
    a, b = base + rng.normal(0, 0.3, 2000), base + rng.normal(0, 0.3, 2000)
    paired = stats.auc_difference((labels, a), (labels, b), 0.95, paired=True)
    unpaired = stats.auc_difference((labels, a), (labels, b), 0.95, paired=False)
    assert paired.estimate == unpaired.estimate
    assert paired.se is not None and unpaired.se is not None
    assert paired.se < unpaired.se / 2


def test_log_loss_difference_is_welch_unpaired_and_per_row_paired():
    rng = np.random.default_rng(7)
    labels = rng.random(400) < 0.2
    p_s, p_c = rng.uniform(0.01, 0.99, 400), rng.uniform(0.01, 0.99, 400)
    loss_s = -np.where(labels, np.log(p_s), np.log(1 - p_s))
    loss_c = -np.where(labels, np.log(p_c), np.log(1 - p_c))
    z = NormalDist().inv_cdf(0.975)
    unpaired = stats.log_loss_difference((labels, p_s), (labels, p_c), 0.95, paired=False)
    se = math.sqrt(loss_s.var(ddof=1) / 400 + loss_c.var(ddof=1) / 400)
    assert unpaired.estimate == pytest.approx(loss_c.mean() - loss_s.mean())
    assert (unpaired.low, unpaired.high) == pytest.approx(
        (unpaired.estimate - z * se, unpaired.estimate + z * se)
    )
    paired = stats.log_loss_difference((labels, p_s), (labels, p_c), 0.95, paired=True)
    assert paired.se == pytest.approx((loss_c - loss_s).std(ddof=1) / math.sqrt(400))


def test_accuracy_intervals_keep_a_width_when_no_row_is_wrong():
    right = np.ones(300, dtype=bool)
    unpaired = stats.accuracy_difference((right, right), (right, right), 0.95, paired=False)
    paired = stats.accuracy_difference((right, right), (right, right), 0.95, paired=True)
    for d in (unpaired, paired):
        assert d.estimate == 0.0 and d.low < 0.0 < d.high


def test_accuracy_difference_unpaired_is_agresti_caffo():
    labels = np.zeros(100, dtype=bool)
    stable_pred = np.arange(100) < 10  # 90 right
    candidate_pred = np.arange(100) < 20  # 80 right
    d = stats.accuracy_difference((labels, stable_pred), (labels, candidate_pred), 0.95, False)
    ps, pc = 91 / 102, 81 / 102
    half = NormalDist().inv_cdf(0.975) * math.sqrt(ps * (1 - ps) / 102 + pc * (1 - pc) / 102)
    assert d.estimate == pytest.approx(-0.1)
    assert (d.low, d.high) == pytest.approx((pc - ps - half, pc - ps + half))


def exact_indices(n: int, p: float, confidence: float) -> tuple[int, int]:
    """l, u by summing binomial probabilities with exact integers (math.comb)."""
    tail = (1 - confidence) / 2
    cdf = np.cumsum([math.comb(n, k) * p**k * (1 - p) ** (n - k) for k in range(n + 1)])
    lower = max(k for k in range(1, n + 1) if cdf[k - 1] <= tail)
    upper = min(u for u in range(1, n + 1) if cdf[u - 1] >= 1 - tail)
    return lower, upper


@pytest.mark.parametrize("n", [72, 100, 400])
def test_quantile_interval_picks_the_order_statistics_exact_binomial_sums_pick(n: int):
    samples = np.arange(1.0, n + 1)  # X(k) = k
    lower, upper = exact_indices(n, 0.95, 0.95)
    assert stats.quantile_interval(samples, 0.95, 0.95) == (lower, upper)


def test_quantile_interval_needs_enough_samples_for_its_extreme_order_statistic():
    needed = stats.min_samples_for_quantile(0.95, 0.95)
    assert needed == 72  # 0.95^72 < 0.025 <= 0.95^71
    assert stats.quantile_interval(np.arange(needed - 1.0), 0.95, 0.95) is None
    assert stats.quantile_interval(np.arange(float(needed)), 0.95, 0.95) is not None


def test_quantile_intervals_cover_the_true_p95_whatever_the_distribution():
    rng = np.random.default_rng(8)
    truth = -math.log(0.05)  # exponential(1)'s p95
    covered = sum(
        lo <= truth <= hi
        for lo, hi in (
            stats.quantile_interval(rng.exponential(1.0, 150), 0.95, 0.95) or (np.inf, np.inf)
            for _ in range(2000)
        )
    )
    assert covered / 2000 >= 0.94


def test_a_p95_difference_of_equal_latencies_covers_zero_at_least_at_its_confidence():
    rng = np.random.default_rng(9)
    covered, trials = 0, 1000
    for _ in range(trials):
        d = stats.quantile_difference(
            rng.lognormal(1.0, 0.5, 200), rng.lognormal(1.0, 0.5, 200), 0.95, 0.95
        )
        assert d is not None
        covered += d.low <= 0.0 <= d.high
    assert covered / trials >= 0.95


def test_cost_per_row_of_a_fixed_price_per_row_has_no_spread():
    rows = np.array([1.0, 5.0, 10.0, 3.0])
    d = stats.ratio_difference((rows * 2e-6, rows), (rows * 3e-6, rows), 0.95)
    assert d.estimate == pytest.approx(1e-6)
    assert d.high - d.low == pytest.approx(0.0, abs=1e-15)


def test_scale_to_decide_is_the_classic_sample_size_factor():
    z, z_power = NormalDist().inv_cdf(0.975), NormalDist().inv_cdf(0.8)
    d = stats.normal_difference(0.01, 0.02, 0.95, paired=False)  # margin 0.03: gap 0.02
    assert stats.scale_to_decide(d, 0.03, 0.95, 0.8) == pytest.approx((z + z_power) ** 2)
    on_margin = stats.normal_difference(0.03, 0.02, 0.95, paired=False)
    assert stats.scale_to_decide(on_margin, 0.03, 0.95, 0.8) is None
