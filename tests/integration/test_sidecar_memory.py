"""The sidecar's memory bound end to end: a real gateway streams to a real sidecar process whose
``evaluation.max_pending_events`` is 1, so every batch waits in the gateway's write-ahead log
until the one before it is stored; every event still arrives, once."""

from __future__ import annotations

import signal
from pathlib import Path

import duckdb
import pytest

from tests.auth import wait_until
from tests.conftest import SidecarProcess, free_port
from tests.integration.test_events import acked_all, events_args, send

pytestmark = pytest.mark.integration


def test_a_sidecar_at_its_pending_bound_reads_no_further_and_loses_nothing(
    demo_repo: Path, start_gateway, tmp_path: Path
):
    port, store = free_port(), tmp_path / "store"
    env = {
        "GATEWAY_EVALUATION__MAX_PENDING_EVENTS": "1",
        "GATEWAY_EVALUATION__STORE_MEMORY_LIMIT_BYTES": str(64 * 1024 * 1024),
        "GATEWAY_EVALUATION__METRICS_PORT": "0",
    }
    sidecar = SidecarProcess(store, port, tmp_path / "sidecar-logs", env=env)
    try:
        gateway = start_gateway(
            demo_repo,
            *events_args(port, tmp_path / "events"),
            env={"GATEWAY_EVENTS__BATCH_EVENTS": "8", "GATEWAY_EVENTS__FLUSH_INTERVAL_MS": "20"},
        )
        ids = [f"req-{i}" for i in range(400)]
        answered = send(gateway, ids)
        assert sorted(answered) == sorted(ids)
        wait_until(lambda: acked_all(gateway), "every event acknowledged")
        # Each batch read found the bound full: the next was left to the stream (and the log).
        assert sidecar.metric("sidecar_pending_full_total") > 0
        assert sidecar.metric("sidecar_pending_events") == 0
        assert 0 < sidecar.metric("sidecar_store_memory_bytes") <= 64 * 1024 * 1024
        assert sidecar.stop() == 0, sidecar.stderr()
        with duckdb.connect(str(store / "events.duckdb"), read_only=True) as db:
            rows = db.execute("SELECT request_id, event_id FROM events").fetchall()
        assert sorted(r[0] for r in rows) == sorted(ids)
        assert len({r[1] for r in rows}) == len(ids)
        assert gateway.metric("gateway_events_total", outcome="dropped") == 0
    finally:
        sidecar.stop(signal.SIGKILL, timeout_s=10)
