"""The scheduler end to end: deadlines, admission control, overload and recovery, batching.

Nothing here races the clock. The slow model's batches wait for ``SLOW_ROWS`` rows (its
preferred batch size, for up to a minute): requests with fewer rows in all stay queued, with
the instance idle, until the test itself sends the rows that let the batch go. Whether a
request is still queued at some moment is thus decided by the test, not by how long a run
takes on a busy host; and what the test waits for (a request queued, a call in flight) it reads
from the gateway's own gauges.
"""

from __future__ import annotations

import os
import queue
import signal
import time
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

# A whole batch: about a third of a second per run of the slow model on one thread.
SLOW_ROWS = 256
# The slow model's gate: a batch goes once SLOW_ROWS rows wait (or after a minute).
GATE = {"preferred_batch_sizes": [SLOW_ROWS], "max_queue_delay_us": 60_000_000}


def slow_request(timeout_ms: int | None = None, priority: int | None = None, rows: int = SLOW_ROWS):
    message = service_pb2.ModelInferRequest(model_name="slow")
    message.inputs.add(name="x", datatype="FP32", shape=[rows, 512])
    message.raw_input_contents.append(np.ones((rows, 512), np.float32).tobytes())
    if timeout_ms is not None:
        message.parameters["timeout_ms"].int64_param = timeout_ms
    if priority is not None:
        message.parameters["priority"].int64_param = priority
    return message


@pytest.fixture
def slow_gateway(tmp_path: Path, start_gateway):
    """The gated slow model; its queue holds one batch (SLOW_ROWS rows) at most."""
    write_slow_model(
        tmp_path / "repo" / "slow", queue={"max_rows": SLOW_ROWS}, dynamic_batching=GATE
    )
    return start_gateway(tmp_path / "repo")


def wait_queued(gateway: GatewayProcess, count: int, timeout_s: float = 30) -> None:
    """Block until ``count`` requests wait in the slow model's queue (its gauge says so)."""
    deadline = time.monotonic() + timeout_s
    while (depth := gateway.metric("gateway_queue_depth", model="slow")) != count:
        assert time.monotonic() < deadline, f"{depth} requests queued, never {count}"
        time.sleep(0.005)


def code_of(call: grpc.Future) -> grpc.StatusCode:
    try:
        call.result()
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


def statistics(channel: grpc.Channel):
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    return stub.ModelStatistics(service_pb2.ModelStatisticsRequest(name="slow")).model_stats[0]


