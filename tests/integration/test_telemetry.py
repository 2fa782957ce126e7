"""Telemetry: Prometheus metrics on their own port (ours, and Triton's names for a Triton
dashboard, equal to ModelStatistics), a server span per RPC, traceparent."""

from __future__ import annotations

import json
import re
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import tritonclient.grpc as triton_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from tests.conftest import DEMO_WIDTH, GatewayProcess, demo_features

pytestmark = pytest.mark.integration


def _infer(client, rows: int = 3, headers: dict[str, str] | None = None, model: str = "fraud"):
    inp = triton_grpc.InferInput("features", [rows, DEMO_WIDTH], "FP32")
    inp.set_data_from_numpy(demo_features(rows))
    return client.infer(model, [inp], headers=headers)


def test_metrics_count_requests_by_model_version_and_code(gateway: GatewayProcess):
    client = gateway.client()
    labels = {"rpc": "ModelInfer", "model": "fraud"}
    ok_before = gateway.metric("gateway_requests_total", code="OK", version="2", **labels)
    missing_before = gateway.metric("gateway_requests_total", code="NOT_FOUND", rpc="ModelInfer")
    hist_before = gateway.metric("gateway_request_duration_seconds_count", version="2", **labels)
    for _ in range(3):
        _infer(client)
    with pytest.raises(Exception, match="nope"):
        _infer(client, model="nope")
    client.close()
    assert (
        gateway.metric("gateway_requests_total", code="OK", version="2", **labels) == ok_before + 3
    )
    assert (
        gateway.metric("gateway_requests_total", code="NOT_FOUND", rpc="ModelInfer")
        == missing_before + 1
    )
    assert (
        gateway.metric("gateway_request_duration_seconds_count", version="2", **labels)
        == hist_before + 3
    )
    assert gateway.metric("gateway_model_versions_ready") == 2
    assert gateway.metric("gateway_requests_in_flight") == 0


def test_triton_metrics_match_model_statistics(gateway: GatewayProcess):
    client = gateway.client()
    for rows in (1, 4, 2):
        _infer(client, rows=rows)
    with pytest.raises(Exception, match="features"):
        bad = triton_grpc.InferInput("features", [1, 3], "FP32")  # the wrong width
        bad.set_data_from_numpy(demo_features(1)[:, :3])
        client.infer("fraud", [bad], model_version="2")
    stats = client.get_inference_statistics("fraud", "2", as_json=True)["model_stats"][0]
    client.close()
    text = urllib.request.urlopen(f"http://{gateway.metrics_url}/metrics", timeout=10).read()
    assert b"nv_inference_request_success{" in text  # Triton's name exactly (no _total)
    labels = {"model": "fraud", "version": "2"}
    infer = stats["inference_stats"]

    def nv(name: str, **more: str) -> float:
        return gateway.metric(name, **labels, **more)

    assert nv("nv_inference_request_success") == int(infer["success"]["count"]) >= 3
    assert nv("nv_inference_count") == int(stats.get("inference_count", 0)) >= 7
    assert nv("nv_inference_exec_count") == int(stats.get("execution_count", 0))
    assert nv("nv_inference_request_duration_us") == int(infer["success"]["ns"]) // 1000
    assert nv("nv_inference_queue_duration_us") == int(infer["queue"]["ns"]) // 1000
    assert nv("nv_inference_compute_infer_duration_us") == (
        int(infer["compute_infer"]["ns"]) // 1000
    )
    failed = nv("nv_inference_request_failure", reason="OTHER")
    assert failed == int(infer["fail"]["count"]) >= 1  # the bad request: neither of the others
    assert nv("nv_inference_request_failure", reason="BACKEND") == 0
    assert nv("nv_inference_pending_request_count") == 0
    assert b'nv_cache_num_hits_per_model{model="fraud",version="2"}' in text  # cache on


def _spans(proc: GatewayProcess) -> list[dict]:
    """ConsoleSpanExporter prints one JSON object per span on stdout."""
    text = proc.stdout()
    decoder = json.JSONDecoder()
    spans, pos = [], 0
    while (start := text.find("{", pos)) != -1:
        span, pos = decoder.raw_decode(text, start)
        spans.append(span)
    return spans


def test_traceparent_continues_the_callers_trace(demo_repo, start_gateway):
    proc: GatewayProcess = start_gateway(demo_repo, "--tracing", "console")
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    parent_id = "00f067aa0ba902b7"
    client = proc.client()
    _infer(client, rows=5, headers={"traceparent": f"00-{trace_id}-{parent_id}-01"})
    _infer(client, rows=2)
    client.close()

    deadline = time.monotonic() + 10
    while len([s for s in _spans(proc) if s["name"].endswith("/ModelInfer")]) < 2:
        assert time.monotonic() < deadline, proc.stdout()
        time.sleep(0.05)
    spans = [s for s in _spans(proc) if s["name"] == "inference.GRPCInferenceService/ModelInfer"]
    continued = [s for s in spans if s["context"]["trace_id"] == f"0x{trace_id}"]
    assert len(continued) == 1
    span = continued[0]
    assert span["parent_id"] == f"0x{parent_id}"
    assert span["kind"] == "SpanKind.SERVER"
    assert span["attributes"]["gateway.model"] == "fraud"
    assert span["attributes"]["gateway.model_version"] == "2"
    assert span["attributes"]["gateway.rows"] == 5
    fresh = [s for s in spans if s is not span]
    assert fresh and fresh[0]["parent_id"] is None  # no traceparent: a new trace
    assert re.fullmatch(r"0x[0-9a-f]{32}", fresh[0]["context"]["trace_id"])


def test_failed_rpc_span_has_error_status(demo_repo, start_gateway):
    proc: GatewayProcess = start_gateway(demo_repo, "--tracing", "console")
    client = proc.client()
    with pytest.raises(Exception, match="nope"):
        _infer(client, model="nope")
    client.close()
    deadline = time.monotonic() + 10
    while not _spans(proc):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    span = _spans(proc)[-1]
    assert span["status"]["status_code"] == "ERROR"
    assert "'nope'" in span["status"]["description"]


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """A real OTLP/gRPC trace receiver on 127.0.0.1 that keeps what it is sent."""

    def __init__(self) -> None:
        self.spans: list = []

    def Export(self, request, context):
        for resource_spans in request.resource_spans:
            service = {a.key: a.value.string_value for a in resource_spans.resource.attributes}.get(
                "service.name"
            )
            for scope in resource_spans.scope_spans:
                self.spans.extend((service, span) for span in scope.spans)
        return trace_service_pb2.ExportTraceServiceResponse()


def test_spans_reach_an_otlp_collector(demo_repo, start_gateway):
    collector = Collector()
    server = grpc.server(ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        proc: GatewayProcess = start_gateway(
            demo_repo,
            "--tracing",
            "otlp",
            env={
                "GATEWAY_TELEMETRY__OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
                "GATEWAY_TELEMETRY__SERVICE_NAME": "gateway-under-test",
            },
        )
        client = proc.client()
        _infer(client, rows=7)
        client.close()
        assert proc.stop() == 0  # shutdown flushes the batch exporter
    finally:
        server.stop(None)
    infer_spans = [(svc, s) for svc, s in collector.spans if s.name.endswith("/ModelInfer")]
    assert len(infer_spans) == 1
    service, span = infer_spans[0]
    assert service == "gateway-under-test"
    attributes = {a.key: a.value for a in span.attributes}
    assert attributes["gateway.rows"].int_value == 7
    assert attributes["gateway.model"].string_value == "fraud"
