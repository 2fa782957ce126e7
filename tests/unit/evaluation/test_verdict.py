"""Canary verdicts on a real DuckDB store: three outcomes from intervals, paired when both
versions scored the same rows, the evidence each criterion needs, and words that say which
way a difference goes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gateway.api.v1 import events_pb2 as ev
from gateway.evaluation.store import EventStore
from gateway.evaluation.verdict import judge
from gateway.settings import CanaryPolicy

NOW = 2_000_000_000 * 1_000_000
ROWS = 10


@pytest.fixture
def store(tmp_path: Path):
    s = EventStore(tmp_path)
    yield s
    s.close()


def policy(**fields) -> CanaryPolicy:
    return CanaryPolicy(**{"model": "m", "stable": "1", "candidate": "2", **fields})


def population(rows: int, seed: int, skill: float) -> tuple[np.ndarray, np.ndarray]:
    """Labels (10% positive) and scores separating them by ``skill`` standard deviations."""
    rng = np.random.default_rng(seed)
    labels = rng.random(rows) < 0.1
    return labels, 1 / (1 + np.exp(-(rng.normal(0, 1, rows) + skill * labels - 2)))


def serve(
    store: EventStore,
    version: str,
    labels: np.ndarray,
    scores: np.ndarray,
    request_prefix: str = "",
    latency_ms: float | np.ndarray = 5.0,
    cost_per_row: float = 0.0,
    labelled: bool = True,
) -> None:
    """Requests of ROWS rows each as events of ``version`` (request ids ``prefix``-i, the
    version's own by default), with their labels."""
    prefix = request_prefix or f"v{version}"
    requests = len(labels) // ROWS
    latencies = np.broadcast_to(latency_ms, requests)
    events, sent = [], []
    for i in range(requests):
        rows = slice(i * ROWS, (i + 1) * ROWS)
        e = ev.PredictionEvent(
            event_id=f"{version}-{i}",
            request_id=f"{prefix}-{i}",
            model="m",
            version=version,
            event_time_us=NOW - 1_000_000 + i,
            rows=ROWS,
            total_ms=float(latencies[i]),
            cost=cost_per_row * ROWS,
        )
        e.outputs.add(name="p", values=scores[rows].astype("<f8").tobytes(), width=1)
        events.append(e)
        sent += [
            ev.Label(request_id=f"{prefix}-{i}", row=r, value=float(y))
            for r, y in enumerate(labels[rows])
        ]
    store.ingest(events, NOW)
    if labelled:
        store.put_labels(sent, 3600, NOW)


def criterion(verdict: dict, name: str) -> dict:
    return next(c for c in verdict["criteria"] if c["name"] == name)


def test_no_labels_hold_and_say_how_many_positives_and_negatives_are_missing(store):
    labels, scores = population(2000, 1, 2.0)
    serve(store, "1", labels, scores, labelled=False)
    serve(store, "2", labels, scores, labelled=False)
    verdict = judge(store, policy(), 100_000, NOW)
    assert verdict["verdict"] == "hold"
    auc = criterion(verdict, "auc")
    assert auc["outcome"] == "insufficient"
    assert auc["needs"]["candidate"] == {"labelled_rows": 200, "positives": 30, "negatives": 30}
    assert "candidate has 0 labelled rows (0 positives, 0 negatives)" in auc["reason"]


def test_rows_are_not_enough_without_positives(store):
    labels, scores = population(1000, 2, 2.0)
    labels[:] = False  # 1,000 labelled rows, none positive
    serve(store, "1", labels, scores)
    serve(store, "2", labels, scores)
    auc = criterion(judge(store, policy(min_samples=200), 100_000, NOW), "auc")
    assert auc["outcome"] == "insufficient"
    assert "1,000 labelled rows (0 positives, 1,000 negatives)" in auc["reason"]
    assert auc["needs"]["stable"]["positives"] == 30


def test_a_clearly_worse_candidate_is_rolled_back_with_its_regression_named(store):
    serve(store, "1", *population(3000, 3, 2.5))
    serve(store, "2", *population(3000, 4, 0.5))
    verdict = judge(store, policy(), 100_000, NOW)
    assert verdict["verdict"] == "rollback"
    auc = criterion(verdict, "auc")
    assert auc["outcome"] == "fail" and not auc["paired"]
    assert auc["regression_low"] > 0.02  # the whole interval beyond the margin
    assert verdict["reasons"][0].startswith("auc ")
    assert "regression" in auc["reason"] and "improvement" not in auc["reason"]
    assert "unpaired over 3,000 and 3,000 labelled rows" in auc["reason"]


def test_a_clearly_better_candidate_is_promoted_and_called_an_improvement(store):
    serve(store, "1", *population(3000, 5, 0.5))
    serve(store, "2", *population(3000, 6, 2.5))
    verdict = judge(store, policy(), 100_000, NOW)
    assert verdict["verdict"] == "promote"
    auc = criterion(verdict, "auc")
    assert auc["regression_high"] < 0  # better at the interval's worst end
    head = auc["reason"].split(" (")[0]
    assert head.endswith("improvement") and "regression" not in head


def test_shadow_copies_under_the_primary_request_id_are_compared_paired(store):
    labels, scores = population(3000, 7, 2.0)
    serve(store, "1", labels, scores)
    serve(store, "2", labels, scores, request_prefix="v1")  # a shadow: same ids, same rows
    verdict = judge(store, policy(), 100_000, NOW)
    auc = criterion(verdict, "auc")
    assert auc["paired"] and "paired over 3,000 labelled rows both scored" in auc["reason"]
    assert (auc["difference_low"], auc["difference_high"]) == (0.0, 0.0)
    assert verdict["verdict"] == "promote"


def test_the_same_rows_under_other_request_ids_are_compared_unpaired(store):
    labels, scores = population(3000, 8, 2.0)
    serve(store, "1", labels, scores)
    serve(store, "2", labels, scores)
    auc = criterion(judge(store, policy(), 100_000, NOW), "auc")
    assert not auc["paired"] and auc["difference"] == pytest.approx(0.0, abs=1e-12)
    assert auc["difference_low"] < 0 < auc["difference_high"]


def test_an_interval_across_the_margin_holds_and_says_what_would_decide_it(store):
    serve(store, "1", *population(2000, 9, 1.5))
    serve(store, "2", *population(2000, 10, 1.5))
    verdict = judge(store, policy(), 100_000, NOW)
    auc = criterion(verdict, "auc")
    assert auc["outcome"] == "inconclusive" and verdict["verdict"] == "hold"
    needs = auc["needs"]["candidate"]
    assert needs["labelled_rows"] > 0 and needs["positives"] > 0 and needs["negatives"] > 0
    assert needs["positives"] + needs["negatives"] == needs["labelled_rows"]
    assert (
        f"about {needs['labelled_rows']:,} more labelled rows for the candidate" in (auc["reason"])
    )


def test_latency_needs_enough_requests_for_an_order_statistic_interval(store):
    labels, scores = population(800, 11, 2.0)  # 80 requests per version
    serve(store, "1", labels, scores, request_prefix="a")
    serve(store, "2", labels, scores, request_prefix="a")
    latency = criterion(judge(store, policy(min_requests=10), 100_000, NOW), "p95 latency")
    # the p95 interval at sqrt(0.95) per version needs 86 requests whatever min_requests says
    assert latency["outcome"] == "insufficient"
    assert "of the 86 each needs" in latency["reason"]
    assert latency["needs"]["candidate"] == {"requests": 6}


def test_a_much_slower_candidate_is_rolled_back_before_any_label(store):
    rng = np.random.default_rng(12)
    labels, scores = population(3000, 12, 2.0)
    serve(store, "1", labels, scores, latency_ms=rng.lognormal(1.0, 0.3, 300), labelled=False)
    serve(store, "2", labels, scores, latency_ms=rng.lognormal(2.0, 0.3, 300), labelled=False)
    verdict = judge(store, policy(), 100_000, NOW)
    assert verdict["verdict"] == "rollback"
    assert criterion(verdict, "p95 latency")["outcome"] == "fail"
    assert criterion(verdict, "auc")["outcome"] == "insufficient"


def test_cost_is_judged_only_when_the_stable_version_has_one(store):
    labels, scores = population(3000, 13, 2.0)
    serve(store, "1", labels, scores, request_prefix="a")
    serve(store, "2", labels, scores, request_prefix="a")
    names = [c["name"] for c in judge(store, policy(), 100_000, NOW)["criteria"]]
    assert names == ["auc", "p95 latency"]


def test_a_dearer_candidate_fails_on_cost_per_row(store):
    labels, scores = population(3000, 14, 2.0)
    serve(store, "1", labels, scores, request_prefix="a", cost_per_row=1e-6)
    serve(store, "2", labels, scores, request_prefix="a", cost_per_row=1.5e-6)
    verdict = judge(store, policy(), 100_000, NOW)
    cost = criterion(verdict, "cost per row")
    assert cost["outcome"] == "fail" and cost["regression"] == pytest.approx(0.5)
    assert verdict["verdict"] == "rollback"


@pytest.mark.parametrize("metric", ["log_loss", "accuracy"])
def test_log_loss_and_accuracy_are_judged_on_intervals_too(store, metric: str):
    serve(store, "1", *population(3000, 15, 3.0))
    serve(store, "2", *population(3000, 16, 0.0))
    verdict = judge(store, policy(primary_metric=metric), 100_000, NOW)
    judged = criterion(verdict, metric)
    assert judged["outcome"] == "fail" and verdict["verdict"] == "rollback"
    assert judged["difference_low"] <= judged["difference"] <= judged["difference_high"]


def test_the_verdict_keeps_its_json_shape_for_the_page_and_the_cli(store):
    labels, scores = population(3000, 17, 2.0)
    serve(store, "1", labels, scores, request_prefix="a")
    serve(store, "2", labels, scores, request_prefix="a")
    verdict = json.loads(json.dumps(judge(store, policy(), 100_000, NOW)))
    assert {"verdict", "reasons", "evidence", "primary_metric", "stable", "candidate"} <= set(
        verdict
    )
    for role in ("stable", "candidate"):
        evidence = verdict["evidence"][role]
        for key in ("labelled", "positives", "negatives", "auc", "p95_total_ms", "cost_per_row"):
            assert key in evidence
    assert verdict["evidence"]["candidate"]["labelled"] == 3000
    assert len(verdict["reasons"]) == len(verdict["criteria"])
