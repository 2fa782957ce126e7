"""The scheduler end to end: deadlines, admission control, overload and recovery, batching."""

from __future__ import annotations

import queue
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import yaml
from tritonclient.grpc import service_pb2, service_pb2_grpc

from gateway.demo import predict
from tests.conftest import DEMO_WIDTH, GatewayProcess, demo_features
from tests.models import write_slow_model

pytestmark = pytest.mark.integration

SLOW_ROWS = 256  # about a third of a second per run of the slow model on one thread


def slow_request(timeout_ms: int | None = None, priority: int | None = None):
    message = service_pb2.ModelInferRequest(model_name="slow")
    message.inputs.add(name="x", datatype="FP32", shape=[SLOW_ROWS, 512])
    message.raw_input_contents.append(np.ones((SLOW_ROWS, 512), np.float32).tobytes())
    if timeout_ms is not None:
        message.parameters["timeout_ms"].int64_param = timeout_ms
    if priority is not None:
        message.parameters["priority"].int64_param = priority
    return message


@pytest.fixture
def slow_gateway(tmp_path: Path, start_gateway):
    write_slow_model(tmp_path / "repo" / "slow", queue={"max_requests": 4})
    return start_gateway(tmp_path / "repo")


def test_deadline_in_the_queue_then_expected_wait_admission(slow_gateway: GatewayProcess):
    with grpc.insecure_channel(slow_gateway.url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        busy = stub.ModelInfer.future(slow_request())
        slow_gateway.wait_in_flight(1)
        # No batch time measured yet: admitted, then its deadline passes in the queue.
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(slow_request(timeout_ms=50))
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "in the queue" in info.value.details()
        assert not busy.done()  # answered before the running batch finished
        busy.result()
        stats = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelStatistics(
            service_pb2.ModelStatisticsRequest(name="slow")
        )
        assert stats.model_stats[0].execution_count == 1  # no compute spent on it
        assert stats.model_stats[0].inference_stats.fail.count == 1

        # Now a batch time is known: a deadline shorter than the expected wait is refused.
        busy = stub.ModelInfer.future(slow_request())
        slow_gateway.wait_in_flight(1)
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(slow_request(timeout_ms=50))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "expected wait" in info.value.details()
        busy.result()
    assert slow_gateway.metric("gateway_rejections_total", reason="deadline") == 1
    assert slow_gateway.metric("gateway_rejections_total", reason="expected_wait") == 1


def test_overload_is_refused_fast_and_the_server_recovers(slow_gateway: GatewayProcess):
    codes: queue.Queue = queue.Queue()

    def one(_: int) -> None:
        with grpc.insecure_channel(slow_gateway.url) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            try:
                stub.ModelInfer(slow_request(), timeout=60)
                codes.put(grpc.StatusCode.OK)
            except grpc.RpcError as err:
                codes.put(err.code())

    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(one, i) for i in range(16)]
        # While the queue is full the server still answers at once.
        client = slow_gateway.client()
        assert client.is_server_live()
        client.close()
        for f in futures:
            f.result()
    results = [codes.get() for _ in range(16)]
    assert results.count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= 1
    assert results.count(grpc.StatusCode.OK) >= 5  # one running + four queued at least
    assert set(results) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert slow_gateway.metric("gateway_rejections_total", reason="queue_full") >= 1

    # Load gone: everything is admitted again.
    with grpc.insecure_channel(slow_gateway.url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        for _ in range(3):
            stub.ModelInfer(slow_request())
    assert slow_gateway.metric("gateway_queue_depth") == 0


def test_rpcs_over_the_server_cap_are_refused_by_the_transport(tmp_path: Path, start_gateway):
    write_slow_model(tmp_path / "repo" / "slow")
    proc = start_gateway(tmp_path / "repo", env={"GATEWAY_SERVER__MAX_CONCURRENT_RPCS": "2"})
    with grpc.insecure_channel(proc.url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        calls = [stub.ModelInfer.future(slow_request()) for _ in range(6)]
        codes = []
        for call in calls:
            try:
                call.result()
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as err:
                codes.append(err.code())
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= 1
    assert codes.count(grpc.StatusCode.OK) >= 2


def test_an_oversize_request_is_split_and_answered_whole(client, demo_repo):
    params = dict(np.load(demo_repo / "fraud" / "2" / "params.npz"))
    x = demo_features(2500)  # max_batch_size is 1024: three batches
    inp = triton_grpc.InferInput("features", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    result = client.infer("fraud", [inp], model_version="2")
    np.testing.assert_allclose(
        result.as_numpy("probability"), predict(params, x), rtol=1e-4, atol=1e-6
    )


def test_concurrent_stream_requests_share_batches(repo_copy: Path, start_gateway):
    # On threads: a tiny model run inline (execution: auto) finishes before the next request
    # is read, so there would be nothing to batch; on threads requests queue while it runs.
    config = repo_copy / "fraud" / "config.yaml"
    settings = yaml.safe_load(config.read_text())
    config.write_text(yaml.safe_dump({**settings, "execution": "thread", "instances": 1}))
    gateway = start_gateway(repo_copy)
    results: queue.Queue = queue.Queue()
    client = gateway.client()
    before = client.get_inference_statistics("fraud", "1").model_stats[0]
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    for i in range(400):
        inp = triton_grpc.InferInput("features", [1, DEMO_WIDTH], "FP32")
        inp.set_data_from_numpy(demo_features(1, seed=i))
        client.async_stream_infer("fraud", [inp], request_id=str(i), model_version="1")
    answers = [results.get(timeout=30) for _ in range(400)]
    client.stop_stream()
    assert all(error is None for _, error in answers)
    assert sorted(int(r.get_response().id) for r, _ in answers) == list(range(400))
    after = client.get_inference_statistics("fraud", "1").model_stats[0]
    client.close()
    assert after.inference_count - before.inference_count == 400
    runs = after.execution_count - before.execution_count
    assert runs < 400, "400 requests in flight never shared a batch"


def test_response_reports_its_batch(client):
    inp = triton_grpc.InferInput("features", [3, DEMO_WIDTH], "FP32")
    inp.set_data_from_numpy(demo_features(3))
    params = client.infer("fraud", [inp]).get_response().parameters
    assert params["batch_rows"].int64_param >= 3
