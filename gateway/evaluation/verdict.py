"""Canary verdicts: promote, hold or rollback a candidate version against the stable one, with
the evidence (quality on labelled rows, p95 latency, cost per row, over the policy's window)."""

from __future__ import annotations

import time
from typing import Any

from gateway.evaluation.report import ALL, build_report
from gateway.evaluation.store import EventStore, window_filter
from gateway.settings import CanaryPolicy

__all__ = ["judge"]

_HIGHER_IS_BETTER = {"auc": True, "accuracy": True, "log_loss": False}


def judge(
    store: EventStore, policy: CanaryPolicy, max_events: int, now_us: int | None = None
) -> dict[str, Any]:
    now_us = now_us or time.time_ns() // 1000
    report = build_report(store, policy.model, policy.window_s, None, max_events, now_us)
    evidence = {
        role: _evidence(store, report, policy, version, now_us)
        for role, version in (("stable", policy.stable), ("candidate", policy.candidate))
    }
    verdict: dict[str, Any] = {
        "model": policy.model,
        "stable": policy.stable,
        "candidate": policy.candidate,
        "primary_metric": policy.primary_metric,
        "window_s": policy.window_s,
        "evidence": evidence,
    }
    short = [
        f"{role} version {version} has {evidence[role]['labelled']} labelled rows of the "
        f"{policy.min_samples} a verdict needs"
        for role, version in (("stable", policy.stable), ("candidate", policy.candidate))
        if evidence[role]["labelled"] < policy.min_samples
    ]
    if short:
        return {**verdict, "verdict": "hold", "reasons": short}
    failed: list[str] = []
    passed: list[str] = []
    metric = policy.primary_metric
    stable_q, candidate_q = evidence["stable"].get(metric), evidence["candidate"].get(metric)
    if stable_q is None or candidate_q is None:
        return {
            **verdict,
            "verdict": "hold",
            "reasons": [f"{metric} is undefined for a version (one class only)"],
        }
    loss = _relative(stable_q, candidate_q, higher_is_better=_HIGHER_IS_BETTER[metric])
    line = f"{metric} {candidate_q:.4f} vs {stable_q:.4f}: {loss:+.1%} regression"
    (failed if loss > policy.max_regression else passed).append(
        f"{line} (allowed {policy.max_regression:.1%})"
    )
    for name, key, allowed in (
        ("p95 latency", "p95_total_ms", policy.max_latency_regression),
        ("cost per row", "cost_per_row", policy.max_cost_regression),
    ):
        s, c = evidence["stable"][key], evidence["candidate"][key]
        if not s:
            continue  # nothing to compare with (no cost configured, say)
        rise = _relative(s, c, higher_is_better=False)
        text = f"{name} {c:.4g} vs {s:.4g}: {rise:+.1%} (allowed {allowed:.1%})"
        (failed if rise > allowed else passed).append(text)
    if failed:
        return {**verdict, "verdict": "rollback", "reasons": failed + passed}
    return {**verdict, "verdict": "promote", "reasons": passed}


def _relative(stable: float, candidate: float, higher_is_better: bool) -> float:
    """How much worse the candidate is, relative to the stable version (negative: better)."""
    scale = abs(stable) or 1.0
    return (stable - candidate) / scale if higher_is_better else (candidate - stable) / scale


def _evidence(
    store: EventStore, report: dict[str, Any], policy: CanaryPolicy, version: str, now_us: int
) -> dict[str, Any]:
    quality = report["versions"].get(version, {}).get(ALL, {}).get("quality", {"labelled": 0})
    where, params = window_filter(
        policy.model, version, now_us - policy.window_s * 1_000_000, 0, table="events"
    )
    rows = store.query(
        f"SELECT count(*), coalesce(sum(rows), 0), quantile_cont(total_ms, 0.95), "
        f"coalesce(sum(cost), 0) FROM events WHERE {where}",
        params,
    )
    events, predicted_rows, p95, cost = rows[0]
    return {
        **quality,
        "events": int(events),
        "rows": int(predicted_rows),
        "p95_total_ms": float(p95 or 0.0),
        "cost_per_row": float(cost) / predicted_rows if predicted_rows else 0.0,
    }
