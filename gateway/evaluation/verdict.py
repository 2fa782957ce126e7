"""Canary verdicts: promote, hold or rollback a candidate version against the stable one, each
criterion (the primary quality metric on labelled rows, p95 latency, cost per row, over the
policy's window) judged on an interval for the difference, not on two point estimates.

Outcomes, as Argo Rollouts' analysis runs have them:

* **promote** when every criterion's interval excludes a regression beyond its margin
  (non-inferiority: the candidate is at worst that much worse, at the policy's confidence);
* **rollback** when some criterion's interval lies wholly beyond its margin (the candidate
  is worse by more than allowed, at that confidence);
* **hold** otherwise: too little evidence, or an interval that straddles the margin; the
  reason says how much more (labelled rows with their positives and negatives, or requests)
  would likely decide it.

A margin is the allowed share (``max_regression`` ...) of the stable version's estimate.
Quality is compared paired when both versions scored the same labelled rows (a shadow copy is
recorded under its primary's request id: same request id, same row) and those rows alone meet
the minimums; otherwise unpaired over each version's labelled rows. The statistics are in
``stats``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
from numpy.typing import NDArray

from gateway.evaluation import stats
from gateway.evaluation.frames import build_frame
from gateway.evaluation.report import quality
from gateway.evaluation.store import EventStore, joined_sql, window_filter
from gateway.settings import CanaryPolicy

__all__ = ["judge"]

_HIGHER_IS_BETTER = {"auc": True, "accuracy": True, "log_loss": False}
_METHODS = {"auc": "DeLong", "log_loss": "normal approximation", "accuracy": "normal approximation"}
_POWER = 0.8  # "would likely decide": the chance of a decision if the estimate is the truth
_THRESHOLD = 0.5  # accuracy's, as the report's
_LATENCY_QUANTILE = 0.95
_STRINGS = pa.map_(pa.string(), pa.list_(pa.string()))


@dataclass
class _Version:
    """What one version's window holds: its labelled rows and its requests."""

    keys: list[str]  # request id and row of each labelled row ("" when no request id)
    labels: NDArray[np.bool_]
    scores: NDArray[np.float64]
    latency_ms: NDArray[np.float64]  # per request (event)
    cost: NDArray[np.float64]  # per request
    rows: NDArray[np.float64]  # per request

    @property
    def positives(self) -> int:
        return int(self.labels.sum())

    @property
    def negatives(self) -> int:
        return len(self.labels) - self.positives


def judge(
    store: EventStore,
    policy: CanaryPolicy,
    max_events: int,
    now_us: int | None = None,
    since_us: int = 0,
) -> dict[str, Any]:
    """The verdict for one policy over its window's latest ``max_events`` events of the two
    versions: ``verdict``, ``reasons`` (one per criterion), ``criteria`` (each one's estimate,
    interval, margin, outcome and what more would decide it) and ``evidence`` per version."""
    now_us = now_us or time.time_ns() // 1000
    stable, candidate, truncated = _read(store, policy, max_events, now_us, since_us)
    criteria = [_quality(policy, stable, candidate), _latency(policy, stable, candidate)]
    cost = _cost(policy, stable, candidate)
    if cost is not None:
        criteria.append(cost)
    outcomes = {c["outcome"] for c in criteria}
    if "fail" in outcomes:
        verdict = "rollback"
    elif outcomes == {"pass"}:
        verdict = "promote"
    else:
        verdict = "hold"
    return {
        "model": policy.model,
        "stable": policy.stable,
        "candidate": policy.candidate,
        "primary_metric": policy.primary_metric,
        "window_s": policy.window_s,
        "since_us": since_us,  # 0: the whole window; else only events since (a rollout step)
        "confidence": policy.confidence,
        "truncated": truncated,
        "verdict": verdict,
        "reasons": [c["reason"] for c in criteria],
        "criteria": criteria,
        "evidence": {"stable": _evidence(stable), "candidate": _evidence(candidate)},
    }


