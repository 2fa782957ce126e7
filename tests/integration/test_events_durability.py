"""The event log's acknowledged position across a gateway SIGKILL: a real gateway, a real sidecar.

The sidecar acknowledges a group of batches at once (its group commit), so acks reach the
gateway in bursts; a position written only now and then would miss the last acks of a burst,
and the restarted gateway would send those events again.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.auth import wait_until
from tests.conftest import SidecarProcess, free_port
from tests.integration.test_events import acked_all, events_args, send, stored

pytestmark = pytest.mark.integration


@pytest.fixture
def start_sidecar_with_metrics(tmp_path: Path) -> Iterator[Callable[[Path, int], SidecarProcess]]:
    """Sidecars with their metrics port open (any free one); killed at teardown if running."""
    started: list[SidecarProcess] = []

    def start(store: Path, port: int) -> SidecarProcess:
        env = {"GATEWAY_EVALUATION__METRICS_PORT": "0"}
        proc = SidecarProcess(store, port, tmp_path / "sidecar-logs", env=env)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop(signal.SIGKILL, timeout_s=10)


def test_a_gateway_killed_after_the_acks_resends_none_of_what_was_acknowledged(
    demo_repo: Path, start_gateway, start_sidecar_with_metrics, tmp_path: Path
):
    port, store, log_dir = free_port(), tmp_path / "store", tmp_path / "events"
    # Small batches, written to the log before the sidecar runs: once it does, they reach it
    # together and come back as one burst of acks (one group commit, an ack per batch).
    small = {"GATEWAY_EVENTS__BATCH_EVENTS": "8"}
    first = start_gateway(demo_repo, *events_args(port, log_dir), env=small)
    ids = [f"k-{i}" for i in range(200)]
    assert sorted(send(first, ids)) == sorted(ids)
    wait_until(lambda: first.metric("gateway_events_total", outcome="written") == 200, "the log")
    sidecar = start_sidecar_with_metrics(store, port)
    wait_until(lambda: acked_all(first), "every event acknowledged")
    assert first.metric("gateway_events_total", outcome="acked") == 200
    first.stop(signal.SIGKILL)  # no close: only what each ack left on disk survives

    second = start_gateway(demo_repo, *events_args(port, log_dir), env=small)
    assert second.metric("gateway_events_backlog", where="disk") == 0  # nothing to resend
    send(second, ["after-restart"], threads=1)
    # The stream is in order: anything resent would be acknowledged before this event.
    wait_until(lambda: acked_all(second), "the new event acknowledged")
    assert second.metric("gateway_events_total", outcome="acked") == 1
    assert sidecar.metric("sidecar_events_total", outcome="duplicate") == 0
    assert sidecar.metric("sidecar_events_total", outcome="stored") == 201
    rows = stored(sidecar)
    assert sorted(r[0] for r in rows) == sorted([*ids, "after-restart"])
