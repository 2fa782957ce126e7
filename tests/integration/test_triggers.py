"""Triggers and playbooks in a real sidecar process: events and labels sent over its gRPC port,
its watch every 0.2 s; a quality incident runs the training command once however many rounds
it lasts, queues one review that ``gateway review`` lists and resolves, rolls back the route
at a gateway's admin service (a stand-in on loopback holding the token) once, and raises its
decision threshold there once; ``gateway actions``, the report and its HTML page show them all.
Training commands start whole on uvloop while other threads are in gRPC calls."""

from __future__ import annotations

import asyncio
import http.server
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any, ClassVar

import grpc
import numpy as np
import pytest
import uvloop
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from gateway.api.v1 import admin_pb2 as pb
from gateway.api.v1 import admin_pb2_grpc as pb_grpc
from gateway.api.v1 import events_pb2 as ev
from gateway.api.v1 import events_pb2_grpc as ev_grpc
from gateway.evaluation.client import fetch_actions, fetch_report, fetch_reviews
from gateway.evaluation.triggers import _run_command
from gateway.settings import TriggerSpec
from tests.conftest import SidecarProcess, free_port
from tests.unit.evaluation.test_triggers import NOW, RECORDER, Loop, alert

pytestmark = pytest.mark.integration

SECOND = 1_000_000
TOKEN = "admin-token-for-the-test"


class Admin(pb_grpc.GatewayAdminServicer):
    """The gateway's admin Rollback and SetThreshold, as far as the playbooks need them: the
    token, the route (and how much to raise its threshold)."""

    def __init__(self) -> None:
        self.rolled_back: list[str] = []
        self.raised: list[tuple[str, float]] = []

    def SetThreshold(
        self, request: pb.ThresholdRequest, context: grpc.ServicerContext
    ) -> pb.Routes:
        if ("authorization", f"Bearer {TOKEN}") not in context.invocation_metadata():
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "admin token")
        self.raised.append((request.route, request.raise_by))
        return pb.Routes(yaml=f"{request.route}: raised\n")

    def Rollback(self, request: pb.RollbackRequest, context: grpc.ServicerContext) -> pb.Routes:
        if ("authorization", f"Bearer {TOKEN}") not in context.invocation_metadata():
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "admin token")
        self.rolled_back.append(request.route)
        return pb.Routes(yaml=f"{request.route}: rolled back\n")


@pytest.fixture
def admin() -> Iterator[tuple[Admin, str]]:
    servicer = Admin()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_GatewayAdminServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(grace=None)


def quality_rule(name: str, metric: str, action: str, **threshold: float) -> dict[str, Any]:
    return {
        "name": name,
        "metric": metric,
        "action": action,
        "min_samples": 50,
        "min_positives": 10,
        "min_negatives": 10,
        "confidence": 0.5,
        **threshold,
    }


def gateway_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args], capture_output=True, text=True, timeout=120
    )


def wait_for(check, what: str, timeout_s: float = 60) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (found := check()):
        assert time.monotonic() < deadline, what
        time.sleep(0.1)
    return found


