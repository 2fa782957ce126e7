"""Prediction events end to end: a real gateway, a real sidecar process, its real DuckDB file.

Events must arrive exactly once (by count and by id) across a sidecar killed mid-load, and
across a gateway killed with events still in its log; at the disk bound each policy does what
it says and counts it.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import duckdb
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from tritonclient.utils import InferenceServerException

from gateway.demo import synthetic_transactions
from tests.auth import wait_until
from tests.conftest import DEMO_WIDTH, GatewayProcess, SidecarProcess, demo_features, free_port


def events_args(sidecar_port: int, directory: Path) -> tuple[str, ...]:
    return ("--sidecar", f"127.0.0.1:{sidecar_port}", "--events-dir", str(directory))


def dense_inputs(rows: int, seed: int = 3) -> list[triton_grpc.InferInput]:
    tensor = triton_grpc.InferInput("features", [rows, DEMO_WIDTH], "FP32")
    tensor.set_data_from_numpy(demo_features(rows, seed))
    return [tensor]


def send(gateway: GatewayProcess, ids: Iterable[str], threads: int = 8) -> list[str]:
    """Infer once per id (concurrently); returns the ids that were answered."""
    ids = list(ids)

    def one(chunk: list[str]) -> list[str]:
        client = gateway.client()
        answered = []
        try:
            for request_id in chunk:
                client.infer("fraud", dense_inputs(2), request_id=request_id)
                answered.append(request_id)
        finally:
            client.close()
        return answered

    chunks = [ids[i::threads] for i in range(threads)]
    with ThreadPoolExecutor(threads) as pool:
        return [i for done in pool.map(one, chunks) for i in done]


def acked_all(gateway: GatewayProcess) -> bool:
    """Nothing waits in memory or on disk: every event is acknowledged (or was dropped)."""
    return (
        gateway.metric("gateway_events_total", outcome="recorded") > 0
        and gateway.metric("gateway_events_backlog", where="memory") == 0
        and gateway.metric("gateway_events_backlog", where="disk") == 0
    )


def stored(sidecar: SidecarProcess) -> list[tuple]:
    """Stop the sidecar (cleanly: it must exit 0) and read its DuckDB file."""
    assert sidecar.stop() == 0, sidecar.stderr()
    with duckdb.connect(str(sidecar.store / "events.duckdb"), read_only=True) as db:
        return db.execute("SELECT request_id, event_id FROM events").fetchall()


def test_events_arrive_exactly_once_across_a_sidecar_kill(
    demo_repo: Path, start_gateway, start_sidecar, tmp_path: Path
):
    port, store = free_port(), tmp_path / "store"
    sidecar = start_sidecar(store, port)
    gateway = start_gateway(demo_repo, *events_args(port, tmp_path / "events"))
    ids = [f"req-{i}" for i in range(900)]
    with ThreadPoolExecutor(1) as load:
        running = load.submit(send, gateway, ids)
        wait_until(lambda: gateway.metric("gateway_events_total", outcome="acked") > 100, "acks")
        sidecar.stop(signal.SIGKILL)  # mid-load, batches in flight
        time.sleep(0.5)
        sidecar = start_sidecar(store, port)
        answered = running.result()
    assert sorted(answered) == sorted(ids)  # the outage never failed a prediction
    wait_until(lambda: acked_all(gateway), "every event acknowledged")
    rows = stored(sidecar)
    assert len(rows) == len(ids)
    assert sorted(r[0] for r in rows) == sorted(ids)
    assert len({r[1] for r in rows}) == len(ids)
    assert gateway.metric("gateway_events_total", outcome="dropped") == 0


def test_events_in_the_log_survive_a_gateway_kill(
    demo_repo: Path, start_gateway, start_sidecar, tmp_path: Path
):
    port, store, log_dir = free_port(), tmp_path / "store", tmp_path / "events"
    first = start_gateway(demo_repo, *events_args(port, log_dir))  # no sidecar yet
    send(first, [f"a-{i}" for i in range(150)])
    wait_until(
        lambda: first.metric("gateway_events_total", outcome="written") == 150,
        "events on disk",
    )
    first.stop(signal.SIGKILL)
    sidecar = start_sidecar(store, port)
    second = start_gateway(demo_repo, *events_args(port, log_dir))
    send(second, [f"b-{i}" for i in range(50)])
    wait_until(lambda: second.metric("gateway_events_backlog", where="disk") == 0, "replay")
    wait_until(lambda: acked_all(second), "every event acknowledged")
    ids = sorted(r[0] for r in stored(sidecar))
    assert ids == sorted([f"a-{i}" for i in range(150)] + [f"b-{i}" for i in range(50)])
    assert "not yet acknowledged, recovered from" in second.stderr()


def test_at_the_disk_bound_shed_refuses_predictions_until_the_sidecar_catches_up(
    demo_repo: Path, start_gateway, start_sidecar, tmp_path: Path
):
    port, store = free_port(), tmp_path / "store"
    bound = {
        "GATEWAY_EVENTS__MAX_DISK_BYTES": "40000",
        "GATEWAY_EVENTS__SEGMENT_BYTES": "8000",
        "GATEWAY_EVENTS__ON_FULL": "shed",
    }
    gateway = start_gateway(demo_repo, *events_args(port, tmp_path / "events"), env=bound)
    client = gateway.client()
    answered, refused = [], None
    for i in range(400):
        try:
            client.infer("fraud", dense_inputs(2), request_id=f"s-{i}")
            answered.append(f"s-{i}")
        except InferenceServerException as err:
            refused = err
            break
    assert refused is not None, "the bound was never reached"
    assert refused.status() == "StatusCode.UNAVAILABLE"
    assert "events.on_full: shed" in refused.message()
    assert gateway.metric("gateway_events_total", outcome="shed") >= 1
    assert gateway.metric("gateway_events_log_bytes") <= 40000 + 8000
    sidecar = start_sidecar(store, port)
    wait_until(lambda: acked_all(gateway), "the backlog acknowledged")
    client.infer("fraud", dense_inputs(2), request_id="after")  # serving again
    answered.append("after")
    wait_until(lambda: acked_all(gateway), "the last event acknowledged")
    client.close()
    assert sorted(r[0] for r in stored(sidecar)) == sorted(answered)  # none accepted was lost


def test_at_the_disk_bound_drop_oldest_keeps_serving_and_counts_the_loss(
    demo_repo: Path, start_gateway, start_sidecar, tmp_path: Path
):
    port, store = free_port(), tmp_path / "store"
    bound = {
        "GATEWAY_EVENTS__MAX_DISK_BYTES": "40000",
        "GATEWAY_EVENTS__SEGMENT_BYTES": "8000",
        "GATEWAY_EVENTS__ON_FULL": "drop_oldest",
        "GATEWAY_EVENTS__BATCH_EVENTS": "8",
    }
    gateway = start_gateway(demo_repo, *events_args(port, tmp_path / "events"), env=bound)
    ids = [f"d-{i:04d}" for i in range(300)]
    client = gateway.client()
    for request_id in ids:
        client.infer("fraud", dense_inputs(2), request_id=request_id)
    client.close()
    wait_until(
        lambda: gateway.metric("gateway_events_total", outcome="written") == len(ids),
        "every event written (the dropped ones before they were dropped)",
    )
    dropped = gateway.metric("gateway_events_total", outcome="dropped")
    assert dropped > 0
    assert "dropped the" in gateway.stderr() and "oldest unacknowledged events" in gateway.stderr()
    sidecar = start_sidecar(store, port)
    wait_until(lambda: acked_all(gateway), "what is left acknowledged")
    kept = sorted(r[0] for r in stored(sidecar))
    assert len(kept) == len(ids) - dropped
    assert kept == ids[len(ids) - len(kept) :]  # the oldest went, the newest stayed


class StoredEvent(NamedTuple):
    """One row of the sidecar's events table, in the order the test below selects it."""

    request_id: str
    tenant: str
    geo: str  # segments['geo']
    entity_key: str
    rows: int
    contract_version: str
    numeric_names: list[str]
    numeric: bytes  # little-endian float64, rows x numeric_names
    channel: list[str]  # strings['channel']
    country: list[str]  # strings['country']
    hashed: list[str]
    output_names: list[str]
    output_widths: list[int]
    outputs: bytes
    coverage: list[dict]


