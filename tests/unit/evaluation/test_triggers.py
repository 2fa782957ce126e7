"""Retraining triggers on a real DuckDB store, driven round by round with our own clock, the
training command a real subprocess: one incident runs a trigger once, runs are a cooldown
apart, a failing command is recorded and not retried in a loop, the command's output and
time are bounded, time and data triggers come due, a run by hand keeps to the same rules, and
an export too small trains nothing."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from gateway.api.v1 import events_pb2 as ev
from gateway.errors import InvalidRequest, ModelNotFound
from gateway.evaluation.alerts import alert_key
from gateway.evaluation.metrics import SidecarMetrics
from gateway.evaluation.playbooks import Playbooks
from gateway.evaluation.store import EventStore
from gateway.evaluation.triggers import TriggerBusy
from gateway.settings import EvaluationSettings, TriggerSpec
from tests.auth import wait_until
from tests.conftest import _stat

NOW = 1_700_000_000.0
SECOND = 1_000_000
# Appends one JSON line per run: what the trigger put in its environment, and the rows of the
# export it points at.
RECORDER = """
import json, os, sys
import pyarrow.parquet as pq
path = os.environ["GATEWAY_TRAINING_DATA"]
line = {k: os.environ[k] for k in ("GATEWAY_MODEL", "GATEWAY_WINDOW_S", "GATEWAY_TRAINING_DATA")}
line["rows"] = pq.read_metadata(path).num_rows
with open(sys.argv[1], "a") as f:
    f.write(json.dumps(line) + "\\n")