def test_a_quality_incident_acts_once_and_is_shown(tmp_path: Path, admin):
    stand_in, gateway = admin
    token_file = tmp_path / "admin-token"
    token_file.write_text(TOKEN)
    os.chmod(token_file, 0o600)
    runs = tmp_path / "runs.jsonl"
    config = {
        "evaluation": {
            "evaluate_every_s": 0.2,
            "metrics_port": 0,
            "rules": [
                quality_rule("accuracy-low", "accuracy", "human_review", below=0.9),
                quality_rule("log-loss-high", "log_loss", "rollback", above=0.3),
                quality_rule("ece-high", "ece", "tighten_thresholds", above=0.05),
            ],
            "triggers": [
                {
                    "model": "m",
                    "command": [sys.executable, "-c", RECORDER, str(runs)],
                    "primary_metric": "accuracy",
                    "cooldown_s": 3600,
                }
            ],
            "playbooks": {"gateway": gateway, "admin_token_file": str(token_file)},
        }
    }
    (tmp_path / "sidecar.yaml").write_text(yaml.safe_dump(config))
    sidecar = SidecarProcess(
        tmp_path / "store",
        free_port(),
        tmp_path / "logs",
        "--config",
        str(tmp_path / "sidecar.yaml"),
        "--http-port",
        "0",
    )
    try:
        # Scores that know nothing of the labels: every quality rule fires.
        rng = np.random.default_rng(11)
        now = time.time_ns() // 1000
        events = []
        for i in range(300):
            e = ev.PredictionEvent(
                event_id=f"e{i}",
                request_id=f"r{i}",
                model="m",
                version="2",
                route="m-live",
                arm="canary",
                event_time_us=now - (300 - i) * SECOND // 10,
                rows=1,
            )
            e.outputs.add(name="p", values=rng.random(1).astype("<f8").tobytes(), width=1)
            events.append(e)
        with grpc.insecure_channel(sidecar.address) as channel:
            stub = ev_grpc.EvaluationServiceStub(channel)
            acks = list(stub.Publish(iter([ev.EventBatch(sequence=1, events=events)])))
            assert sum(a.stored for a in acks) == 300
            labels = [
                ev.Label(request_id=f"r{i}", value=float(rng.random() < 0.5)) for i in range(300)
            ]
            stub.PutLabels(ev.PutLabelsRequest(labels=labels), timeout=30)

        def settled() -> list[dict[str, Any]]:
            actions = fetch_actions(sidecar.address, "m")
            kinds = {a["kind"] for a in actions if a["outcome"] != "running"}
            want = {"performance", "human_review", "rollback", "tighten_thresholds"}
            return actions if want <= kinds else []

        wait_for(settled, "the playbooks never all acted")
        # The incident goes on for many more rounds (every 0.2 s): nothing acts again.
        time.sleep(2)
        actions = fetch_actions(sidecar.address, "m")
        assert sorted(a["kind"] for a in actions) == [
            "human_review",
            "performance",
            "rollback",
            "tighten_thresholds",
        ]
        by_kind = {a["kind"]: a for a in actions}
        run = by_kind["performance"]
        assert run["outcome"] == "ok" and run["exit_code"] == 0, (
            run["exit_code"],
            run["output"],
            run["detail"],
        )
        assert "quality alert accuracy-low" in run["reason"]
        [line] = [json.loads(x) for x in runs.read_text().splitlines()]
        assert line["GATEWAY_MODEL"] == "m" and line["rows"] == 300
        assert by_kind["rollback"]["outcome"] == "ok"
        assert stand_in.rolled_back == ["m-live"]
        tightened = by_kind["tighten_thresholds"]
        assert tightened["outcome"] == "ok" and stand_in.raised == [("m-live", 0.05)]
        assert tightened["ran"].startswith("SetThreshold raise_by 0.05: m-live at ")
        assert (
            sidecar.metric("sidecar_triggers_total", model="m", kind="performance", outcome="ok")
            == 1
        )
        assert (
            sidecar.metric(
                "sidecar_playbook_actions_total", model="m", action="rollback", outcome="ok"
            )
            == 1
        )

        report = fetch_report(sidecar.address, "m")
        assert [t["kind"] for t in report["triggers"]] == ["performance"]
        assert {a["kind"] for a in report["playbook_actions"]} == {
            "human_review",
            "rollback",
            "tighten_thresholds",
        }

        listed = gateway_cli("review", "list", "--sidecar", sidecar.address)
        assert listed.returncode == 0, listed.stderr
        [review] = fetch_reviews(sidecar.address)
        assert review["alert"] == "accuracy-low" and review["rows"] == 300
        with urllib.request.urlopen(f"http://{sidecar.http_url}/report/m", timeout=60) as reply:
            page = reply.read().decode()
        [table] = re.findall(r'<table class="journal" id="triggers">.*?</table>', page, re.S)
        assert "<td>performance</td>" in table and '<td class="good">ok</td><td>0</td>' in table
        assert "quality alert accuracy-low" in table and "trained on 300 rows" in table
        [queued] = re.findall(r'<table class="journal" id="reviews">.*?</table>', page, re.S)
        assert f"<td>{review['id']}</td>" in queued and review["export"] in queued
        assert f"{review['id']}  " in listed.stdout and "accuracy-low" in listed.stdout
        assert review["export"] in listed.stdout
        done = gateway_cli(
            "review",
            "resolve",
            str(review["id"]),
            "--note",
            "labels late",
            "--sidecar",
            sidecar.address,
        )
        assert done.returncode == 0, done.stderr
        assert gateway_cli("review", "list", "--sidecar", sidecar.address).stdout.strip() == (
            "no reviews"
        )
        [closed] = fetch_reviews(sidecar.address, status="resolved")
        assert closed["note"] == "labels late"
        again = gateway_cli("review", "resolve", str(review["id"]), "--sidecar", sidecar.address)
        assert again.returncode == 1 and f"no open review {review['id']}" in again.stderr

        journal = gateway_cli("actions", "m", "--sidecar", sidecar.address)
        assert journal.returncode == 0, journal.stderr
        for kind in ("performance", "human_review", "rollback", "tighten_thresholds"):
            assert kind in journal.stdout

        # By hand: refused within the cooldown, run with --force and waited for.
        cooling = gateway_cli("triggers", "run", "m", "--sidecar", sidecar.address)
        assert cooling.returncode == 1 and "cooldown_s 3600" in cooling.stderr
        forced = gateway_cli(
            "triggers", "run", "m", "--force", "--wait", "--reason", "audit",
            "--sidecar", sidecar.address,
        )  # fmt: skip
        assert forced.returncode == 0, forced.stderr
        assert "started" in forced.stdout and "manual" in forced.stdout and " ok " in forced.stdout
        assert len(runs.read_text().splitlines()) == 2
    finally:
        sidecar.stop()


