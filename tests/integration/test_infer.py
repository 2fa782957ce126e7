"""Inference on the demo model through tritonclient.grpc, a real OIP client."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import yaml
from tritonclient.grpc import service_pb2, service_pb2_grpc

from gateway.demo import predict
from gateway.settings import load_model_config
from tests.conftest import DEMO_WIDTH, GatewayProcess, demo_features

pytestmark = pytest.mark.integration

TRITON_TYPES = {"FP32": "TYPE_FP32", "INT64": "TYPE_INT64", "BYTES": "TYPE_STRING"}


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
    assert [i.name for i in config.input] == [t.name for t in meta.inputs]
    assert [o.name for o in config.output] == [t.name for t in meta.outputs]


@pytest.mark.parametrize("version", ["", "1", "2"])
def test_config_is_the_repository_s_config_yaml(client, demo_repo, version):
    """What tritonclient reads (as JSON: 64-bit integers are strings) against the model's
    config.yaml, loaded as the gateway loads it (defaults filled in)."""
    wanted = load_model_config(demo_repo / "fraud" / "config.yaml")
    served = version or "2"  # the highest loaded
    config = client.get_model_config("fraud", version, as_json=True)["config"]
    assert config["max_batch_size"] == wanted.max_batch_size == 1024
    assert wanted.version_policy.all and config["version_policy"] == {"all": {}}
    assert config["instance_group"] == [
        {"name": "fraud_0", "kind": "KIND_CPU", "count": wanted.instances}
    ]
    assert wanted.instances == 2 and wanted.dynamic_batching is not None
    batching = config["dynamic_batching"]
    assert batching.get("preferred_batch_size", []) == list(
        wanted.dynamic_batching.preferred_batch_sizes
    )
    delay_us = int(batching.get("max_queue_delay_microseconds", "0"))
    assert delay_us == wanted.dynamic_batching.max_queue_delay_us
    assert int(batching["priority_levels"]) == wanted.queue.priority_levels
    assert int(batching["default_priority_level"]) == wanted.queue.default_level
    assert batching["default_queue_policy"] == {
        "allow_timeout_override": True,  # each request's deadline; REJECT (0) when it passes
        "max_queue_size": wanted.queue.max_requests,
    }
    contract = wanted.contract.for_version(int(served))
    assert config["parameters"] == {
        "queue.max_rows": {"string_value": str(wanted.queue.max_rows)},
        "model_input": {"string_value": f"features FP32 [-1, {DEMO_WIDTH}]"},
        "feature_contract": {"string_value": contract},
    }
    meta = client.get_model_metadata("fraud", version, as_json=True)
    expected_inputs = [
        {"name": t["name"], "data_type": TRITON_TYPES[t["datatype"]], "dims": ["1"]}
        for t in meta["inputs"]
    ]
    features = yaml.safe_load((demo_repo / "fraud" / "features.yaml").read_text())
    for feature, entry in zip(
        features["versions"][contract]["features"], expected_inputs, strict=True
    ):
        assert feature["name"] == entry["name"]
        if feature.get("null_policy", "reject") != "reject":  # absent: its default
            entry["optional"] = True
    assert config["input"] == expected_inputs
    assert config["output"] == [{"name": "probability", "data_type": "TYPE_FP32", "dims": ["1"]}]


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
