"""The evaluation loop end to end: real gateway and sidecar processes, the sidecar's DuckDB,
labels through ``gateway labels``, reports through ``gateway report``.

One load is sent once for the module, in segments: a sample of the training distribution, the
same with one feature shifted, a country segment with a new channel category, and labelled
rows. Every test reads the sidecar's report (or export) of that load.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import tritonclient.grpc as triton_grpc
from prometheus_client.parser import text_string_to_metric_families

from gateway.demo import synthetic_transactions
from tests.conftest import GatewayProcess, SidecarProcess, free_port

ROWS_PER_REQUEST = 50
REQUESTS = 10


@dataclass
class Load:
    gateway: GatewayProcess
    sidecar: SidecarProcess
    scores: dict[str, list[float]] = field(default_factory=dict)  # segment -> scores
    labels: dict[str, list[float]] = field(default_factory=dict)
    request_ids: list[str] = field(default_factory=list)


def raw_inputs(
    columns: dict[str, np.ndarray], client: Any = triton_grpc, **options: bool
) -> list[Any]:
    """Named raw features as ``client``'s InferInputs (``tritonclient.grpc`` or ``.http``;
    ``options`` for its ``set_data_from_numpy``, such as ``binary_data``)."""
    inputs = []
    for name, values in columns.items():
        if values.dtype == object:
            array = np.array([str(v).encode() for v in values], dtype=object)
            datatype = "BYTES"
        else:
            array = values
            datatype = client.np_to_triton_dtype(values.dtype)
        tensor = client.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array, **options)
        inputs.append(tensor)
    return inputs


def with_new_channel(columns: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every third row's channel becomes "crypto", a category the reference never saw."""
    every_third = np.arange(len(columns["channel"])) % 3 == 0
    channel = np.where(every_third, "crypto", columns["channel"]).astype(object)
    return {**columns, "channel": channel}


def gateway_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args], capture_output=True, text=True, timeout=120
    )


@pytest.fixture(scope="module")
def load(demo_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Load]:
    work = tmp_path_factory.mktemp("evaluation")
    port = free_port()
    sidecar_env = {
        "GATEWAY_EVALUATION__EVALUATE_EVERY_S": "0.5",
        "GATEWAY_EVALUATION__METRICS_PORT": "0",
        "GATEWAY_EVALUATION__HTTP_PORT": "0",
    }
    sidecar_args = ["--repository", str(demo_repo)]
    sidecar = SidecarProcess(work / "store", port, work / "logs", *sidecar_args, env=sidecar_env)
    gateway_args = ["--sidecar", f"127.0.0.1:{port}", "--events-dir", str(work / "events")]
    gateway = GatewayProcess(demo_repo, work / "gateway", *gateway_args)
    result = Load(gateway, sidecar)
    client = gateway.client()
    try:
        segments = {
            "batch=reference": lambda c: c,
            "batch=shifted": lambda c: {**c, "amount": c["amount"] * 8},
            "geo=BR": with_new_channel,
            "geo=US": lambda c: c,
        }
        for s, (segment, change) in enumerate(segments.items()):
            key, value = segment.split("=")
            for i in range(REQUESTS):
                columns, y = synthetic_transactions(ROWS_PER_REQUEST, seed=1000 + 37 * s + i)
                request_id = f"{segment}-{i}"
                reply = client.infer(
                    "fraud",
                    raw_inputs(change(columns)),
                    model_version="2",
                    request_id=request_id,
                    parameters={f"segment.{key}": value},
                )
                result.scores.setdefault(segment, []).extend(
                    reply.as_numpy("probability").ravel().tolist()
                )
                result.labels.setdefault(segment, []).extend(y.tolist())
                result.request_ids.append(request_id)
        deadline = time.monotonic() + 60
        while gateway.metric("gateway_events_total", outcome="acked") < len(result.request_ids):
            assert time.monotonic() < deadline, "events never all reached the sidecar"
            time.sleep(0.05)
        yield result
    finally:
        client.close()
        gateway.stop()
        sidecar.stop()