def _read(
    store: EventStore, policy: CanaryPolicy, max_events: int, now_us: int, since_us: int = 0
) -> tuple[_Version, _Version, bool]:
    start_us = max(now_us - policy.window_s * 1_000_000, since_us)  # since: a step's own traffic
    where, params = window_filter(policy.model, "", start_us, 0, table="e")
    where += " AND e.version IN (?, ?)"
    params += [policy.stable, policy.candidate]
    in_window = store.query(f"SELECT count(*) FROM events e WHERE {where}", params)[0][0]
    # NOTE: the latest max_events events, picked by rowid (as the report picks them).
    recent = (
        f"e.rowid IN (SELECT rowid FROM events e WHERE {where} "
        f"ORDER BY event_time DESC, rowid DESC LIMIT {int(max_events)})"
    )
    events = store.arrow(
        f"SELECT e.rowid, version, request_id, rows, outputs, output_widths, total_ms, cost "
        f"FROM events e WHERE {recent} ORDER BY e.rowid",
        params,
    )
    labels = store.arrow(
        f'SELECT e.rowid AS event, j."row", j.label FROM ({joined_sql()}) j '
        f"JOIN events e USING (event_id) WHERE {recent}",
        params,
    )
    count = events.num_rows
    row_counts = events.column("rows").to_pylist()
    frame = build_frame(
        row_counts=row_counts,
        numeric_names=[None] * count,
        numeric=[None] * count,
        strings=pa.array([[]] * count, _STRINGS),
        outputs=events.column("outputs").to_pylist(),
        output_widths=events.column("output_widths").to_pylist(),
    )
    rowid = events.column("rowid").to_numpy()
    version = np.asarray(events.column("version").to_pylist(), dtype=object)
    request_id = events.column("request_id").to_pylist()
    event = np.searchsorted(rowid, labels.column("event").to_numpy())
    row = labels.column("row").to_numpy().astype(np.int64)
    score = frame.scores[frame.starts[event] + row]
    label = labels.column("label").to_numpy() > 0.5
    scored = ~np.isnan(score)  # an event without outputs (a static fallback) scores nothing

    def part(name: str) -> _Version:
        mine = version == name
        picked = scored & mine[event]
        return _Version(
            keys=[
                f"{request_id[e]}\x1f{r}" if request_id[e] else ""
                for e, r in zip(event[picked], row[picked], strict=True)
            ],
            labels=label[picked],
            scores=score[picked],
            latency_ms=events.column("total_ms").to_numpy(zero_copy_only=False)[mine],
            cost=events.column("cost").to_numpy(zero_copy_only=False)[mine],
            rows=np.asarray(row_counts, dtype=np.float64)[mine],
        )

    return part(policy.stable), part(policy.candidate), in_window > count


def _evidence(v: _Version) -> dict[str, Any]:
    rows = float(v.rows.sum())
    return {
        **quality(v.labels.astype(np.float64), v.scores, _THRESHOLD),
        "positives": v.positives,
        "negatives": v.negatives,
        "events": len(v.latency_ms),
        "rows": int(rows),
        "p95_total_ms": float(np.quantile(v.latency_ms, _LATENCY_QUANTILE))
        if len(v.latency_ms)
        else 0.0,
        "cost_per_row": float(v.cost.sum()) / rows if rows else 0.0,
    }


