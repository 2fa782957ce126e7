"""Inference on the demo model through tritonclient.grpc, a real OIP client."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from gateway.demo import predict
from tests.conftest import DEMO_WIDTH, GatewayProcess, demo_features

pytestmark = pytest.mark.integration


def _reference(demo_repo: Path, version: int, x: np.ndarray) -> np.ndarray:
    params = dict(np.load(demo_repo / "fraud" / str(version) / "params.npz"))
    return predict(params, x)


def _infer(
    client: triton_grpc.InferenceServerClient, x: np.ndarray, version: str = ""
) -> np.ndarray:
    inp = triton_grpc.InferInput("features", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    result = client.infer("fraud", [inp], model_version=version)
    return result.as_numpy("probability")


@pytest.mark.parametrize("version", [1, 2])
def test_infer_matches_numpy_reference_for_each_version(client, demo_repo, version):
    x = demo_features(17)
    got = _infer(client, x, str(version))
    np.testing.assert_allclose(got, _reference(demo_repo, version, x), rtol=1e-4, atol=1e-6)


def test_default_version_is_the_highest_loaded(client, demo_repo):
    x = demo_features(4)
    inp = triton_grpc.InferInput("features", [4, DEMO_WIDTH], "FP32")
    inp.set_data_from_numpy(x)
    result = client.infer("fraud", [inp])
    assert result.get_response().model_version == "2"
    np.testing.assert_allclose(
        result.as_numpy("probability"), _reference(demo_repo, 2, x), rtol=1e-4, atol=1e-6
    )


def test_response_parameters_report_queue_and_compute_time(client):
    inp = triton_grpc.InferInput("features", [1, DEMO_WIDTH], "FP32")
    inp.set_data_from_numpy(demo_features(1))
    params = client.infer("fraud", [inp]).get_response().parameters
    assert params["compute_us"].int64_param > 0
    assert params["queue_us"].int64_param >= 0


def test_raw_and_typed_contents_give_equal_results(gateway: GatewayProcess):
    x = demo_features(5)
    with grpc.insecure_channel(gateway.url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        typed = service_pb2.ModelInferRequest(model_name="fraud")
        tensor = typed.inputs.add(name="features", datatype="FP32", shape=[5, DEMO_WIDTH])
        tensor.contents.fp32_contents.extend(x.reshape(-1).tolist())
        raw = service_pb2.ModelInferRequest(model_name="fraud")
        raw.inputs.add(name="features", datatype="FP32", shape=[5, DEMO_WIDTH])
        raw.raw_input_contents.append(x.tobytes())
        a, b = stub.ModelInfer(typed), stub.ModelInfer(raw)
    as_array = [np.frombuffer(r.raw_output_contents[0], dtype="<f4") for r in (a, b)]
    assert as_array[0].shape == (5,)
    np.testing.assert_array_equal(as_array[0], as_array[1])


def test_requested_outputs_are_returned_by_name(client):
    inp = triton_grpc.InferInput("features", [2, DEMO_WIDTH], "FP32")
    inp.set_data_from_numpy(demo_features(2))
    out = triton_grpc.InferRequestedOutput("probability")
    result = client.infer("fraud", [inp], outputs=[out])
    assert [o.name for o in result.get_response().outputs] == ["probability"]
    assert result.as_numpy("probability").shape == (2, 1)


def test_metadata_and_config_describe_the_contract_features(client):
    """Under a feature contract the inputs clients send are the raw features, one value per row."""
    meta = client.get_model_metadata("fraud")
    assert list(meta.versions) == ["1", "2"]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
        ("amount", "FP32", [-1, 1]),
        ("hour", "INT64", [-1, 1]),
        ("account_age_days", "FP32", [-1, 1]),
        ("tx_count_24h", "INT64", [-1, 1]),
        ("distance_km", "FP32", [-1, 1]),
        ("merchant_category", "BYTES", [-1, 1]),
        ("channel", "BYTES", [-1, 1]),
        ("country", "BYTES", [-1, 1]),
    ]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [
        ("probability", "FP32", [-1, 1])
    ]
    config = client.get_model_config("fraud").config
    assert config.max_batch_size == 1024
    assert config.platform == "onnxruntime_onnx"
    assert [list(i.dims) for i in config.input] == [[1]] * 8  # batch dimension excluded
    assert config.instance_group[0].count == 1
    assert config.instance_group[0].kind == config.instance_group[0].KIND_CPU


def test_statistics_count_requests_and_rows(client):
    before = client.get_inference_statistics("fraud", "1").model_stats[0]
    for rows in (3, 5):
        _infer(client, demo_features(rows), "1")
    after = client.get_inference_statistics("fraud", "1").model_stats[0]
    assert after.inference_count - before.inference_count == 8
    assert after.execution_count - before.execution_count == 2
    assert after.inference_stats.success.count - before.inference_stats.success.count == 2
    sizes = {b.batch_size for b in after.batch_stats}
    assert {3, 5} <= sizes


def test_server_metadata_and_readiness(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("fraud")
    assert client.is_model_ready("fraud", "1")
    assert not client.is_model_ready("fraud", "9")
    assert not client.is_model_ready("no_such_model")
    meta = client.get_server_metadata()
    assert meta.name == "gateway"
    assert "model_repository" in meta.extensions


def test_log_names_the_provider_once_and_stays_clean(gateway: GatewayProcess):
    log = gateway.stderr()
    assert log.count("execution provider: ") == 1
    # ONNX Runtime's own logger writes lines like "[W:onnxruntime:..." or "[E:onnxruntime:...".
    assert ":onnxruntime:" not in log
    assert "Traceback" not in log
