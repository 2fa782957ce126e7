"""Label quality: share, delay, replaced and contradicted labels, and the base-rate signal that
tells label noise from a model regression; on a real DuckDB store where labels join."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gateway.api.v1 import events_pb2 as ev
from gateway.evaluation.labels import RowLabels, label_notes, label_quality, read_labels
from gateway.evaluation.store import EventStore

SECOND = 1_000_000


@pytest.fixture
def store(tmp_path: Path):
    s = EventStore(tmp_path)
    yield s
    s.close()


def event(i: int, rows: int = 1, entity: str = "") -> ev.PredictionEvent:
    return ev.PredictionEvent(
        event_id=f"e{i}",
        request_id=f"r{i}",
        entity_key=entity,
        model="m",
        version="1",
        event_time_us=1_000 * SECOND + i * SECOND,
        rows=rows,
    )


def labels_of(store: EventStore) -> dict[tuple[str, int], tuple[float, float, int, int]]:
    table = read_labels(store, "true", []).to_pydict()
    ids = dict(store.query("SELECT rowid, event_id FROM events"))
    return {
        (ids[e], r): (v, d / SECOND, n, k) for e, r, v, d, n, k in zip(*table.values(), strict=True)
    }


def test_replaced_and_contradicted_labels_are_counted_per_prediction_row(store):
    store.ingest([event(1, rows=3), event(2, entity="card")], 0)
    first = 1_010 * SECOND  # 9 s after e1, 8 s after e2
    store.put_labels(
        [
            ev.Label(request_id="r1", row=0, value=1),
            ev.Label(request_id="r1", row=1, value=0),
            ev.Label(entity_key="card", value=1, event_time_us=1_003 * SECOND),
        ],
        3600,
        first,
    )
    store.put_labels(
        [
            ev.Label(request_id="r1", row=0, value=1),  # the same again
            ev.Label(request_id="r1", row=1, value=1),  # changed its mind
            ev.Label(entity_key="card", value=0, event_time_us=1_003 * SECOND),  # changed
        ],
        3600,
        first + 60 * SECOND,
    )
    store.put_labels([ev.Label(request_id="r1", row=1, value=0)], 3600, first + 120 * SECOND)
    assert labels_of(store) == {
        ("e1", 0): (1.0, 9.0, 1, 0),
        ("e1", 1): (0.0, 9.0, 2, 1),  # 0, 1, 0: the kept 0 contradicts the 1 once
        ("e2", 0): (0.0, 8.0, 1, 1),
    }


def test_label_quality_reads_share_delay_and_copies_of_the_rows_asked_for():
    labels = RowLabels.unlabelled(6)
    labels.value[:4] = [1, 0, 0, 1]
    labels.delay_s[:4] = [10, 20, 30, 400]
    labels.replaced[:4] = [0, 2, 1, 0]
    labels.disagreeing[:4] = [0, 1, 0, 0]
    rows = np.array([True, True, True, False, True, True])
    q = label_quality(labels, rows, np.full(6, 0.5))
    assert q["rows"] == 5 and q["labelled"] == 3 and q["share"] == pytest.approx(0.6)
    assert q["delay_s"] == {"p50": 20.0, "p90": pytest.approx(28.0), "max": 30.0}
    assert (q["replaced"], q["relabelled_rows"]) == (3, 2)
    assert (q["disagreeing"], q["disagreeing_rows"], q["disagreement"]) == (1, 1, 0.5)
    assert q["positive_rate"] == pytest.approx(1 / 3)
    assert q["expected_positive_rate"] == 0.5
    assert "base_rate_z" not in q  # 1.5 expected positives: too few for a z-score
    empty = label_quality(RowLabels.unlabelled(3), np.ones(3, bool), np.full(3, 0.5))
    assert empty == {
        "rows": 3,
        "labelled": 0,
        "share": 0.0,
        "replaced": 0,
        "relabelled_rows": 0,
        "disagreeing": 0,
        "disagreeing_rows": 0,
    }


def calibrated(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores with ~3% positives and labels drawn from them: a calibrated model."""
    rng = np.random.default_rng(seed)
    scores = 1 / (1 + np.exp(-(rng.normal(size=n) * 1.5 - 4.2)))
    return scores, (rng.random(n) < scores).astype(float)


def quality_of(scores: np.ndarray, y: np.ndarray) -> dict:
    labels = RowLabels.unlabelled(len(y))
    labels.value[:] = y
    return label_quality(labels, np.ones(len(y), bool), scores)


def test_clean_labels_of_a_calibrated_model_stay_within_the_base_rate_bound():
    zs = [quality_of(*calibrated(3000, seed))["base_rate_z"] for seed in range(200)]
    assert np.mean(np.abs(zs) >= 3) <= 0.02  # about 0.3% for a standard normal
    assert abs(np.mean(zs)) < 0.25 and 0.8 < np.std(zs) < 1.2


def test_flipped_labels_are_told_apart_from_a_regression():
    scores, y = calibrated(3000, seed=7)
    flipped = np.where(np.random.default_rng(8).random(len(y)) < 0.1, 1 - y, y)
    noisy = quality_of(scores, flipped)
    assert noisy["base_rate_z"] > 10
    notes = label_notes(noisy, {"psi": 0.01})
    assert len(notes) == 1 and "label noise" in notes[0] and "scores held" in notes[0]
    # A regression: the same labels, scores no longer ordered by them (but as many positives
    # expected): the labels' base rate is what the scores expect, so nothing is said of them.
    regressed = quality_of(np.random.default_rng(9).permutation(scores), y)
    assert abs(regressed["base_rate_z"]) < 3
    assert label_notes(regressed, {"psi": 0.0}) == []
    moved = label_notes(noisy, {"psi": 0.8})
    assert "scores moved too" in moved[0] and "label noise" not in moved[0]
    assert "no score reference" in label_notes(noisy)[0]


def test_contradicting_copies_make_a_note():
    labels = {"disagreeing_rows": 3, "relabelled_rows": 12, "disagreement": 0.25}
    assert label_notes(labels) == [
        "3 of 12 relabelled rows were given a different label (25%): the labels are noisy"
    ]