def test_an_event_carries_features_segments_and_outputs_with_sensitive_values_hashed(
    demo_repo: Path, start_gateway, start_sidecar, tmp_path: Path
):
    port = free_port()
    sidecar = start_sidecar(tmp_path / "store", port)
    gateway = start_gateway(demo_repo, *events_args(port, tmp_path / "events"))
    columns, _ = synthetic_transactions(3, seed=2)
    inputs = []
    for name, values in columns.items():
        array = (
            np.array([v.encode() for v in values], dtype=object)
            if values.dtype == object
            else values
        )
        datatype = "BYTES" if array.dtype == object else triton_grpc.np_to_triton_dtype(array.dtype)
        tensor = triton_grpc.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    client = gateway.client()
    result = client.infer(
        "fraud",
        inputs,
        parameters={"tenant": "acme", "segment.geo": "BR", "entity_key": "card-9"},
    )
    request_id = result.get_response().parameters["request_id"].string_param
    assert request_id
    client.close()
    wait_until(lambda: acked_all(gateway), "the event acknowledged")
    assert sidecar.stop() == 0
    with duckdb.connect(str(sidecar.store / "events.duckdb"), read_only=True) as db:
        row = db.execute(
            "SELECT request_id, tenant, segments['geo'], entity_key, rows, contract_version, "
            "numeric_names, numeric, strings['channel'], strings['country'], hashed, "
            "output_names, output_widths, outputs, coverage FROM events"
        ).fetchone()
    assert row is not None
    event = StoredEvent._make(row)
    identity = (event.request_id, event.tenant, event.geo, event.entity_key, event.rows)
    assert identity == (request_id, "acme", "BR", "card-9", 3)
    assert event.contract_version == "v2"
    names = event.numeric_names
    matrix = np.frombuffer(event.numeric, "<f8").reshape(3, len(names))
    for name in ("amount", "hour", "account_age_days", "tx_count_24h", "distance_km"):
        assert matrix[:, names.index(name)] == pytest.approx(columns[name].astype(float))
    assert event.channel == list(columns["channel"])
    assert event.hashed == ["country"] and "country" not in names
    assert len(event.country) == 3 and not set(event.country) & set(columns["country"])
    assert event.output_names == ["probability"] and event.output_widths == [1]
    scores = np.frombuffer(event.outputs, "<f8")
    assert scores == pytest.approx(result.as_numpy("probability").ravel(), rel=1e-6)
    assert {c["feature"] for c in event.coverage} >= {"amount", "channel", "country"}


