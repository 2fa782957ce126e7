"""ModelStreamInfer: many requests in flight on one stream, answers matched by request id."""

from __future__ import annotations

import queue

import numpy as np
import pytest
import tritonclient.grpc as triton_grpc

from gateway.demo import predict
from tests.conftest import DEMO_WIDTH, GatewayProcess, demo_features

pytestmark = pytest.mark.integration


def test_many_requests_in_flight_are_answered_by_id(gateway: GatewayProcess, demo_repo):
    params = dict(np.load(demo_repo / "fraud" / "2" / "params.npz"))
    results: queue.Queue = queue.Queue()
    client = gateway.client()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    sent = {}
    for i in range(300):
        x = demo_features(1 + i % 4, seed=i)
        inp = triton_grpc.InferInput("features", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        client.async_stream_infer("fraud", [inp], request_id=f"r{i}", model_version="2")
        sent[f"r{i}"] = x
    answered = {}
    for _ in range(len(sent)):
        result, error = results.get(timeout=30)
        assert error is None, error
        answered[result.get_response().id] = result.as_numpy("probability")
    client.stop_stream()
    client.close()
    assert answered.keys() == sent.keys()
    for request_id, x in sent.items():
        np.testing.assert_allclose(answered[request_id], predict(params, x), rtol=1e-4, atol=1e-6)


def test_a_failing_request_does_not_end_the_stream(gateway: GatewayProcess):
    results: queue.Queue = queue.Queue()
    client = gateway.client()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    good = triton_grpc.InferInput("features", [1, DEMO_WIDTH], "FP32")
    good.set_data_from_numpy(demo_features(1))
    client.async_stream_infer("nope", [good], request_id="bad")
    client.async_stream_infer("fraud", [good], request_id="good")
    outcomes = [results.get(timeout=30) for _ in range(2)]
    client.stop_stream()
    client.close()
    errors = [e for _, e in outcomes if e is not None]
    oks = [r for r, e in outcomes if e is None]
    assert len(errors) == 1 and "'nope'" in errors[0].message()
    assert len(oks) == 1 and oks[0].get_response().id == "good"


def test_a_stream_over_its_in_flight_limit_waits_instead_of_failing(demo_repo, start_gateway):
    proc = start_gateway(demo_repo, env={"GATEWAY_SERVER__STREAM_MAX_IN_FLIGHT": "2"})
    results: queue.Queue = queue.Queue()
    client = proc.client()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    for i in range(50):
        inp = triton_grpc.InferInput("features", [1, DEMO_WIDTH], "FP32")
        inp.set_data_from_numpy(demo_features(1, seed=i))
        client.async_stream_infer("fraud", [inp], request_id=str(i))
    answers = [results.get(timeout=30) for _ in range(50)]
    client.stop_stream()
    client.close()
    assert all(error is None for _, error in answers)
    assert sorted(int(r.get_response().id) for r, _ in answers) == list(range(50))
