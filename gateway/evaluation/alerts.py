"""Alerts: every rule on the recent window of each version and segment, against the frozen
reference profile, with a CUSUM over the window's buckets; what fires, what had too little
data to say, and how the alert log's states follow.

A rule's window is the events of its last ``window_s`` seconds, and of them the latest
``window_rows`` rows of the version and segment (labelled rows for quality metrics): how soon
a change shows does not grow with the traffic before it. Feature and output metrics also run
a CUSUM over the window's buckets of ``bucket_rows`` rows, oldest first:
``S = max(0, S + x_t - k)``, firing while the newest ``S`` passes ``h`` (``k`` and ``h`` are
``cusum_k`` and ``cusum_h`` times the threshold; a bucket's PSI less its expected value under
no change, (bins - 1) / rows). Quality metrics fire on a one-sided interval, not the point
estimate (``intervals``), and need positives and negatives besides labelled rows.

Coverage metrics read the values where the sidecar sees them in clear, and the gateway's own
contract counts (made before sensitive values are hashed) where it does not (``source``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from gateway.evaluation.intervals import quality_interval
from gateway.evaluation.profile import (
    REFERENCE_FILE,
    categorical_drift,
    load_reference,
    numeric_drift,
)
from gateway.evaluation.store import EventStore
from gateway.evaluation.windows import Window, read_window
from gateway.settings import QUALITY_METRICS, AlertRule

__all__ = [
    "Evaluation",
    "alert_key",
    "cusum",
    "evaluate_alerts",
    "evaluate_rules",
    "transitions",
]

_VALUE_METRICS = {"psi", "js", "wasserstein"}  # from the values alone
_COVERAGE = {"oov": 3, "out_of_range": 2, "missing": 1, "defaulted": 1}  # contract column
_NOT_COUNTED = {("oov", "numeric"), ("out_of_range", "categorical")}
_KEY = ("rule", "model", "version", "segment", "feature", "action")


@dataclass
class Evaluation:
    """One round of every rule: alerts firing, checks that lacked data, and every check that
    ran on enough data (by alert key: what it measured)."""

    firing: list[dict[str, Any]] = field(default_factory=list)
    not_enough_data: list[dict[str, Any]] = field(default_factory=list)
    checked: dict[tuple[str, ...], dict[str, Any]] = field(default_factory=dict)

    def extend(self, other: Evaluation) -> None:
        self.firing += other.firing
        self.not_enough_data += other.not_enough_data
        self.checked.update(other.checked)


def alert_key(alert: dict[str, Any]) -> tuple[str, ...]:
    """What identifies an alert across rounds (and labels its gauge)."""
    return tuple(str(alert[k]) for k in _KEY)


def cusum(values: Sequence[float], k: float) -> float:
    """The one-sided CUSUM of ``values`` (oldest first) with reference value ``k``, at the
    newest: ``S = max(0, S + x - k)`` from ``S = 0``."""
    s = 0.0
    for x in values:
        s = max(0.0, s + x - k)
    return s


def evaluate_alerts(
    store: EventStore,
    model: str,
    rules: Sequence[AlertRule],
    repository: Path | None,
    max_events: int,
    now_us: int | None = None,
) -> Evaluation:
    """Every rule on ``model``'s recent events in ``store`` (one read: the longest window's
    latest ``max_events`` events)."""
    if not rules:
        return Evaluation()
    now_us = now_us or time.time_ns() // 1000
    window = read_window(
        store,
        model,
        max(rule.window_s for rule in rules),
        max_events,
        now_us,
        labelled=any(rule.metric in QUALITY_METRICS for rule in rules),
    )
    path = repository / model / REFERENCE_FILE if repository is not None else None
    reference = load_reference(path) if path is not None and path.exists() else {}
    return evaluate_rules(window, rules, reference, model, now_us)


def evaluate_rules(
    window: Window,
    rules: Sequence[AlertRule],
    reference: dict[str, Any],
    model: str,
    now_us: int,
) -> Evaluation:
    """Every rule on every version and segment of ``window`` it names."""
    out = Evaluation()
    measures = _Measures(window, reference)
    for (version, segment), events in window.groups().items():
        for rule in rules:
            if rule.segment in ("*", segment):
                _check(rule, measures, version, segment, events, model, now_us, out)
    return out


def transitions(
    before: dict[tuple[str, ...], dict[str, Any]], evaluation: Evaluation
) -> tuple[dict[tuple[str, ...], dict[str, Any]], list[dict[str, Any]]]:
    """The alerts firing now (by key), and the changes since ``before``: ``firing`` for a new
    one; for one no longer firing, ``resolved`` when its check ran on enough data and passed,
    ``window_emptied`` when its window no longer held enough data to check."""
    now = {alert_key(a): a for a in evaluation.firing}
    changes = [{**a, "state": "firing"} for k, a in now.items() if k not in before]
    for key, last in before.items():
        if key in now:
            continue
        current = evaluation.checked.get(key)
        if current is not None:
            changes.append({**last, **current, "state": "resolved"})
        else:
            changes.append({**last, "state": "window_emptied", "samples": 0})
    return now, changes


class _Measures:
    """Metrics of sets of events, computed once per set (rules share windows and buckets)."""

    def __init__(self, window: Window, reference: dict[str, Any]) -> None:
        self.window = window
        self.reference = reference
        self._features: dict[tuple[Any, ...], dict[str, dict[str, Any]]] = {}
        self._outputs: dict[tuple[Any, ...], dict[str, Any]] = {}

    def profiles(self, version: str) -> dict[str, Any]:
        profiles = dict(self.reference.get("features", {}))
        profiles.update(self.reference.get("versions", {}).get(version, {}).get("inputs", {}))
        return profiles

    def features(
        self, key: tuple[Any, ...], version: str, events: NDArray[np.int64]
    ) -> dict[str, dict[str, Any]]:
        """Per feature: its drift against the reference (values in clear), and the contract's
        shares (``contract``: present + defaulted, defaulted, out of range, oov)."""
        cached = self._features.get(key)
        if cached is not None:
            return cached
        window = self.window
        rows = window.row_mask(events)
        profiles = self.profiles(version)
        out: dict[str, dict[str, Any]] = {}
        for name, numbers in window.frame.numbers.items():
            profile = profiles.get(name)
            if profile is not None and profile.get("kind") == "numeric":
                drift = out[name] = numeric_drift(profile, numbers[rows])
                bins = sum(1 for share in profile.get("fractions", ()) if share > 0)
                drift["null_psi"] = (bins - 1) / max(drift["count"], 1)
        for name, strings in window.frame.strings.items():
            profile = profiles.get(name)
            if name in window.hashed or profile is None or profile.get("kind") != "categorical":
                continue  # a sensitive feature's hashes cannot be compared with clear values
            drift = out[name] = categorical_drift(profile, strings[rows].tolist())
            drift["null_psi"] = (len(profile["frequencies"]) - 1) / max(drift["count"], 1)
        for name, counts in window.coverage.items():
            present, defaulted, out_of_range, oov = counts[events].sum(axis=0).tolist()
            total = present + defaulted
            if total:
                shares = (defaulted / total, out_of_range / total, oov / total)
                entry = out.setdefault(name, {})
                entry["contract"] = (total, *shares)
                # NOTE: what kind of values the contract counted: a number has no vocabulary
                # and a category no range (a hashed feature is a category).
                profile = profiles.get(name, {})
                entry["kind"] = profile.get(
                    "kind", "categorical" if name in window.frame.strings else "numeric"
                )
        for drift in out.values():
            drift["rows"] = int(rows.sum())
        self._features[key] = out
        return out

    def output(
        self, key: tuple[Any, ...], version: str, events: NDArray[np.int64]
    ) -> dict[str, Any]:
        cached = self._outputs.get(key)
        if cached is None:
            outputs = self.reference.get("versions", {}).get(version, {}).get("outputs", {})
            cached = {}
            if outputs:
                profile = next(iter(outputs.values()))
                cached = numeric_drift(
                    profile, self.window.frame.scores[self.window.row_mask(events)]
                )
                bins = sum(1 for share in profile.get("fractions", ()) if share > 0)
                cached["null_psi"] = (bins - 1) / max(cached["count"], 1)
            self._outputs[key] = cached
        return cached

    def values(
        self, rule: AlertRule, key: tuple[Any, ...], version: str, events: NDArray[np.int64]
    ) -> dict[str, tuple[float, int, str, float]]:
        """The rule's metric per feature: (value, samples, source, its value under no
        change)."""
        if rule.metric == "output_psi":
            output = self.output(key, version, events)
            if "psi" not in output:
                return {}
            return {"": (output["psi"], output["count"], "values", output["null_psi"])}
        out: dict[str, tuple[float, int, str, float]] = {}
        for name, drift in self.features(key, version, events).items():
            if rule.feature not in ("*", name):
                continue
            picked = _pick(rule, drift)
            if picked is not None:
                out[name] = picked
        return out


def _pick(rule: AlertRule, drift: dict[str, Any]) -> tuple[float, int, str, float] | None:
    metric = rule.metric
    if metric in _VALUE_METRICS:
        if metric not in drift:
            return None
        null = drift["null_psi"] if metric == "psi" else 0.0
        return float(drift[metric]), int(drift["count"]), "values", null
    in_clear = metric in drift and metric != "defaulted"
    contract = drift.get("contract")
    if rule.source == "values" or (rule.source == "auto" and in_clear):
        if not in_clear:
            return None
        samples = drift["rows"] if metric == "missing" else drift["count"]
        return float(drift[metric]), int(samples), "values", 0.0
    if contract is None or (metric, drift["kind"]) in _NOT_COUNTED:
        return None
    return float(contract[_COVERAGE[metric]]), int(contract[0]), "contract", 0.0


def _check(
    rule: AlertRule,
    measures: _Measures,
    version: str,
    segment: str,
    group: NDArray[np.bool_],
    model: str,
    now_us: int,
    out: Evaluation,
) -> None:
    """One rule on one version and segment."""
    window = measures.window
    quality = rule.metric in QUALITY_METRICS
    recent = group & (window.time_us >= now_us - rule.window_s * 1_000_000)
    weights = window.labelled_per_event if quality else window.rows_per_event
    events, buckets = _recent(np.flatnonzero(recent), weights, rule)
    head = {
        "rule": rule.name,
        "metric": rule.metric,
        "model": model,
        "version": version,
        "segment": segment,
        "action": rule.action,
        "window_s": rule.window_s,
        "window_rows": rule.window_rows,
    }
    if quality:
        _check_quality(rule, measures, events, head, out)
        return
    rows = int(weights[events].sum())
    if rows < rule.min_samples:
        out.not_enough_data.append(
            {**head, "feature": "", "samples": rows, "needed": {"rows": rule.min_samples}}
        )
        return
    key = (version, segment, rule.window_s, rule.window_rows, rule.bucket_rows)
    values = measures.values(rule, key, version, events)
    trail: dict[str, list[float]] = {}
    if rule.uses_cusum:  # the buckets oldest first; the oldest may be partial: left out
        for b in range(int(buckets.max(initial=-1)), -1, -1):
            in_bucket = events[buckets == b]
            if weights[in_bucket].sum() < rule.bucket_rows:
                continue
            for name, (x, n, _, null) in measures.values(
                rule, (*key, b), version, in_bucket
            ).items():
                if n >= rule.bucket_rows // 2:
                    trail.setdefault(name, []).append(x - null)
    k, h = rule.cusum_k * rule.threshold, rule.cusum_h * rule.threshold
    for name, (value, samples, source, _) in values.items():
        check = {**head, "feature": name, "value": value, "samples": samples, "source": source}
        if samples < rule.min_samples:
            out.not_enough_data.append({**check, "needed": {"rows": rule.min_samples}})
            continue
        s = cusum(trail.get(name, ()), k)
        if rule.uses_cusum:
            check.update(cusum=s, cusum_limit=h, buckets=len(trail.get(name, ())))
        out.checked[alert_key(check)] = check
        crossed = value > rule.above if rule.above is not None else value < rule.threshold
        if crossed or s > h:
            out.firing.append(
                {
                    **check,
                    "threshold": rule.threshold,
                    "direction": "above" if rule.above is not None else "below",
                    "detector": "window" if crossed else "cusum",
                }
            )


def _check_quality(
    rule: AlertRule,
    measures: _Measures,
    events: NDArray[np.int64],
    head: dict[str, Any],
    out: Evaluation,
) -> None:
    window = measures.window
    rows = window.row_mask(events) & ~np.isnan(window.labels)
    labels = window.labels[rows] > 0.5
    positives = int(labels.sum())
    have = {"labelled": int(labels.size), "positives": positives}
    have["negatives"] = have["labelled"] - positives
    needed = {
        "labelled": rule.min_samples,
        "positives": rule.min_positives,
        "negatives": rule.min_negatives,
    }
    check = {**head, "feature": "", "samples": have["labelled"], **have}
    if any(have[k] < needed[k] or have[k] == 0 for k in ("positives", "negatives")) or (
        have["labelled"] < rule.min_samples
    ):
        out.not_enough_data.append({**check, "needed": needed})
        return
    value, lower, upper = quality_interval(
        rule.metric, labels, window.frame.scores[rows], rule.confidence
    )
    check.update(value=value, interval=[lower, upper], confidence=rule.confidence)
    out.checked[alert_key(check)] = check
    crossed = lower > rule.above if rule.above is not None else upper < rule.threshold
    if crossed:
        direction = "above" if rule.above is not None else "below"
        out.firing.append(
            {**check, "threshold": rule.threshold, "direction": direction, "detector": "interval"}
        )


def _recent(
    candidates: NDArray[np.int64], weights: NDArray[np.int64], rule: AlertRule
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Of ``candidates`` (events, oldest first), the latest holding ``window_rows`` rows
    (weights), and each one's bucket, counted from the newest (bucket 0)."""
    newest_first = candidates[::-1]
    w = weights[newest_first]
    newer = np.cumsum(w) - w  # rows in events newer than each
    kept = newer < rule.window_rows
    return newest_first[kept][::-1], (newer[kept] // rule.bucket_rows)[::-1]
