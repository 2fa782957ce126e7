"""The candidate's service level at a rollout's step (``adaptation.rollout.slo``): its
attempts, counted by the router, judged against an error rate and a latency quantile."""

from __future__ import annotations

from gateway.evaluation.stats import binomial_upper_tail
from gateway.routing import VariantHealth
from gateway.settings import RolloutSlo

__all__ = ["slo_breach"]


def slo_breach(slo: RolloutSlo, health: VariantHealth) -> str:
    """How ``health`` breaches ``slo``, or "". A rate breaches when so many failures (or slow
    answers) would be unlikely at its limit: the chance of as many or more, attempts being
    independent, is below (1 - confidence) / 2 (the exact interval's low end lies above the
    limit). Judged from ``slo.min_requests`` attempts on."""
    if health.attempts < slo.min_requests:
        return ""
    level = (1 - slo.confidence) / 2
    if slo.max_error_rate is not None:
        chance = binomial_upper_tail(health.failed, health.attempts, slo.max_error_rate)
        if chance < level:
            return (
                f"{health.failed} of {health.attempts} attempts failed "
                f"({health.failed / health.attempts:.1%}; as many at max_error_rate "
                f"{slo.max_error_rate:.1%}: a chance of {chance:.2g})"
            )
    if slo.max_latency_ms is not None and health.answered >= slo.min_requests:
        allowed = 1 - slo.latency_quantile
        chance = binomial_upper_tail(health.slow, health.answered, allowed)
        if chance < level:
            return (
                f"{health.slow} of {health.answered} answers slower than "
                f"{slo.max_latency_ms:g} ms ({health.slow / health.answered:.1%}; the "
                f"latency_quantile {slo.latency_quantile:g} allows {allowed:.1%}: a chance "
                f"of {chance:.2g})"
            )
    return ""