class _Hook(http.server.BaseHTTPRequestHandler):
    received: ClassVar[list[dict[str, Any]]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        self.received.append(body)
        status = 500 if body["kind"] == "time" else 202
        self.send_response(status)
        self.end_headers()
        self.wfile.write(b"queued" if status == 202 else b"busy")

    def log_message(self, *args: object) -> None:
        pass


async def test_a_webhook_trigger_posts_what_fired_and_records_the_answer(tmp_path: Path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/retrain"
    loop = Loop(
        tmp_path / "store",
        triggers=[{"model": "m", "webhook": url, "cadence_s": 100, "cooldown_s": 0}],
    )
    try:
        [run] = await loop.round(NOW, alert())
        assert (run["outcome"], run["exit_code"], run["output"]) == ("ok", 202, "queued")
        [body] = _Hook.received
        assert body["model"] == "m" and body["kind"] == "drift"
        assert body["training_data"] == run["detail"]["training_data"]
        assert body["rows"] == run["detail"]["rows"] == 0  # no traffic: an empty export
        [late] = await loop.round(NOW + 100)  # the webhook answers 500 to a time trigger
        assert (late["outcome"], late["exit_code"], late["output"]) == ("failed", 500, "busy")
    finally:
        loop.close()
        server.shutdown()
        server.server_close()


def test_commands_start_whole_while_other_threads_are_in_grpc_calls():
    """The sidecar serves gRPC on uvloop, and a round's playbooks call the gateway's admin
    service from threads (a channel each) while its trigger's command starts. A command
    forked (not vforked) then died before its exec, with no output: 8 or 9 of these 60 starts
    here. A check by numbers: on a machine where that fork never crashes, it passes either
    way."""
    spec = TriggerSpec(model="m", command=[sys.executable, "-I", "-S", "-c", "print('ok')"])
    stop = threading.Event()

    def calling(address: str) -> None:
        while not stop.is_set():
            with grpc.insecure_channel(address) as channel:
                check = health_pb2_grpc.HealthStub(channel).Check
                for _ in range(20):
                    check(health_pb2.HealthCheckRequest(), timeout=30)

    async def starts(n: int) -> list[tuple[int | None, str, str]]:
        server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
        address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
        await server.start()
        callers = [threading.Thread(target=calling, args=(address,)) for _ in range(2)]
        for caller in callers:
            caller.start()
        try:
            return [await _run_command(spec, dict(os.environ)) for _ in range(n)]
        finally:
            stop.set()
            for caller in callers:
                await asyncio.to_thread(caller.join)
            await server.stop(grace=None)

    runs = uvloop.run(starts(60))
    assert [run for run in runs if run != (0, "ok\n", "ok")] == []