def report(load: Load) -> dict:
    out = gateway_cli("report", "fraud", "--json", "--sidecar", load.sidecar.address)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def alerts(report: dict, rule: str) -> set[tuple[str, str]]:
    return {(a["segment"], a["feature"]) for a in report["alerts"] if a["rule"] == rule}


def test_drift_is_flagged_for_the_shifted_feature_and_not_for_a_fresh_reference_sample(load):
    body = report(load)
    segments = body["versions"]["2"]
    assert segments["batch=reference"]["rows"] == REQUESTS * ROWS_PER_REQUEST
    assert segments["batch=shifted"]["features"]["amount"]["psi"] > 1.0
    assert segments["batch=reference"]["features"]["amount"]["psi"] < 0.1
    shifted = segments["batch=shifted"]["features"]["amount"]
    assert shifted["quantiles"]["p50"] > 4 * shifted["reference_quantiles"]["p50"]
    assert len(shifted["histogram"]) == 10 and sum(shifted["histogram"]) == pytest.approx(1)
    fired = alerts(body, "feature_drift")
    assert ("batch=shifted", "amount") in fired
    assert not {f for s, f in fired if s == "batch=reference"}
    assert not {f for s, f in fired if s == "batch=shifted"} - {"amount"}
    # The whole segment is shifted: its recent window crosses the threshold, not only the CUSUM.
    alert = next(
        a for a in body["alerts"] if (a["segment"], a["feature"]) == ("batch=shifted", "amount")
    )
    assert alert["detector"] == "window" and alert["cusum"] > alert["cusum_limit"]


def test_a_new_category_is_flagged_for_its_segment_only(load):
    body = report(load)
    segments = body["versions"]["2"]
    assert segments["geo=BR"]["features"]["channel"]["oov"] == pytest.approx(1 / 3, abs=0.01)
    assert segments["geo=US"]["features"]["channel"]["oov"] == 0
    frequencies = segments["geo=BR"]["features"]["channel"]["frequencies"]
    assert frequencies["crypto"] == pytest.approx(1 / 3, abs=0.01)
    assert segments["geo=BR"]["features"]["channel"]["reference_frequencies"]["crypto"] == 0
    fired = alerts(body, "new_categories")
    assert ("geo=BR", "channel") in fired
    alert = next(a for a in body["alerts"] if (a["segment"], a["feature"]) == ("geo=BR", "channel"))
    assert alert["source"] == "values"  # in clear: read from the values, as before
    assert not {s for s, _ in fired if s.startswith("geo=") and s != "geo=BR"}
    assert not {s for s, _ in fired if s.startswith("batch=")}


