"""Multi-process mode: several gateway processes on one port, each with its own scheduler."""

from __future__ import annotations

import re
import signal
import urllib.request

import grpc
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from tests.conftest import DEMO_WIDTH, demo_features

pytestmark = pytest.mark.integration


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
    line = re.search(r"gateway ready .* metrics=(\S+) workers=2 pids=(\S+)", proc.stderr())
    assert line, proc.stderr()
    metrics = line.group(1).split(",")
    pids = [int(p) for p in line.group(2).split(",")]
    assert len(metrics) == 2 and len(set(pids)) == 2

    request = service_pb2.ModelInferRequest(model_name="fraud")
    request.inputs.add(name="features", datatype="FP32", shape=[2, DEMO_WIDTH])
    request.raw_input_contents.append(demo_features(2).tobytes())
    for _ in range(40):  # a new connection each time: the kernel spreads them
        with grpc.insecure_channel(proc.url) as channel:
            reply = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
            assert reply.model_name == "fraud"
    served = [_served(m) for m in metrics]
    assert sum(served) == 40
    assert all(n > 0 for n in served), served

    assert proc.stop(signal.SIGTERM) == 0
    log = proc.stderr()
    assert log.count("gateway stopped") == 2


def test_workers_each_keep_their_own_event_log_and_every_event_arrives_once(
    demo_repo, start_gateway, start_sidecar, tmp_path
):
    import duckdb

    from tests.conftest import free_port

    port = free_port()
    sidecar = start_sidecar(tmp_path / "store", port)
    log_dir = tmp_path / "events"
    proc = start_gateway(demo_repo, "--workers", "2", "--sidecar", sidecar.address,
                         "--events-dir", str(log_dir))  # fmt: skip
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
    demo_repo, start_gateway
):
    from gateway.server.admin_client import AdminClient

    token = (demo_repo / "admin.token").read_text().strip()
    proc = start_gateway(demo_repo, "--workers", "2", "--config", str(demo_repo / "gateway.yaml"))
    with AdminClient(proc.url, token) as admin:
        assert "fraud-live" in admin.routes().yaml  # the same on every worker: answered
        for call in (lambda: admin.promote("fraud-live", "canary"), admin.costs, admin.cache):
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "several worker processes" in info.value.details()
