"""Alert rules on windows built from arrays: recent windows, the CUSUM, minimums that count
positives and negatives, intervals, contract counts for sensitive features, and the alert
log's states."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from gateway.demo import synthetic_transactions
from gateway.evaluation.alerts import Evaluation, cusum, evaluate_rules, transitions
from gateway.evaluation.intervals import auc, quality_interval
from gateway.evaluation.profile import categorical_profile, numeric_profile
from gateway.evaluation.windows import Window, build_window
from gateway.settings import AlertRule, EvaluationSettings

SECOND = 1_000_000
ROWS_PER_EVENT = 10


@pytest.fixture(scope="module")
def reference() -> dict:
    train, _ = synthetic_transactions(4000, seed=7)
    return {
        "features": {
            name: categorical_profile(v) if v.dtype == object else numeric_profile(v)
            for name, v in train.items()
        }
    }


def traffic(
    rows: int,
    seed: int,
    change=None,
    segment=lambda event: {"part": str(event % 2)},
    first_event: int = 0,
):
    columns, labels = synthetic_transactions(rows, seed)
    if change is not None:
        columns = change(columns)
    scores = 1 / (1 + np.exp(-(np.log1p(columns["amount"]) - 4.5)))
    events = rows // ROWS_PER_EVENT
    return {
        "columns": columns,
        "scores": scores,
        "labels": labels.astype(np.float64),
        "segments": [segment(first_event + e) for e in range(events)],
    }


def window(*parts: dict, hashed=(), coverage=None) -> Window:
    columns = {k: np.concatenate([p["columns"][k] for p in parts]) for k in parts[0]["columns"]}
    rows = len(columns["amount"])
    events = rows // ROWS_PER_EVENT
    return build_window(
        columns,
        np.concatenate([p["scores"] for p in parts]),
        np.full(events, ROWS_PER_EVENT),
        np.arange(events) * SECOND,
        ["1"] * events,
        [s for p in parts for s in p["segments"]],
        hashed=hashed,
        coverage=coverage,
        labels=np.concatenate([p["labels"] for p in parts]),
    )


def now(w: Window) -> int:
    return int(w.time_us[-1]) + SECOND


def amount_x8(columns):
    return {**columns, "amount": columns["amount"] * 8}


DRIFT = AlertRule(name="drift", metric="psi", feature="amount", above=0.2, action="retrain")


def fired(evaluation: Evaluation, rule: str = "drift") -> set[tuple[str, str]]:
    return {(a["segment"], a["feature"]) for a in evaluation.firing if a["rule"] == rule}


def test_cusum_accumulates_excess_over_k_and_never_goes_below_zero():
    assert cusum([], 0.1) == 0
    assert cusum([0.05, 0.0, 0.09], 0.1) == 0
    assert cusum([0.3, 0.3], 0.1) == pytest.approx(0.4)
    assert cusum([0.3, 0.0, 0.0, 0.0], 0.1) == 0  # a blip decays back
    assert cusum([0.0] * 50 + [0.5], 0.1) == pytest.approx(0.4)  # history does not delay it


def test_reference_traffic_fires_no_default_rule(reference):
    w = window(traffic(4000, seed=1))
    evaluation = evaluate_rules(w, EvaluationSettings().rules, reference, "m", now(w))
    assert evaluation.firing == []
    assert {c["rule"] for c in evaluation.checked.values()} >= {"feature_drift", "quality_drop"}


@pytest.mark.parametrize("before", [1000, 10_000])
def test_a_full_shift_fires_within_the_same_rows_however_long_the_traffic_before(reference, before):
    """The window is the latest window_rows rows and the CUSUM runs over its buckets: the
    rows it takes do not depend on the rows before the shift."""
    pre = traffic(before, seed=2)
    for shifted in range(50, 1001, 50):
        post = traffic(shifted, seed=3, change=amount_x8, first_event=before // ROWS_PER_EVENT)
        w = window(pre, post)
        if ("all", "amount") in fired(evaluate_rules(w, [DRIFT], reference, "m", now(w))):
            break
    assert shifted <= 200


def test_the_cusum_fires_before_the_window_does(reference):
    rule = DRIFT.model_copy(update={"window_rows": 2000})
    w = window(traffic(2000, seed=4), traffic(150, seed=5, change=amount_x8, first_event=200))
    firing = evaluate_rules(w, [rule], reference, "m", now(w)).firing
    [alert] = [a for a in firing if a["segment"] == "all"]
    assert alert["detector"] == "cusum" and alert["value"] < 0.2 < alert["cusum"]
    windowed = rule.model_copy(update={"change_detector": "none"})
    assert not evaluate_rules(w, [windowed], reference, "m", now(w)).firing


def test_old_events_leave_the_window_by_time(reference):
    w = window(traffic(1000, seed=6, change=amount_x8), traffic(1000, seed=7, first_event=100))
    recent = DRIFT.model_copy(update={"window_s": 100})  # the last 100 events
    assert ("all", "amount") in fired(evaluate_rules(w, [DRIFT], reference, "m", now(w)))
    assert not evaluate_rules(w, [recent], reference, "m", now(w)).firing


def test_a_segment_under_the_minimum_is_reported_not_skipped(reference):
    w = window(traffic(1000, seed=8, segment=lambda e: {"geo": "BR" if e % 10 == 0 else "US"}))
    evaluation = evaluate_rules(w, [DRIFT], reference, "m", now(w))
    [short] = evaluation.not_enough_data
    assert short["segment"] == "geo=BR" and short["samples"] == 100
    assert short["needed"] == {"rows": 200}


def test_quality_minimums_count_positives_and_negatives(reference):
    rule = AlertRule(name="q", metric="auc", below=0.6, min_samples=200, action="rollback")
    part = traffic(400, seed=9)
    part["labels"][:] = 0
    part["labels"][:5] = 1  # 400 labelled rows, 5 positives
    evaluation = evaluate_rules(window(part), [rule], reference, "m", now(window(part)))
    assert not evaluation.firing and not evaluation.checked
    entry = next(e for e in evaluation.not_enough_data if e["segment"] == "all")
    assert entry["labelled"] == 400 and entry["positives"] == 5 and entry["negatives"] == 395
    assert entry["needed"] == {"labelled": 200, "positives": 20, "negatives": 20}


def test_quality_fires_on_the_interval_not_the_point_estimate(reference):
    rule = AlertRule(name="q", metric="auc", below=0.6, min_positives=10, action="rollback")
    rng = np.random.default_rng(0)
    part = traffic(400, seed=10)
    part["labels"] = (rng.random(400) < 0.05).astype(np.float64)  # ~20 positives, no signal
    w = window(part)
    evaluation = evaluate_rules(w, [rule], reference, "m", now(w))
    check = next(c for c in evaluation.checked.values() if c["segment"] == "all")
    lower, upper = check["interval"]
    assert lower < check["value"] < upper
    assert bool(evaluation.firing) == (upper < 0.6)
    point = rule.model_copy(update={"confidence": 0.5})
    at_point = evaluate_rules(w, [point], reference, "m", now(w))
    assert bool(at_point.firing) == (check["value"] < 0.6)


def test_intervals_bracket_the_estimates():
    rng = np.random.default_rng(1)
    labels = rng.random(2000) < 0.1
    scores = np.clip(0.1 + 0.3 * labels + rng.normal(0, 0.2, 2000), 0, 1)
    pos, neg = scores[labels], scores[~labels]
    numpy_auc = ((pos[:, None] > neg).sum() + (pos[:, None] == neg).sum() / 2) / (
        len(pos) * len(neg)
    )
    assert auc(labels, scores) == pytest.approx(numpy_auc)
    for metric in ("auc", "log_loss", "accuracy", "ece"):
        estimate, lower, upper = quality_interval(metric, labels, scores, 0.95)
        assert lower <= estimate <= upper, metric
        same, low_point, high_point = quality_interval(metric, labels, scores, 0.5)
        if metric != "ece":  # the bootstrap's median is not the estimate
            assert low_point == pytest.approx(estimate) and high_point == pytest.approx(same)


def test_a_sensitive_features_oov_fires_from_the_contract_counts_for_its_segment_only(
    reference,
):
    """Hashed values cannot be compared with the reference; the gateway's counts can."""
    rows = 2000
    part = traffic(rows, seed=11, segment=lambda e: {"geo": "BR" if e % 2 else "US"})
    part["columns"]["country"] = np.array([f"h{i}" for i in range(rows)], dtype=object)
    events = rows // ROWS_PER_EVENT
    counts = np.zeros((events, 4), np.int64)
    counts[:, 0] = ROWS_PER_EVENT
    counts[1::2, 3] = 3  # BR events: 3 of 10 rows out of the contract's vocabulary
    w = window(part, hashed={"country"}, coverage={"country": counts})
    rule = AlertRule(name="oov", metric="oov", above=0.05, action="human_review")
    evaluation = evaluate_rules(w, [rule], reference, "m", now(w))
    assert fired(evaluation, "oov") == {("geo=BR", "country"), ("all", "country")}
    alert = next(a for a in evaluation.firing if a["segment"] == "geo=BR")
    assert alert["source"] == "contract" and alert["value"] == pytest.approx(0.3)
    values_only = rule.model_copy(update={"source": "values"})
    assert not evaluate_rules(w, [values_only], reference, "m", now(w)).firing


