"""Multi-process mode: several gateway processes on one port, each with its own scheduler."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from gateway.lifeline import PARENT_FD_ENV, PARENT_PID_ENV
from tests.auth import wait_until
from tests.conftest import (
    DEMO_WIDTH,
    GatewayProcess,
    demo_features,
    demo_json,
    free_port,
    parent_pid,
    start_time,
    wait_gone,
)

pytestmark = pytest.mark.integration

READY = re.compile(r"gateway ready .* metrics=(\S+) workers=(\d+) pids=(\S+)")
ROOT = Path(__file__).resolve().parents[2]
# A channel's own connection: by default channels to one address share the process's
# connections, and a closed channel's may still be there for the next (seen under load: all
# 40 requests on one connection, so on one worker).
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]
# How long a worker may take to notice its supervisor is gone, drain (nothing in flight) and
# exit; it takes about a second. Only a bound: the test polls and goes on as soon as they are.
GONE_WITHIN_S = 30.0
linux_only = pytest.mark.skipif(
    not Path("/proc/self/stat").exists(), reason="reads processes from /proc"
)


def _workers(proc: GatewayProcess) -> tuple[list[str], list[int]]:
    """The supervisor's ready line: each worker's metrics address and its pid."""
    line = READY.search(proc.stderr())
    assert line, proc.stderr()
    metrics, pids = line.group(1).split(","), [int(p) for p in line.group(3).split(",")]
    assert len(metrics) == len(pids) == int(line.group(2)) and len(set(pids)) == len(pids)
    return metrics, pids


def _served(metrics_url: str) -> float:
    with urllib.request.urlopen(f"http://{metrics_url}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("gateway_requests_total{") and 'rpc="ModelInfer"' in line
    )


def test_two_workers_share_one_port_and_stop_together(demo_repo, start_gateway):
    proc = start_gateway(demo_repo, "--workers", "2")
    metrics, _ = _workers(proc)
    assert len(metrics) == 2

    request = service_pb2.ModelInferRequest(model_name="fraud")
    request.inputs.add(name="features", datatype="FP32", shape=[2, DEMO_WIDTH])
    request.raw_input_contents.append(demo_features(2).tobytes())
    for _ in range(40):  # a new connection each time: the kernel spreads them
        with grpc.insecure_channel(proc.url, options=OWN_CONNECTION) as channel:
            reply = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
            assert reply.model_name == "fraud"
    served = [_served(m) for m in metrics]
    assert sum(served) == 40
    assert all(n > 0 for n in served), served

    assert proc.stop(signal.SIGTERM) == 0
    log = proc.stderr()
    assert log.count("gateway stopped") == 2


def test_two_workers_share_one_http_port_too(demo_repo, start_gateway):
    proc = start_gateway(demo_repo, "--workers", "2", "--http-port", "0")
    metrics, _ = _workers(proc)
    match = re.search(r"gateway ready .* http=(\S+)", proc.stderr())
    assert match, proc.stderr()
    host, port = match.group(1).rsplit(":", 1)
    body = demo_json()
    for _ in range(40):  # a new connection each time: the kernel spreads them
        connection = http.client.HTTPConnection(host, int(port), timeout=30)
        try:
            connection.request("POST", "/v2/models/fraud/infer", body=body)
            reply = connection.getresponse()
            assert reply.status == 200, reply.read()
            reply.read()
        finally:
            connection.close()
    served = [_served(url) for url in metrics]
    assert sum(served) == 40 and all(n > 0 for n in served), served  # spread, each answered once


def _free_ports(count: int) -> int:
    """The first of ``count`` consecutive ports free on 127.0.0.1 now."""
    for _ in range(50):
        first = free_port()
        sockets = []
        try:
            for port in range(first, first + count):
                sock = socket.socket()
                sockets.append(sock)
                sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
        return first
    raise AssertionError(f"no {count} consecutive free ports")


def test_each_worker_serves_metrics_on_its_own_port_from_metrics_port(demo_repo, start_gateway):
    """``--workers 2 --metrics-port P``: worker i on P + i (the flag, not only the settings
    file, once gave every worker P and the second died with "Address already in use")."""
    first = _free_ports(2)
    proc = start_gateway(demo_repo, "--workers", "2", "--metrics-port", str(first))
    metrics, _ = _workers(proc)
    assert metrics == [f"127.0.0.1:{first}", f"127.0.0.1:{first + 1}"]
    assert [_served(m) for m in metrics] == [0, 0]  # each answers, as a gateway of its own
    assert proc.stop(signal.SIGTERM) == 0


def test_workers_each_keep_their_own_event_log_and_every_event_arrives_once(
    demo_repo, start_gateway, start_sidecar, tmp_path
):
    import duckdb

    from tests.conftest import free_port

    port = free_port()
    sidecar = start_sidecar(tmp_path / "store", port)
    log_dir = tmp_path / "events"
    events = ["--sidecar", sidecar.address, "--events-dir", str(log_dir)]
    proc = start_gateway(demo_repo, "--workers", "2", *events)
    request = service_pb2.ModelInferRequest(model_name="fraud")
    request.inputs.add(name="features", datatype="FP32", shape=[2, DEMO_WIDTH])
    request.raw_input_contents.append(demo_features(2).tobytes())
    for i in range(40):
        request.id = f"w-{i}"
        with grpc.insecure_channel(proc.url) as channel:
            service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    assert proc.stop(signal.SIGTERM) == 0  # each worker hands its log to the sidecar first
    assert sorted(p.name for p in log_dir.iterdir()) == ["worker-0", "worker-1"]
    assert sidecar.stop() == 0
    with duckdb.connect(str(tmp_path / "store" / "events.duckdb"), read_only=True) as db:
        ids = sorted(r[0] for r in db.execute("SELECT request_id FROM events").fetchall())
    assert ids == sorted(f"w-{i}" for i in range(40))


def test_two_gateways_cannot_share_an_event_log(demo_repo, start_gateway, tmp_path):
    args = ("--sidecar", "127.0.0.1:9", "--events-dir", str(tmp_path / "events"))
    start_gateway(demo_repo, *args)
    with pytest.raises(RuntimeError, match="in use by another gateway"):
        start_gateway(demo_repo, *args)


def test_workers_refuse_admin_changes_that_would_reach_one_worker_of_several(
    demo_repo, start_gateway, tmp_path
):
    from gateway.server.admin_client import AdminClient

    token = (demo_repo / "admin.token").read_text().strip()
    audit = tmp_path / "audit.jsonl"
    proc = start_gateway(
        demo_repo,
        "--workers",
        "2",
        "--config",
        str(demo_repo / "gateway.yaml"),
        env={"GATEWAY_AUDIT__PATH": str(audit)},
    )
    with AdminClient(proc.url, token) as admin:
        assert "fraud-live" in admin.routes().yaml  # the same on every worker: answered
        for call in (lambda: admin.promote("fraud-live", "canary"), admin.costs, admin.cache):
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "several worker processes" in info.value.details()
    # Each worker writes its own audit log (a rotating file has one writer); together they
    # hold every call, refused ones too.
    # (A worker's file is made at its first line: the calls' one connection reached one.)
    # A refused call's line is written as its status leaves: the client may see the status
    # first, so the last line is waited for.
    expected = {
        ("GetRoutes", "OK"),
        ("Promote", "FAILED_PRECONDITION"),
        ("Costs", "FAILED_PRECONDITION"),
        ("Cache", "FAILED_PRECONDITION"),
    }

    def audited() -> set[tuple[str, str]]:
        logs = sorted(tmp_path.glob("audit.jsonl.worker-*"))
        lines = [json.loads(line) for p in logs for line in p.read_text().splitlines()]
        return {(line["rpc"], line["outcome"]) for line in lines}

    wait_until(lambda: len(audited()) >= len(expected), "every call's audit line", 10)
    logs = sorted(tmp_path.glob("audit.jsonl.worker-*"))
    assert logs and {p.name for p in logs} <= {"audit.jsonl.worker-0", "audit.jsonl.worker-1"}
    assert audited() == expected
    assert not audit.exists()


@linux_only
def test_workers_stop_when_their_supervisor_is_killed(demo_repo, start_gateway):
    proc = start_gateway(demo_repo, "--workers", "2")
    try:
        _, pids = _workers(proc)
        assert [parent_pid(pid) for pid in pids] == [proc.process.pid] * 2
        started = {pid: start_time(pid) for pid in pids}
        proc.process.kill()  # nothing can forward this one
        proc.process.wait()
        alive = wait_gone(started, GONE_WITHIN_S)
        assert not alive, f"workers {alive} outlived their supervisor:\n{proc.stderr()}"
        assert proc.stderr().count("gateway stopped") == 2  # each drained, then stopped
    finally:
        proc.kill_all()


def _children(pid: int) -> list[int]:
    return [
        int(entry.name)
        for entry in Path("/proc").iterdir()
        if entry.name.isdigit() and parent_pid(int(entry.name)) == pid
    ]


@linux_only
def test_the_sidecar_of_serve_with_sidecar_stops_when_its_gateway_is_killed(
    demo_repo, start_gateway, tmp_path
):
    port = free_port()
    events = ["--sidecar", f"127.0.0.1:{port}", "--events-dir", str(tmp_path / "events")]
    proc = start_gateway(demo_repo, "--with-sidecar", str(tmp_path / "store"), *events)
    try:
        assert f"sidecar ready grpc=127.0.0.1:{port}" in proc.stderr()
        children = _children(proc.process.pid)
        assert len(children) == 1, children  # the sidecar
        started = {pid: start_time(pid) for pid in children}
        proc.process.kill()  # no chance to stop its sidecar itself
        proc.process.wait()
        alive = wait_gone(started, GONE_WITHIN_S)
        assert not alive, f"the sidecar {alive} outlived its gateway:\n{proc.stderr()}"
    finally:
        proc.kill_all()


# A stand-in worker: watch_parent(), then wait to be stopped.
WATCHER = """
import sys, time
from gateway.lifeline import watch_parent
watch_parent("worker")
print("watching", flush=True)
time.sleep(60)
sys.exit("never stopped")
"""
# A stand-in supervisor: starts a stand-in worker, says its pid once it watches, then waits.
SUPERVISOR = """
import os, subprocess, sys, time
from gateway.lifeline import PARENT_FD_ENV, PARENT_PID_ENV
lifeline = int(os.environ[PARENT_FD_ENV])
env = {**os.environ, PARENT_PID_ENV: str(os.getpid())}
child = subprocess.Popen([sys.executable, "-c", sys.argv[1]], env=env, pass_fds=(lifeline,),
                         stdout=subprocess.PIPE, text=True)