def test_serve_with_sidecar_runs_the_whole_loop_from_one_command(
    demo_repo: Path, start_gateway, tmp_path: Path
):
    import json
    import subprocess
    import sys

    port, store = free_port(), tmp_path / "store"
    events = events_args(port, tmp_path / "events")  # --sidecar and --events-dir
    # `make serve`'s command: the demo's settings reach the sidecar too (its canary policy).
    config = ("--config", str(demo_repo / "gateway.yaml"))
    gateway = start_gateway(demo_repo, *config, "--with-sidecar", str(store), *events)
    assert f"sidecar ready grpc=127.0.0.1:{port}" in gateway.stderr()
    command = [sys.executable, "-m", "gateway", "verdict", "fraud", "--json"]
    command += ["--sidecar", f"127.0.0.1:{port}"]
    verdict = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert verdict.returncode == 0, verdict.stderr  # a configured canary, judged
    judged = json.loads(verdict.stdout)
    assert (judged["stable"], judged["candidate"], judged["verdict"]) == ("2", "1", "hold")
    assert send(gateway, [f"one-{i}" for i in range(20)], threads=2)
    wait_until(lambda: acked_all(gateway), "every event acknowledged")
    command = [sys.executable, "-m", "gateway", "report", "fraud", "--json"]
    command += ["--sidecar", f"127.0.0.1:{port}"]
    report = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert report.returncode == 0, report.stderr
    assert json.loads(report.stdout)["events"] == 20
    assert gateway.stop() == 0
    assert "sidecar stopped: 20 events stored" in gateway.stderr()
    with duckdb.connect(str(store / "events.duckdb"), read_only=True) as db:
        assert db.execute("SELECT count(*) FROM events").fetchall() == [(20,)]


def test_a_stop_during_a_log_write_still_hands_that_batch_to_the_sidecar(
    start_sidecar, tmp_path: Path
):
    """SIGTERM can land while the writer thread appends a batch: the drain must wait for it.

    The writer thread is held busy so the stop comes while the batch is on its way to the log;
    a drain that looked before the batch landed would leave it unsent until the next start.
    Meanwhile the batch still counts in the memory backlog (tests and operators read an empty
    backlog as "everything acknowledged").
    """
    import asyncio
    import threading

    from gateway.events.builder import Pending
    from gateway.events.recorder import EventRecorder
    from gateway.features import redact
    from gateway.settings import EventsSettings
    from gateway.telemetry import GatewayMetrics
    from gateway.types import InferRequest, InferResponse

    sidecar = start_sidecar(tmp_path / "store", free_port())
    settings = EventsSettings(
        sidecar=sidecar.address, directory=tmp_path / "events", batch_events=4
    )
    ids = [f"stop-{i}" for i in range(4)]

    backlog: list[float | None] = []

    async def serve_then_stop() -> None:
        metrics = GatewayMetrics()
        recorder = EventRecorder(settings, metrics, redact, 1 << 20)
        await recorder.start()
        writing = threading.Event()
        recorder._writer.submit(writing.wait)  # the batch below queues behind this
        for request_id in ids:
            request, response = InferRequest("fraud"), InferResponse("fraud", "1", "", [])
            recorder.record(Pending(request, response, request_id, None, 0, 1.0, 0))
        await asyncio.sleep(0.05)  # the writer task has handed the batch to the thread
        where = {"where": "memory"}  # out of the queue, not in the log: still waiting
        backlog.append(metrics.registry.get_sample_value("gateway_events_backlog", where))
        backlog.append(len(recorder._pending))  # the batch was out of the queue then
        asyncio.get_running_loop().call_later(0.2, writing.set)
        await recorder.close(grace_s=20)

    asyncio.run(serve_then_stop())
    assert backlog == [4, 0]
    assert sorted(request_id for request_id, _ in stored(sidecar)) == ids