def _pairs(stable: _Version, candidate: _Version) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Indices of the labelled rows both versions scored (same request id and row)."""
    first: dict[str, int] = {}
    for i, key in enumerate(stable.keys):
        if key:
            first.setdefault(key, i)
    s_index: list[int] = []
    c_index: list[int] = []
    seen: set[str] = set()
    for j, key in enumerate(candidate.keys):
        at = first.get(key)
        if at is not None and key not in seen:
            seen.add(key)
            s_index.append(at)
            c_index.append(j)
    return np.asarray(s_index, dtype=np.int64), np.asarray(c_index, dtype=np.int64)


def _short(policy: CanaryPolicy, v: _Version) -> bool:
    return (
        len(v.labels) < policy.min_samples
        or v.positives < policy.min_positives
        or v.negatives < policy.min_negatives
    )


def _quality(policy: CanaryPolicy, stable: _Version, candidate: _Version) -> dict[str, Any]:
    metric = policy.primary_metric
    s_index, c_index = _pairs(stable, candidate)
    none = np.empty(0)
    shared = _Version(
        [stable.keys[i] for i in s_index],
        stable.labels[s_index],
        stable.scores[s_index],
        none,
        none,
        none,
    )
    paired = len(s_index) > 0 and not _short(policy, shared)
    if paired:
        s = (shared.labels, shared.scores)
        c = (shared.labels, candidate.scores[c_index])
    else:
        roles = {"stable": stable, "candidate": candidate}
        if any(_short(policy, v) for v in roles.values()):
            return _too_few_labels(policy, roles)
        s = (stable.labels, stable.scores)
        c = (candidate.labels, candidate.scores)
    if metric == "auc":
        diff = stats.auc_difference(s, c, policy.confidence, paired)
        values = (stats.delong(*s)[0], stats.delong(*c)[0])
    elif metric == "log_loss":
        diff = stats.log_loss_difference(s, c, policy.confidence, paired)
        values = (float(stats.row_log_loss(*s).mean()), float(stats.row_log_loss(*c).mean()))
    else:
        s_pred = (s[0], s[1] >= _THRESHOLD)
        c_pred = (c[0], c[1] >= _THRESHOLD)
        diff = stats.accuracy_difference(s_pred, c_pred, policy.confidence, paired)
        values = (float(np.mean(s_pred[0] == s_pred[1])), float(np.mean(c_pred[0] == c_pred[1])))
    rows = (
        f"paired over {len(s_index):,} labelled rows both scored"
        if paired
        else f"unpaired over {len(s[0]):,} and {len(c[0]):,} labelled rows"
    )
    more = {
        "stable": (len(s[0]), int(s[0].sum())),
        "candidate": (len(c[0]), int(c[0].sum())),
    }
    return _judged(
        policy,
        metric,
        values,
        diff,
        policy.max_regression,
        _HIGHER_IS_BETTER[metric],
        f"{_METHODS[metric]}, {rows}",
        lambda scale: _more_labels(more, scale, paired),
    )


def _latency(policy: CanaryPolicy, stable: _Version, candidate: _Version) -> dict[str, Any]:
    name = "p95 latency"
    each = math.sqrt(policy.confidence)  # quantile_difference's level per version
    needed = max(policy.min_requests, stats.min_samples_for_quantile(_LATENCY_QUANTILE, each))
    counts = {"stable": len(stable.latency_ms), "candidate": len(candidate.latency_ms)}
    diff = None
    if min(counts.values()) >= needed:
        diff = stats.quantile_difference(
            stable.latency_ms, candidate.latency_ms, _LATENCY_QUANTILE, policy.confidence
        )
    if diff is None:
        missing = {role: max(needed - n, 0) for role, n in counts.items()}
        text = " and ".join(f"{m:,} more for the {role}" for role, m in missing.items() if m)
        return _criterion(
            name,
            "insufficient",
            f"{name}: {counts['candidate']:,} and {counts['stable']:,} requests (candidate, "
            f"stable) of the {needed:,} each needs for a distribution-free interval: {text}",
            needs={role: {"requests": m} for role, m in missing.items()},
        )
    values = tuple(float(np.quantile(v.latency_ms, _LATENCY_QUANTILE)) for v in (stable, candidate))
    return _judged(
        policy,
        name,
        (values[0], values[1]),
        diff,
        policy.max_latency_regression,
        False,
        f"order statistics over {counts['candidate']:,} and {counts['stable']:,} requests",
        lambda scale: _more_requests(counts, scale),
        unit=" ms",
    )


def _cost(policy: CanaryPolicy, stable: _Version, candidate: _Version) -> dict[str, Any] | None:
    name = "cost per row"
    if not stable.cost.sum() or not stable.rows.sum():
        return None  # nothing to compare with (no price configured, say)
    counts = {"stable": len(stable.cost), "candidate": len(candidate.cost)}
    if min(counts.values()) < policy.min_requests or not candidate.rows.sum():
        missing = {role: max(policy.min_requests - n, 0) for role, n in counts.items()}
        return _criterion(
            name,
            "insufficient",
            f"{name}: {counts['candidate']:,} and {counts['stable']:,} requests (candidate, "
            f"stable) of the {policy.min_requests:,} each needs",
            needs={role: {"requests": m} for role, m in missing.items()},
        )
    diff = stats.ratio_difference(
        (stable.cost, stable.rows), (candidate.cost, candidate.rows), policy.confidence
    )
    values = tuple(float(v.cost.sum() / v.rows.sum()) for v in (stable, candidate))
    return _judged(
        policy,
        name,
        (values[0], values[1]),
        diff,
        policy.max_cost_regression,
        False,
        f"delta method over {counts['candidate']:,} and {counts['stable']:,} requests",
        lambda scale: _more_requests(counts, scale),
    )


def _judged(
    policy: CanaryPolicy,
    name: str,
    values: tuple[float, float],
    diff: stats.Difference,
    allowed: float,
    higher_is_better: bool,
    method: str,
    more: Callable[[float], tuple[dict[str, Any], str]],
    unit: str = "",
) -> dict[str, Any]:
    """One criterion's outcome from candidate - stable and its interval: the regression (how
    much worse the candidate is, negative: better) against ``allowed`` x the stable value."""
    stable_value, candidate_value = values
    if higher_is_better:
        worse = stats.Difference(-diff.estimate, -diff.high, -diff.low, diff.se, diff.paired)
    else:
        worse = diff
    scale = abs(stable_value) or 1.0
    margin = allowed * scale
    relative = (worse.estimate / scale, worse.low / scale, worse.high / scale)
    head = (
        f"{name} {candidate_value:.4g}{unit} vs {stable_value:.4g}{unit}: "
        f"{_change(relative[0])} ({policy.confidence:.0%} interval: "
        f"{_span(relative[1], relative[2])}; {method})"
    )
    needs: dict[str, Any] = {}
    if worse.high <= margin:
        outcome = "pass"
        reason = f"{head}: a regression beyond the allowed {allowed:.1%} is excluded"
    elif worse.low > margin:
        outcome = "fail"
        reason = f"{head}: a regression beyond the allowed {allowed:.1%}"
    else:
        outcome = "inconclusive"
        factor = stats.scale_to_decide(worse, margin, policy.confidence, _POWER)
        if factor is None:
            tail = "the estimate sits on the margin: more data may not decide it"
        else:
            needs, tail = more(factor)
        reason = f"{head}: cannot tell yet whether within the allowed {allowed:.1%}; {tail}"
    return _criterion(
        name,
        outcome,
        reason,
        needs=needs,
        stable=stable_value,
        candidate=candidate_value,
        difference=diff.estimate,
        difference_low=diff.low,
        difference_high=diff.high,
        regression=relative[0],
        regression_low=relative[1],
        regression_high=relative[2],
        allowed=allowed,
        method=method,
        paired=diff.paired,
    )


def _criterion(name: str, outcome: str, reason: str, **fields: Any) -> dict[str, Any]:
    return {"name": name, "outcome": outcome, "reason": reason, **fields}


def _change(regression: float) -> str:
    if regression == 0:
        return "no change"
    return f"{abs(regression):.1%} {'regression' if regression > 0 else 'improvement'}"


def _span(low: float, high: float) -> str:
    """An interval of regressions from its best end to its worst, in words."""
    if low == high:
        return _change(low)
    if low > 0 or high < 0:  # one side: "2.0% to 5.0% regression", "5.0% to 2.0% improvement"
        return f"{abs(low):.1%} to {_change(high)}"
    return f"{_change(low)} to {_change(high)}"


def _more_labels(
    held: dict[str, tuple[int, int]], scale: float, paired: bool
) -> tuple[dict[str, Any], str]:
    """More labelled rows (with positives and negatives at the current rates) per version to
    reach ``scale`` x the current sample."""
    needs = {}
    for role, (rows, positives) in held.items():
        more_rows = math.ceil(rows * (scale - 1))
        more_positives = math.ceil(positives * (scale - 1))
        needs[role] = {
            "labelled_rows": more_rows,
            "positives": more_positives,
            "negatives": more_rows - more_positives,
        }
    c = needs["candidate"]
    counts = f"({c['positives']:,} positives, {c['negatives']:,} negatives)"
    if paired:
        text = f"about {c['labelled_rows']:,} more labelled rows both score {counts}"
    else:
        text = (
            f"about {c['labelled_rows']:,} more labelled rows for the candidate {counts} and "
            f"{needs['stable']['labelled_rows']:,} for the stable version"
        )
    return needs, f"{text} would likely decide it"


def _more_requests(held: dict[str, int], scale: float) -> tuple[dict[str, Any], str]:
    needs = {role: {"requests": math.ceil(n * (scale - 1))} for role, n in held.items()}
    text = (
        f"about {needs['candidate']['requests']:,} more requests for the candidate and "
        f"{needs['stable']['requests']:,} for the stable version would likely decide it"
    )
    return needs, text


def _too_few_labels(policy: CanaryPolicy, versions: dict[str, _Version]) -> dict[str, Any]:
    needs = {}
    lines = []
    for role, v in versions.items():
        more_positives = max(policy.min_positives - v.positives, 0)
        more_negatives = max(policy.min_negatives - v.negatives, 0)
        rate = v.positives / len(v.labels) if v.positives and v.negatives else None
        more_rows = max(policy.min_samples - len(v.labels), more_positives + more_negatives)
        if rate is not None:  # at its current positive rate
            more_rows = max(
                more_rows,
                math.ceil(more_positives / rate),
                math.ceil(more_negatives / (1 - rate)),
            )
        needs[role] = {
            "labelled_rows": more_rows,
            "positives": more_positives,
            "negatives": more_negatives,
        }
        if not _short(policy, v):
            continue
        lines.append(
            f"the {role} has {len(v.labels):,} labelled rows ({v.positives:,} positives, "
            f"{v.negatives:,} negatives): about {more_rows:,} more labelled rows"
            + (f", {more_positives:,} of them positives" if more_positives else "")
            + (f", {more_negatives:,} negatives" if more_negatives else "")
        )
    return _criterion(
        policy.primary_metric,
        "insufficient",
        f"{policy.primary_metric}: a verdict needs {policy.min_samples:,} labelled rows with "
        f"{policy.min_positives:,} positives and {policy.min_negatives:,} negatives per "
        f"version: {'; '.join(lines)}",
        needs=needs,
    )