print("trained on", line["rows"], "rows")
"""


def recorder(out: Path) -> tuple[str, ...]:
    return (sys.executable, "-c", RECORDER, str(out))


def alert(
    rule: str = "drift", action: str = "retrain", metric: str = "psi", **extra: Any
) -> dict[str, Any]:
    return {
        "rule": rule,
        "metric": metric,
        "model": "m",
        "version": "1",
        "segment": "all",
        "feature": "" if metric in ("auc", "log_loss") else "amount",
        "action": action,
        "value": 0.4,
        "threshold": 0.2,
        "direction": "above",
        "window_s": 3600,
        **extra,
    }


def firing(*alerts: dict[str, Any]) -> dict[tuple[str, ...], dict[str, Any]]:
    return {alert_key(a): a for a in alerts}


def traffic(store: EventStore, first: int, count: int, labelled: bool = True) -> None:
    """``count`` one-row events of model m a minute before NOW (segments geo=BR and geo=US
    in turn), each labelled."""
    events = [
        ev.PredictionEvent(
            event_id=f"e{i}",
            request_id=f"r{i}",
            model="m",
            version="1",
            route="m-live",
            arm="primary",
            event_time_us=int((NOW - 60) * SECOND) + i,
            rows=1,
        )
        for i in range(first, first + count)
    ]
    for i, e in enumerate(events):
        e.features.numeric_names.append("amount")
        e.features.numbers = np.array([float(i % 7)], "<f8").tobytes()
        e.segments["geo"] = "BR" if i % 2 else "US"
    store.ingest(events, int((NOW - 60) * SECOND))
    if labelled:
        labels = [
            ev.Label(request_id=e.request_id, value=float(i % 2)) for i, e in enumerate(events)
        ]
        store.put_labels(labels, 3600, int((NOW - 30) * SECOND))


class Loop:
    """A store, the playbooks over it, and their store thread."""

    def __init__(self, directory: Path, **evaluation: Any) -> None:
        self.settings = EvaluationSettings(**evaluation)
        self.store = EventStore(directory)
        self.db = ThreadPoolExecutor(max_workers=1)
        self.metrics = SidecarMetrics()
        self.playbooks = Playbooks(self.store, self.settings, self.metrics, self.db)

    async def round(self, now: float, *alerts: dict[str, Any]) -> list[dict[str, Any]]:
        await self.playbooks.round(firing(*alerts), now)
        return await self.playbooks.triggers.drain()

    def actions(self, **where: str) -> list[dict[str, Any]]:
        rows = self.playbooks.journal.actions(limit=1000)[::-1]  # oldest first
        return [a for a in rows if all(a[k] == v for k, v in where.items())]

    def count(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, labels)
        return value or 0.0

    def close(self) -> None:
        self.db.shutdown(wait=True)
        self.store.close()


@pytest.fixture
def make_loop(tmp_path: Path) -> Iterator[Any]:
    loops: list[Loop] = []

    def make(**evaluation: Any) -> Loop:
        loop = Loop(tmp_path / f"store{len(loops)}", **evaluation)
        loops.append(loop)
        return loop

    yield make
    for loop in loops:
        loop.close()


def trigger(out: Path, **spec: Any) -> dict[str, Any]:
    return {"model": "m", "command": recorder(out), **spec}


async def test_a_drift_incident_runs_the_trigger_once_with_a_fresh_labelled_export(
    make_loop, tmp_path: Path
):
    runs = tmp_path / "runs.jsonl"
    loop = make_loop(triggers=[trigger(runs, cooldown_s=3600, window_s=600)])
    traffic(loop.store, 0, 30)
    drift = alert()
    [run] = await loop.round(NOW, drift)
    assert run["outcome"] == "ok" and run["exit_code"] == 0
    assert "trained on 30 rows" in run["output"]
    # The alert goes on firing: the same incident, no second run.
    for minute in range(1, 5):
        assert await loop.round(NOW + 60 * minute, drift) == []
    [line] = [json.loads(x) for x in runs.read_text().splitlines()]
    assert line["GATEWAY_MODEL"] == "m" and line["GATEWAY_WINDOW_S"] == "600"
    assert line["rows"] == 30
    assert pq.read_metadata(line["GATEWAY_TRAINING_DATA"]).num_rows == 30
    [recorded] = loop.actions(kind="drift")
    assert recorded["outcome"] == "ok" and recorded["name"] == "m"
    assert recorded["incident"] == "|".join(alert_key(drift))
    assert recorded["detail"]["rows"] == 30
    assert json.loads(recorded["ran"])[0] == sys.executable
    assert loop.count("sidecar_triggers_total", model="m", kind="drift", outcome="ok") == 1


async def test_a_new_incident_within_the_cooldown_is_recorded_skipped_then_runs_after_it(
    make_loop, tmp_path: Path
):
    runs = tmp_path / "runs.jsonl"
    loop = make_loop(triggers=[trigger(runs, cooldown_s=3600)])
    drift = alert()
    await loop.round(NOW, drift)
    await loop.round(NOW + 60)  # resolved
    assert await loop.round(NOW + 120, drift) == []  # fires again: a new incident, cooling
    await loop.round(NOW + 180, drift)
    await loop.round(NOW + 3700)
    [run] = await loop.round(NOW + 3760, drift)  # past the cooldown
    assert run["outcome"] == "ok"
    assert [a["outcome"] for a in loop.actions(kind="drift")] == ["ok", "skipped", "ok"]
    assert "cooldown" in loop.actions(outcome="skipped")[0]["detail"]["why"]
    assert len(runs.read_text().splitlines()) == 2


async def test_drift_checks_needs_that_many_consecutive_firing_rounds(make_loop, tmp_path):
    runs = tmp_path / "runs.jsonl"
    loop = make_loop(triggers=[trigger(runs, drift_checks=3, cooldown_s=0)])
    drift = alert()
    assert await loop.round(NOW, drift) == []
    assert await loop.round(NOW + 60, drift) == []
    await loop.round(NOW + 120)  # broken streak
    assert await loop.round(NOW + 180, drift) == []
    assert await loop.round(NOW + 240, drift) == []
    [run] = await loop.round(NOW + 300, drift)
    assert run["kind"] == "drift" and "3 consecutive checks" in run["reason"]
    assert await loop.round(NOW + 360, drift) == []


async def test_a_quality_alert_on_the_primary_metric_runs_it_whatever_its_action(
    make_loop, tmp_path
):
    runs = tmp_path / "runs.jsonl"
    loop = make_loop(triggers=[trigger(runs, primary_metric="auc")])
    quality = alert("auc-low", action="human_review", metric="auc", direction="below")
    [run] = await loop.round(NOW, quality)
    assert run["kind"] == "performance" and "quality alert auc-low" in run["reason"]
    # A quality alert on another metric is not the primary metric's.
    other = make_loop(triggers=[trigger(runs, primary_metric="auc")])
    assert await other.round(NOW, alert("ll", action="tighten_thresholds", metric="log_loss")) == []


async def test_a_failing_command_is_recorded_once_not_retried_in_a_loop(make_loop, tmp_path):
    failing = (sys.executable, "-c", "import sys; print('no GPU here'); sys.exit(3)")
    loop = make_loop(
        triggers=[{"model": "m", "command": failing, "cadence_s": 600, "cooldown_s": 1800}]
    )
    drift = alert()
    [run] = await loop.round(NOW, drift)
    assert run["outcome"] == "failed" and run["exit_code"] == 3
    assert run["output"].strip() == "no GPU here"
    # Every minute for 25 minutes: the alert flaps and the cadence comes due, all cooling.
    for minute in range(1, 26):
        await loop.round(NOW + 60 * minute, *([drift] if minute % 2 else []))
    assert [a["outcome"] for a in loop.actions(outcome="failed")] == ["failed"]
    assert {a["outcome"] for a in loop.actions()} == {"failed", "skipped"}
    assert loop.count("sidecar_triggers_total", model="m", kind="drift", outcome="failed") == 1
    # Past the cooldown the cadence runs it again: once.
    [again] = await loop.round(NOW + 1801)
    assert again["kind"] == "time" and again["outcome"] == "failed"


async def test_a_command_past_its_timeout_is_killed_and_its_output_tail_kept(make_loop, tmp_path):
    chatty = (
        sys.executable,
        "-c",
        "import sys, time; sys.stdout.write('x' * 100000 + 'END'); sys.stdout.flush(); "
        "time.sleep(60)",
    )
    loop = make_loop(
        triggers=[{"model": "m", "command": chatty, "timeout_s": 0.5, "output_bytes": 1000}]
    )
    [run] = await loop.round(NOW, alert())
    assert run["outcome"] == "timeout" and run["exit_code"] is None
    assert run["duration_s"] < 30
    head, _, note = run["output"].partition("\n")
    assert len(head) == 1000 and head.endswith("END")
    assert "timeout_s 0.5" in note


async def test_a_command_whose_child_keeps_the_output_open_ends_at_its_timeout(make_loop, tmp_path):
    """A command that leaves a process of another session holding its output (out of reach
    of the group's SIGKILL): the run ends at its timeout, and nothing of the sidecar's waits
    on that process (no thread, no unreaped child)."""
    pid_file = tmp_path / "left.pid"
    leaves = (
        "import subprocess, sys; subprocess.Popen([sys.executable, '-c', "
        '\'import os, sys, time; os.setsid(); open(sys.argv[1], "w").write(str(os.getpid())); '
        f"time.sleep(60)', {str(pid_file)!r}]); print('started', flush=True)"
    )
    loop = make_loop(
        triggers=[{"model": "m", "command": [sys.executable, "-c", leaves], "timeout_s": 1}]
    )
    try:
        [run] = await loop.round(NOW, alert())
        assert run["outcome"] == "timeout" and run["output"].startswith("started\n")
        assert not [t for t in threading.enumerate() if t.name == "trigger command"]
        assert _zombie_children() == []
    finally:
        _kill_left(pid_file)


def _kill_left(pid_file: Path) -> None:
    """SIGKILL the process of its own session that wrote ``pid_file`` (once it has)."""
    wait_until(lambda: pid_file.exists() and bool(pid_file.read_text()), "its pid", 10)
    with contextlib.suppress(ProcessLookupError):
        os.kill(int(pid_file.read_text()), signal.SIGKILL)


def _zombie_children() -> list[str]:
    return [
        entry
        for entry in os.listdir("/proc")
        if entry.isdigit() and (f := _stat(entry)) and f[0] == "Z" and int(f[1]) == os.getpid()
    ]


async def test_a_missing_command_is_an_error_recorded(make_loop, tmp_path):
    loop = make_loop(triggers=[{"model": "m", "command": [str(tmp_path / "no-such-trainer")]}])
    [run] = await loop.round(NOW, alert())
    assert run["outcome"] == "error" and "FileNotFoundError" in run["output"]


async def test_a_time_trigger_runs_every_cadence_from_the_first_round(make_loop, tmp_path):
    runs = tmp_path / "runs.jsonl"
    loop = make_loop(triggers=[trigger(runs, cadence_s=100, cooldown_s=0, drift_checks=None)])
    assert await loop.round(NOW) == []
    assert await loop.round(NOW + 99) == []
    [run] = await loop.round(NOW + 100)
    assert run["kind"] == "time"
    assert await loop.round(NOW + 150) == []
    assert [r["kind"] for r in await loop.round(NOW + 200)] == ["time"]
    # The retrain alert is no trigger of this one (drift_checks null).
    assert await loop.round(NOW + 210, alert()) == []


async def test_a_data_trigger_runs_after_that_many_new_labelled_rows(make_loop, tmp_path):
    runs = tmp_path / "runs.jsonl"
    loop = make_loop(triggers=[trigger(runs, labelled_rows=20, cooldown_s=0)])
    traffic(loop.store, 0, 15)
    assert await loop.round(NOW) == []
    traffic(loop.store, 100, 10)
    [run] = await loop.round(NOW + 1)
    assert run["kind"] == "data" and run["reason"].startswith("25 labelled rows")
    assert await loop.round(NOW + 2) == []  # counted from the last run
    traffic(loop.store, 200, 5, labelled=False)
    assert await loop.round(NOW + 3) == []


async def test_a_restarted_sidecar_keeps_the_cooldown_and_the_cadence(tmp_path):
    runs = tmp_path / "runs.jsonl"
    spec = [trigger(runs, cadence_s=1000, cooldown_s=600)]
    first = Loop(tmp_path / "store", triggers=spec)
    await first.round(NOW, alert())
    first.close()
    second = Loop(tmp_path / "store", triggers=spec)
    try:
        assert await second.round(NOW + 60, alert()) == []  # cooling: recorded skipped
        assert await second.round(NOW + 900) == []
        [run] = await second.round(NOW + 1000)  # the cadence from the last run, not the start
        assert run["kind"] == "time"
    finally:
        second.close()


def test_a_trigger_needs_exactly_one_of_command_and_webhook():
    with pytest.raises(ValidationError, match="one of command or webhook"):
        TriggerSpec(model="m")
    with pytest.raises(ValidationError, match="one of command or webhook"):
        TriggerSpec(model="m", command=("train",), webhook="http://127.0.0.1:1/x")
    with pytest.raises(ValidationError, match="webhook"):
        TriggerSpec(model="m", webhook="file:///etc/passwd")


async def test_a_trigger_run_by_hand_respects_runs_in_progress_and_its_cooldown(
    make_loop, tmp_path: Path
):
    runs = tmp_path / "runs.jsonl"
    loop = make_loop(
        triggers=[trigger(runs, cooldown_s=3600), trigger(runs, name="other", cooldown_s=0)]
    )
    traffic(loop.store, 0, 10)
    triggers = loop.playbooks.triggers
    with pytest.raises(InvalidRequest, match="several triggers: m, other"):
        await triggers.run_now("m", "", "", False, NOW)
    with pytest.raises(ModelNotFound, match="no trigger 'nope' \\(it has: m, other\\)"):
        await triggers.run_now("m", "nope", "", False, NOW)
    with pytest.raises(ModelNotFound, match="has no trigger"):
        await triggers.run_now("x", "", "", False, NOW)
    started = await triggers.run_now("m", "m", "new labels from the audit", False, NOW)
    assert started["outcome"] == "running" and started["kind"] == "manual"
    with pytest.raises(TriggerBusy, match="a run is in progress"):
        await triggers.run_now("m", "m", "", True, NOW + 1)  # even with force
    [run] = await triggers.drain()
    assert run["id"] == started["id"] and run["outcome"] == "ok"
    assert run["reason"] == "new labels from the audit"
    with pytest.raises(TriggerBusy, match="cooldown_s 3600"):
        await triggers.run_now("m", "m", "", False, NOW + 60)
    await triggers.run_now("m", "m", "", True, NOW + 60)  # force: within its cooldown
    await triggers.drain()
    assert [a["outcome"] for a in loop.actions(kind="manual")] == ["ok", "ok"]
    assert loop.count("sidecar_triggers_total", model="m", kind="manual", outcome="ok") == 2


async def test_an_export_with_fewer_than_min_rows_trains_nothing(make_loop, tmp_path: Path):
    runs = tmp_path / "runs.jsonl"
    loop = make_loop(triggers=[trigger(runs, min_rows=50, cooldown_s=0)])
    traffic(loop.store, 0, 30)
    [run] = await loop.round(NOW, alert())
    assert run["outcome"] == "too_few_rows" and run["detail"]["rows"] == 30
    assert "30 labelled rows" in run["output"] and "min_rows 50" in run["output"]
    assert not runs.exists()  # the command never ran
    # a run all the same (not a refusal): a restarted sidecar keeps its cooldown from it
    assert loop.playbooks.journal.last_run_s("m", "m") == NOW
    traffic(loop.store, 30, 30)
    [run] = await loop.round(NOW + 60, alert(rule="other"))  # a new incident
    assert run["outcome"] == "ok" and len(runs.read_text().splitlines()) == 1
