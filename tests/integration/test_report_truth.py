"""Reports say what they are: how much of their window they read, and how their rows are
labelled, checked against what was sent (events published straight to a real sidecar, labels
at known times into a real store); and label noise reads differently from a regression."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from gateway.api.v1 import events_pb2 as ev
from gateway.api.v1 import events_pb2_grpc as ev_grpc
from gateway.evaluation.labels import label_notes
from gateway.evaluation.profile import numeric_profile, write_reference
from gateway.evaluation.report import build_report
from gateway.evaluation.store import EventStore
from tests.conftest import SidecarProcess, free_port

SECOND = 1_000_000


def event(i: int, time_us: int, scores: np.ndarray, segment: str = "") -> ev.PredictionEvent:
    e = ev.PredictionEvent(
        event_id=f"e{i}",
        request_id=f"r{i}",
        model="m",
        version="1",
        event_time_us=time_us,
        rows=len(scores),
    )
    if segment:
        e.segments["batch"] = segment
    e.outputs.add(name="p", values=scores.astype("<f8").tobytes(), width=1)
    return e


def gateway_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args], capture_output=True, text=True, timeout=120
    )


def test_a_report_cut_by_max_report_events_says_so(tmp_path: Path):
    sidecar = SidecarProcess(
        tmp_path / "store",
        free_port(),
        tmp_path / "logs",
        env={"GATEWAY_EVALUATION__MAX_REPORT_EVENTS": "20"},
    )
    now = time.time_ns() // 1000
    times = [now - (30 - i) * SECOND for i in range(30)]  # one a second, the last 1 s ago
    events = [event(i, t, np.array([0.2, 0.7])) for i, t in enumerate(times)]
    try:
        with grpc.insecure_channel(sidecar.address) as channel:
            stub = ev_grpc.EvaluationServiceStub(channel)
            acks = list(stub.Publish(iter([ev.EventBatch(sequence=1, events=events)])))
            assert sum(a.stored for a in acks) == 30
            labels = [ev.Label(request_id=f"r{i}", row=0, value=1) for i in range(0, 30, 2)]
            stub.PutLabels(ev.PutLabelsRequest(labels=labels), timeout=30)
        out = gateway_cli("report", "m", "--json", "--sidecar", sidecar.address)
        assert out.returncode == 0, out.stderr
        body = json.loads(out.stdout)
        assert (body["events"], body["events_in_window"], body["truncated"]) == (20, 30, True)
        assert body["max_events"] == 20
        assert body["read_start_us"] == times[10]  # the latest 20: events 10 to 29
        # Of the 40 rows read, rows 0 of events 10, 12, ..., 28 are labelled.
        assert body["labels"]["rows"] == 40 and body["labels"]["labelled"] == 10
        assert body["labels"]["share"] == 0.25
        assert body["versions"]["1"]["all"]["labels"]["share"] == 0.25
        text = gateway_cli("report", "m", "--sidecar", sidecar.address)
        assert text.returncode == 0, text.stderr
        assert "WARNING: Read only the latest 20 of 30 events in the window" in text.stdout
        assert "(max_report_events 20)" in text.stdout
        assert "Labelled 10 of 40 rows (25.0%)" in text.stdout
    finally:
        sidecar.stop()
    whole = EventStore(tmp_path / "store")
    try:
        report = build_report(whole, "m", 3600, None, 30, now_us=now)
        assert (report["events"], report["events_in_window"], report["truncated"]) == (
            30,
            30,
            False,
        )
        assert report["read_start_us"] == times[0]
    finally:
        whole.close()


def test_label_share_delay_and_replacements_match_what_was_sent(tmp_path: Path):
    store = EventStore(tmp_path)
    now = 10_000 * SECOND
    rng = np.random.default_rng(3)
    events = [
        event(i, now - (300 - i) * SECOND, rng.random(3), "a" if i % 2 else "b") for i in range(100)
    ]
    store.ingest(events, now)
    delays = {}  # (event, row) -> seconds from prediction to its first label
    for i in range(0, 100, 3):
        for row in range(i % 3 + 1):
            received = events[i].event_time_us + (10 + 7 * i + row) * SECOND
            store.put_labels([ev.Label(request_id=f"r{i}", row=row, value=row % 2)], 3600, received)
            delays[(i, row)] = 10 + 7 * i + row
    # Sent again later: events 0..29's labelled rows, the same value, except every 4th flipped.
    resent = sorted(k for k in delays if k[0] < 30)
    flipped = set(resent[::4])
    store.put_labels(
        [
            ev.Label(
                request_id=f"r{i}", row=row, value=(1 - row % 2) if (i, row) in flipped else row % 2
            )
            for i, row in resent
        ],
        3600,
        now + 5000 * SECOND,
    )
    try:
        report = build_report(store, "m", 3600, None, 1000, now_us=now + 10 * SECOND)
    finally:
        store.close()
    for segment, picks in (("all", (0, 1)), ("batch=a", (1,)), ("batch=b", (0,))):
        labels = report["versions"]["1"][segment]["labels"]
        mine = {k: d for k, d in delays.items() if k[0] % 2 in picks}
        assert labels["rows"] == 3 * 50 * len(picks)
        assert labels["labelled"] == len(mine)
        assert labels["share"] == pytest.approx(len(mine) / labels["rows"])
        values = np.array(list(mine.values()), dtype=float)
        assert labels["delay_s"] == {
            "p50": pytest.approx(np.quantile(values, 0.5)),
            "p90": pytest.approx(np.quantile(values, 0.9)),
            "max": values.max(),
        }
        assert (
            labels["replaced"]
            == labels["relabelled_rows"]
            == sum(1 for k in resent if k[0] % 2 in picks)
        )
        assert labels["disagreeing"] == sum(1 for k in flipped if k[0] % 2 in picks)
        quality = report["versions"]["1"][segment]["quality"]
        assert quality["labelled"] == labels["labelled"]
    assert report["labels"] == report["versions"]["1"]["all"]["labels"]


def test_label_noise_and_a_regression_read_differently_in_a_report(tmp_path: Path):
    """Three segments of one calibrated model (~3% positives): clean labels, the same with
    10% flipped (noise), and scores no longer ordered by the labels (a regression)."""
    rng = np.random.default_rng(5)
    n = 2000

    def calibrated() -> tuple[np.ndarray, np.ndarray]:
        scores = 1 / (1 + np.exp(-(rng.normal(size=n) * 1.5 - 4.2)))
        return scores, (rng.random(n) < scores).astype(float)

    (tmp_path / "repo" / "m").mkdir(parents=True)
    write_reference(
        tmp_path / "repo" / "m" / "reference.json",
        {"features": {}, "versions": {"1": {"outputs": {"p": numeric_profile(calibrated()[0])}}}},
    )
    store = EventStore(tmp_path / "store")
    now = 10_000 * SECOND
    sent = []
    for k, segment in enumerate(("clean", "noisy", "regressed")):
        scores, y = calibrated()
        if segment == "noisy":
            y = np.where(rng.random(n) < 0.1, 1 - y, y)
        if segment == "regressed":
            y = y[rng.permutation(n)]
        store.ingest([event(k, now - 60 * SECOND, scores, segment)], now)
        sent += [ev.Label(request_id=f"r{k}", row=r, value=v) for r, v in enumerate(y)]
    store.put_labels(sent, 3600, now)
    try:
        report = build_report(store, "m", 3600, tmp_path / "repo", 1000, now_us=now)
    finally:
        store.close()
    segments = report["versions"]["1"]

    def notes(segment: str) -> list[str]:
        return label_notes(segments[segment]["labels"], segments[segment].get("output"))

    assert segments["batch=noisy"]["output"]["psi"] < 0.1  # the scores held
    assert notes("batch=clean") == [] and notes("batch=regressed") == []
    assert len(notes("batch=noisy")) == 1 and "label noise" in notes("batch=noisy")[0]
    # Both lost AUC against the clean segment: the AUC alone cannot tell them apart.
    clean_auc = segments["batch=clean"]["quality"]["auc"]
    assert segments["batch=noisy"]["quality"]["auc"] < clean_auc - 0.1
    assert segments["batch=regressed"]["quality"]["auc"] < clean_auc - 0.1