def test_deadline_in_the_queue_then_expected_wait_admission(slow_gateway: GatewayProcess):
    with grpc.insecure_channel(slow_gateway.url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        ahead = stub.ModelInfer.future(slow_request(rows=SLOW_ROWS // 2))
        wait_queued(slow_gateway, 1)  # held: half a batch
        # No batch time measured yet: admitted, then its deadline passes in the queue (300 ms:
        # admission also refuses a deadline shorter than the loop's lag, which a loaded host
        # can push past 50 ms; the request ahead is held however long it is).
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(slow_request(timeout_ms=300, rows=SLOW_ROWS // 4))
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "in the queue" in info.value.details()
        assert not ahead.done()  # answered while the request ahead of it still waited
        assert statistics(channel).execution_count == 0
        rest = stub.ModelInfer.future(slow_request(rows=SLOW_ROWS // 2))  # the batch goes
        ahead.result()
        rest.result()
        # Now a batch time is known (a whole run, over 50 ms on any host): a deadline shorter
        # than the expected wait is refused. (Asked at once: an estimate older than a second
        # lets one request through to renew it.)
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(slow_request(timeout_ms=50))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "expected wait" in info.value.details()
        stats = statistics(channel)
        assert stats.execution_count == 1  # no compute spent on either
        assert stats.inference_count == SLOW_ROWS
        assert stats.inference_stats.fail.count == 2  # the two refused, in the queue and before
    assert slow_gateway.metric("gateway_rejections_total", reason="deadline") == 1
    assert slow_gateway.metric("gateway_rejections_total", reason="expected_wait") == 1


def test_a_deadline_in_the_queue_is_reported_so_when_the_gateway_wakes_late(
    slow_gateway: GatewayProcess,
):
    timeout_ms = 300
    with grpc.insecure_channel(slow_gateway.url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        ahead = stub.ModelInfer.future(slow_request(rows=SLOW_ROWS // 2))
        late = stub.ModelInfer.future(slow_request(timeout_ms=timeout_ms, rows=SLOW_ROWS // 4))
        wait_queued(slow_gateway, 2)  # admitted: its deadline is at most timeout_ms away
        deadline = time.monotonic() + timeout_ms / 1000
        # A loaded host, made certain: the gateway gets no CPU until its deadline has passed.
        os.kill(slow_gateway.process.pid, signal.SIGSTOP)
        try:
            time.sleep(max(deadline + 0.05 - time.monotonic(), 0))
        finally:
            os.kill(slow_gateway.process.pid, signal.SIGCONT)
        with pytest.raises(grpc.RpcError) as info:
            late.result()
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "in the queue" in info.value.details()
        stub.ModelInfer(slow_request(rows=SLOW_ROWS // 2))
        ahead.result()


def test_overload_is_refused_fast_and_the_server_recovers(slow_gateway: GatewayProcess):
    with grpc.insecure_channel(slow_gateway.url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        # Four requests, 3/4 of a batch, held; then eleven that do not fit the queue's rows.
        held = [stub.ModelInfer.future(slow_request(rows=SLOW_ROWS * 3 // 16)) for _ in range(4)]
        wait_queued(slow_gateway, 4)
        over = [stub.ModelInfer.future(slow_request(rows=SLOW_ROWS // 2)) for _ in range(11)]
        refused = [code_of(call) for call in over]  # each at once: nothing has run yet
        # While the queue is full the server still answers at once.
        client = slow_gateway.client()
        assert client.is_server_live()
        client.close()
        last = stub.ModelInfer.future(slow_request(rows=SLOW_ROWS // 4))  # fits: the batch goes
        results = [code_of(call) for call in [*held, last]] + refused
    assert results.count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= 1
    assert results.count(grpc.StatusCode.OK) >= 5  # four held + the one that let them go
    assert set(results) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert slow_gateway.metric("gateway_rejections_total", reason="queue_full") >= 1

    # Load gone: everything is admitted again.
    with grpc.insecure_channel(slow_gateway.url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        for _ in range(3):
            stub.ModelInfer(slow_request())
    assert slow_gateway.metric("gateway_queue_depth") == 0


def test_rpcs_over_the_server_cap_are_refused_by_the_transport(tmp_path: Path, start_gateway):
    write_slow_model(tmp_path / "repo" / "slow", dynamic_batching=GATE)
    proc = start_gateway(tmp_path / "repo", env={"GATEWAY_SERVER__MAX_CONCURRENT_RPCS": "2"})
    with grpc.insecure_channel(proc.url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        # The cap's two calls, held: a stream (one call, however many requests it carries)
        # and a unary call, each with a quarter of a batch.
        stream_requests: queue.SimpleQueue = queue.SimpleQueue()
        stream = stub.ModelStreamInfer(iter(stream_requests.get, None))
        try:
            stream_requests.put(slow_request(rows=SLOW_ROWS // 4))
            unary = stub.ModelInfer.future(slow_request(rows=SLOW_ROWS // 4))
            proc.wait_in_flight(1, rpc="ModelStreamInfer")
            proc.wait_in_flight(1)
            over = [code_of(stub.ModelInfer.future(slow_request())) for _ in range(4)]
            # The rest of the batch on the stream, not a new call: it goes, both calls end.
            stream_requests.put(slow_request(rows=SLOW_ROWS // 2))
        finally:
            stream_requests.put(None)
        answers = list(stream)
        codes = [code_of(unary), *over] + [
            grpc.StatusCode.OK if not a.error_message else grpc.StatusCode.UNKNOWN for a in answers
        ]
    assert len(answers) == 2
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
    # A batch waits (up to half a second) for a second row. Stream requests in flight together
    # therefore share one whatever the speed of client and server; read one at a time, each
    # would wait alone. (Without the wait it is a race: the tiny model's run can finish before
    # the next request is read, and on a loaded host most of 400 runs were single rows.)
    config = repo_copy / "fraud" / "config.yaml"
    settings = yaml.safe_load(config.read_text())
    batching = {"preferred_batch_sizes": [2], "max_queue_delay_us": 500_000}
    config.write_text(yaml.safe_dump({**settings, "instances": 1, "dynamic_batching": batching}))
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


def test_at_four_times_capacity_admitted_requests_keep_their_deadline(
    tmp_path: Path, start_gateway
):
    """A real open-loop load at 4x the capacity measured first: each request, with a 1 s
    deadline, is answered within it or refused; none is answered late. The margin (another
    second, by the client's clock) is generous; without deadlines held, the queue (16 batches)
    would answer the last requests seconds late."""
    rows, deadline_ms, margin_s = SLOW_ROWS // 4, 1000, 1.0
    write_slow_model(
        tmp_path / "repo" / "slow",
        queue={"max_rows": SLOW_ROWS * 16},
        dynamic_batching={"max_queue_delay_us": 2_000},
    )
    gateway = start_gateway(tmp_path / "repo")
    with grpc.insecure_channel(gateway.url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        plain = slow_request(rows=rows)
        stub.ModelInfer(plain)  # warm
        # Capacity: four clients in a closed loop for two seconds.
        started = time.monotonic()
        answered = 0
        while time.monotonic() - started < 2.0:
            calls = [stub.ModelInfer.future(plain) for _ in range(4)]
            answered += sum(code_of(call) == grpc.StatusCode.OK for call in calls)
        capacity = answered / (time.monotonic() - started)
        # Overload: requests start on a fixed schedule at 4x, whatever the answers do.
        timed = slow_request(timeout_ms=deadline_ms, rows=rows)
        interval = 1 / (4 * capacity)
        outcomes: queue.SimpleQueue = queue.SimpleQueue()

        def done(call: grpc.Future, sent: float) -> None:
            outcomes.put((code_of(call), time.monotonic() - sent))

        offered = max(int(3.0 / interval), 24)
        begin = time.monotonic()
        for i in range(offered):
            time.sleep(max(begin + i * interval - time.monotonic(), 0))  # the schedule
            sent = time.monotonic()
            call = stub.ModelInfer.future(timed)
            call.add_done_callback(lambda call, sent=sent: done(call, sent))
        results = [outcomes.get(timeout=120) for _ in range(offered)]
        # Load gone: served again.
        stub.ModelInfer(plain)
    codes = [code for code, _ in results]
    late_after = deadline_ms / 1000 + margin_s
    late = [took for code, took in results if code == grpc.StatusCode.OK and took > late_after]
    assert set(codes) <= {
        grpc.StatusCode.OK,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    }, codes
    assert codes.count(grpc.StatusCode.OK) >= 1
    # Four times what it can serve: most are refused (at once, or when their time ran out).
    assert len(codes) - codes.count(grpc.StatusCode.OK) >= offered // 3, codes
    assert not late, f"{len(late)} of {offered} answered after {deadline_ms} ms + {margin_s} s"