def test_clear_values_are_read_before_the_contract_counts(reference):
    part = traffic(1000, seed=12)
    part["columns"]["channel"] = part["columns"]["channel"].copy()
    part["columns"]["channel"][::3] = "crypto"
    counts = np.zeros((100, 4), np.int64)
    counts[:, 0] = ROWS_PER_EVENT  # the contract saw none (say its vocabulary has crypto)
    w = window(part, coverage={"channel": counts})
    rule = AlertRule(name="oov", metric="oov", above=0.05, action="human_review")
    [alert] = [
        a for a in evaluate_rules(w, [rule], reference, "m", now(w)).firing if a["segment"] == "all"
    ]
    assert alert["source"] == "values" and alert["value"] == pytest.approx(0.334, abs=0.01)
    contract = rule.model_copy(update={"source": "contract"})
    assert not evaluate_rules(w, [contract], reference, "m", now(w)).firing


def test_an_alert_that_stops_firing_says_resolved_or_window_emptied():
    key_fields = {"rule": "r", "model": "m", "version": "1", "feature": "amount", "action": "a"}
    a = {**key_fields, "segment": "geo=BR", "value": 0.9}
    b = {**key_fields, "segment": "geo=US", "value": 0.8}
    firing, changes = transitions({}, Evaluation(firing=[a, b]))
    assert [c["state"] for c in changes] == ["firing", "firing"]
    passed = {**a, "value": 0.01}
    after = Evaluation(
        checked={
            tuple(
                str(passed[k]) for k in ("rule", "model", "version", "segment", "feature", "action")
            ): passed
        }
    )
    firing, changes = transitions(firing, after)
    states = {c["segment"]: (c["state"], c["value"]) for c in changes}
    assert states == {"geo=BR": ("resolved", 0.01), "geo=US": ("window_emptied", 0.8)}
    assert firing == {}


def test_a_cusum_on_a_quality_metric_is_refused():
    with pytest.raises(ValidationError, match="checks its window only"):
        AlertRule(name="q", metric="auc", below=0.6, change_detector="cusum", action="rollback")
    assert not AlertRule(name="q", metric="auc", below=0.6, action="rollback").uses_cusum
    assert DRIFT.uses_cusum