assert child.stdout.readline() == "watching\\n"
print(child.pid, flush=True)
time.sleep(60)
"""


def _start(code: str, lifeline: int, env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        cwd=ROOT,
        env={**os.environ, **env, PARENT_FD_ENV: str(lifeline)},
        pass_fds=(lifeline,),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_a_worker_stops_when_its_lifeline_reaches_eof():
    """The pipe alone (no parent-death signal: the parent, this process, lives on)."""
    lifeline, writer = os.pipe()
    child = _start(WATCHER, lifeline, {PARENT_PID_ENV: str(os.getpid())})
    os.close(lifeline)
    try:
        assert child.stdout is not None and child.stdout.readline() == "watching\n"
        os.close(writer)  # what the supervisor's exit does, however it ends
        writer = -1
        assert child.wait(GONE_WITHIN_S) == -signal.SIGTERM
    finally:
        if writer >= 0:
            os.close(writer)
        child.kill()
        child.communicate()


def test_a_worker_whose_supervisor_is_already_gone_exits_at_once():
    lifeline, writer = os.pipe()
    # Its parent is not the supervisor named: as if that had died and it had been re-parented.
    gone = os.getpid() + 1
    child = _start(WATCHER, lifeline, {PARENT_PID_ENV: str(gone)})
    os.close(lifeline)
    try:
        out, err = child.communicate(timeout=GONE_WITHIN_S)
        assert child.returncode == 1 and out == ""
        assert f"the process that started it (pid {gone}) is gone" in err
    finally:
        os.close(writer)
        child.kill()
        child.communicate()


@linux_only
def test_a_worker_gets_sigterm_when_its_supervisor_dies():
    """The parent-death signal alone: the lifeline's write end stays open, here."""
    lifeline, writer = os.pipe()
    supervisor = _start(SUPERVISOR, lifeline, {}, WATCHER)
    os.close(lifeline)
    worker: dict[int, str | None] = {}
    try:
        assert supervisor.stdout is not None
        pid = int(supervisor.stdout.readline())
        worker[pid] = start_time(pid)
        assert parent_pid(pid) == supervisor.pid
        supervisor.kill()
        supervisor.wait()  # not communicate(): the worker holds its stderr until it exits
        assert not wait_gone(worker, GONE_WITHIN_S), "the worker outlived its supervisor"
    finally:
        os.close(writer)
        supervisor.kill()
        supervisor.wait()
        for pid in wait_gone(worker, 0):
            os.kill(pid, signal.SIGKILL)
        wait_gone(worker, GONE_WITHIN_S)
        supervisor.communicate()