def numpy_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """The probability a random positive outscores a random negative (ties count half)."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + ties / 2) / (len(pos) * len(neg)))


def test_labels_join_by_request_id_and_per_segment_auc_matches_numpy(load, tmp_path: Path):
    path = tmp_path / "labels.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["request_id", "row", "label"])
        for segment in ("batch=reference", "geo=US"):
            labels = load.labels[segment]
            for k, label in enumerate(labels):
                writer.writerow([f"{segment}-{k // ROWS_PER_REQUEST}", k % ROWS_PER_REQUEST, label])
        writer.writerow(["no-such-request", 0, 1])
    out = gateway_cli("labels", str(path), "--sidecar", load.sidecar.address)
    assert out.returncode == 0, out.stderr
    joined = 2 * REQUESTS * ROWS_PER_REQUEST
    assert f"{joined + 1} labels sent: {joined} joined a prediction, 1 wait" in out.stdout
    segments = report(load)["versions"]["2"]
    for segment in ("batch=reference", "geo=US"):
        labels = np.array(load.labels[segment])
        scores = np.array(load.scores[segment], dtype=np.float32).astype(np.float64)
        quality = segments[segment]["quality"]
        assert quality["labelled"] == len(labels)
        assert quality["auc"] == pytest.approx(numpy_auc(labels, scores), abs=1e-12)
        p = np.clip(scores, 1e-7, 1 - 1e-7)
        log_loss = -np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p))
        assert quality["log_loss"] == pytest.approx(log_loss, rel=1e-9)
        assert quality["accuracy"] == pytest.approx(np.mean((scores >= 0.5) == (labels == 1)))
    assert segments["batch=shifted"]["quality"]["labelled"] == 0
    body = report(load)
    rows = len(load.request_ids) * ROWS_PER_REQUEST
    assert (body["labels"]["labelled"], body["labels"]["rows"]) == (joined, rows)
    assert body["labels"]["share"] == joined / rows
    for segment in ("batch=reference", "geo=US"):
        labels = body["versions"]["2"][segment]["labels"]
        assert labels["share"] == 1.0 and labels["replaced"] == 0
        delay = labels["delay_s"]  # sent within the module's run, after every prediction
        assert 0 < delay["p50"] <= delay["p90"] <= delay["max"] < 600
    assert body["versions"]["2"]["batch=shifted"]["labels"]["share"] == 0

    export = tmp_path / "train.parquet"
    out = gateway_cli(
        "export", "fraud", "--labelled", "--out", str(export), "--sidecar", load.sidecar.address
    )
    assert out.returncode == 0, out.stderr
    table = pq.read_table(export).to_pydict()
    assert len(table["label"]) == joined
    assert {"amount", "hour", "channel", "score", "label", "version", "segment.geo"} <= set(table)
    assert set(table["version"]) == {"2"}
    assert_resent_labels_are_counted(load, tmp_path)


def test_the_report_prints_as_tables(load):
    out = gateway_cli("report", "fraud", "--sidecar", load.sidecar.address)
    assert out.returncode == 0, out.stderr
    assert "version 2 · batch=shifted" in out.stdout
    events = len(load.request_ids)
    assert re.search(rf"fraud: Last 1 h \(.+ UTC to .+ UTC\): {events} events", out.stdout)
    assert "WARNING" not in out.stdout  # max_report_events did not cut the window
    rows = events * ROWS_PER_REQUEST
    assert re.search(rf"^(Labelled \d+ of|No labels joined the) {rows} rows", out.stdout, re.M)
    assert "  labels: No labels joined the 500 rows read" in out.stdout  # batch=shifted
    assert "feature_drift" in out.stdout and "retrain" in out.stdout
    bad = gateway_cli("labels", "/nonexistent.csv", "--sidecar", load.sidecar.address)
    assert bad.returncode == 2 and "cannot read labels" in bad.stderr


def test_fired_alerts_go_to_the_alert_log_and_to_prometheus(load):
    log_path = load.sidecar.store / "alerts.jsonl"
    deadline = time.monotonic() + 60
    while True:
        lines = log_path.read_text().splitlines() if log_path.exists() else []
        entries = [json.loads(line) for line in lines]
        firing = {
            (e["rule"], e["segment"], e["feature"]) for e in entries if e["state"] == "firing"
        }
        if ("feature_drift", "batch=shifted", "amount") in firing:
            break
        assert time.monotonic() < deadline, f"no drift alert logged: {entries}"
        time.sleep(0.2)
    assert not {f for f in firing if f[0] == "feature_drift" and f[1] == "batch=reference"}
    entry = next(e for e in entries if e["segment"] == "batch=shifted" and e["feature"] == "amount")
    assert entry["action"] == "retrain" and entry["value"] > entry["threshold"]
    # the round that fired saw at least min_samples (200) of the segment's rows: a slow client
    # leaves a round between the segment's first events and its last
    assert entry["window_rows"] == 2000 and 200 <= entry["samples"] <= REQUESTS * ROWS_PER_REQUEST
    assert {e["state"] for e in entries} <= {"firing", "resolved", "window_emptied"}
    with urllib.request.urlopen(f"http://{load.sidecar.metrics_url}/metrics", timeout=10) as r:
        text = r.read().decode()
    samples = {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    labels = {
        "rule": "feature_drift",
        "model": "fraud",
        "version": "2",
        "segment": "batch=shifted",
        "feature": "amount",
        "action": "retrain",
    }
    key = frozenset(labels.items())
    assert samples[("sidecar_alert_firing", key)] == 1
    assert samples[("sidecar_events_total", frozenset({"outcome": "stored"}.items()))] >= 40


def chromium(*args: str, profile: Path) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("chromium")
    assert binary, "the HTML report test needs Debian's chromium (make test installs it)"
    command = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
    command += [f"--user-data-dir={profile}", "--virtual-time-budget=5000", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def test_the_html_report_renders_in_headless_chromium(load, tmp_path: Path):
    """Every chart draws visible geometry, as the browser measured it once laid out: the
    module's load falls in one bucket of the drift timeline, so each feature's line is a single
    point, which a path alone would not draw."""
    url = f"http://{load.sidecar.http_url}/report/fraud"
    dom = chromium("--dump-dom", url, profile=tmp_path / "profile").stdout
    body = re.search(r"<body[^>]*>", dom)
    assert body, dom[:2000]
    # every chart, and every series of a line chart, drew a mark of non-zero length or area
    assert 'data-rendered="ok"' in body.group(0), body.group(0)
    assert "data-error" not in body.group(0)  # no script error
    charts = re.search(r'data-charts="(\d+)"', body.group(0))
    assert charts, body.group(0)
    assert int(charts.group(1)) >= 3
    marks = drawn_marks(body.group(0))
    assert set(marks) >= {"drift-2", "coverage-2"}, marks
    assert all(marks.values()), marks
    drift = re.search(r'<svg class="chart" id="drift-2".*?</svg>', dom, re.S)
    assert drift, dom[:2000]
    series = re.findall(r'<g class="series" data-series="([^"]+)">(.*?)</g>', drift.group(0))
    assert series and marks["drift-2"] >= len(series)
    for name, marks_of_series in series:
        assert visible_line_or_dot(marks_of_series), (name, marks_of_series)
    for text in (
        "Drift over time",
        "Coverage",
        "AUC per segment",
        "batch=shifted",
        "feature_drift",
    ):
        assert text in dom
    assert re.search(rf'<p id="window">Last 1 h \(.+?\): {len(load.request_ids)} events', dom)
    assert re.search(r'<p id="labels">(Labelled \d+ of|No labels joined the) \d+ rows', dom)
    shot = tmp_path / "report.png"
    chromium(f"--screenshot={shot}", "--window-size=1200,2400", url, profile=tmp_path / "p2")
    assert shot.exists() and shot.stat().st_size > 10_000
    index = chromium("--dump-dom", f"http://{load.sidecar.http_url}/", profile=tmp_path / "p3")
    assert 'href="/report/fraud"' in index.stdout


def test_the_events_of_a_window_export_to_parquet(load, tmp_path: Path):
    sidecar = ("--sidecar", load.sidecar.address)

    def export(*window: str) -> int:
        path = tmp_path / f"events-{len(window)}-{window[-1] if window else 'all'}.parquet"
        out = gateway_cli("export", "fraud", "--out", str(path), *sidecar, *window)
        assert out.returncode == 0, out.stderr
        return pq.read_table(path).num_rows

    assert export() == len(load.request_ids)
    assert export("--since", "2000-01-01T00:00:00") == len(load.request_ids)
    assert export("--since", "2000-01-01", "--until", "2001-01-01") == 0
    bad = gateway_cli(
        "export", "fraud", "--out", str(tmp_path / "x.parquet"), "--since", "soon", *sidecar
    )
    assert bad.returncode == 2 and "--since: 'soon' is not an ISO 8601 time" in bad.stderr


def test_export_writes_only_within_the_sidecars_export_directory(tmp_path: Path):
    """Export takes a path relative to evaluation.export_directory and nothing that leads out
    of it (absolute, "..", a link); with no directory set it writes nothing at all."""
    import grpc

    from gateway.api.v1 import events_pb2 as ev
    from gateway.api.v1 import events_pb2_grpc as ev_grpc

    exports, outside = tmp_path / "exports", tmp_path / "outside"
    exports.mkdir()
    outside.mkdir()
    (exports / "away").symlink_to(outside)
    env = {"GATEWAY_EVALUATION__EXPORT_DIRECTORY": str(exports)}
    confined = SidecarProcess(tmp_path / "store", free_port(), tmp_path / "logs", env=env)
    unset = SidecarProcess(tmp_path / "store-2", free_port(), tmp_path / "logs")
    try:
        with grpc.insecure_channel(confined.address) as channel:
            stub = ev_grpc.EvaluationServiceStub(channel)

            def export(path: str) -> ev.ExportResponse | grpc.RpcError:
                try:
                    return stub.Export(ev.ExportRequest(model="fraud", path=path), timeout=30)
                except grpc.RpcError as err:
                    return err

            for path in (str(outside / "x.parquet"), "../outside/x.parquet", "away/x.parquet"):
                refused = export(path)
                assert isinstance(refused, grpc.RpcError), path
                assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT, path
                assert "export directory" in (refused.details() or "")
            written = export("daily/events.parquet")
            assert isinstance(written, ev.ExportResponse)
            assert Path(written.path) == (exports / "daily" / "events.parquet").resolve()
            assert pq.read_table(written.path).num_rows == 0
        assert list(outside.iterdir()) == []
        with grpc.insecure_channel(unset.address) as channel:
            stub = ev_grpc.EvaluationServiceStub(channel)
            with pytest.raises(grpc.RpcError) as info:
                stub.Export(ev.ExportRequest(model="fraud", path="x.parquet"), timeout=30)
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            chunks = list(stub.ExportFile(ev.ExportRequest(model="fraud"), timeout=30))
            assert chunks and chunks[-1].rows == 0
            assert pq.read_table(pa_buffer(b"".join(c.data for c in chunks))).num_rows == 0
        # ExportFile's private file is gone once sent.
        assert not list((tmp_path / "store-2").glob("export-*"))
    finally:
        confined.stop()
        unset.stop()


def pa_buffer(data: bytes):
    import pyarrow as pa

    return pa.BufferReader(data)


def assert_resent_labels_are_counted(load: Load, tmp_path: Path) -> None:
    """geo=US's first request labelled again: 45 rows the same, 5 flipped."""
    path = tmp_path / "again.csv"
    labels = load.labels["geo=US"][:ROWS_PER_REQUEST]
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["request_id", "row", "label"])
        for k, label in enumerate(labels):
            writer.writerow(["geo=US-0", k, 1 - label if k < 5 else label])
    out = gateway_cli("labels", str(path), "--sidecar", load.sidecar.address)
    assert out.returncode == 0, out.stderr
    body = report(load)
    us = body["versions"]["2"]["geo=US"]["labels"]
    assert (us["replaced"], us["relabelled_rows"]) == (ROWS_PER_REQUEST, ROWS_PER_REQUEST)
    assert (us["disagreeing"], us["disagreeing_rows"]) == (5, 5)
    assert us["labelled"] == REQUESTS * ROWS_PER_REQUEST  # replaced, not added
    assert body["versions"]["2"]["batch=reference"]["labels"]["replaced"] == 0
    assert body["labels"]["replaced"] == ROWS_PER_REQUEST


def drawn_marks(body_tag: str) -> dict[str, int]:
    """The marks with geometry each chart drew, as the page's script measured them."""
    found = re.search(r'data-marks="([^"]*)"', body_tag)
    assert found, body_tag
    return {k: int(v) for k, v in (item.split("=") for item in found.group(1).split())}


def visible_line_or_dot(svg: str) -> bool:
    """A path through two distinct points, or a dot of non-zero radius."""
    for d in re.findall(r' d="([^"]*)"', svg):
        points = {tuple(p) for p in re.findall(r"[ML]\s*([-\d.]+),([-\d.]+)", d)}
        if len(points) >= 2:
            return True
    return any(float(r) > 0 for r in re.findall(r'<circle [^>]*\br="([\d.]+)"', svg))
