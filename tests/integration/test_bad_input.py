"""Bad requests get a clear status naming the input, never a crash or an UNKNOWN traceback."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from tests.conftest import DEMO_WIDTH, GatewayProcess, demo_features

pytestmark = pytest.mark.integration

MAX_MESSAGE_BYTES = 128 * 1024


@pytest.fixture(scope="module")
def small_gateway(demo_repo, tmp_path_factory: pytest.TempPathFactory):
    """The demo repository behind a gateway with a small message limit (set by environment)."""
    proc = GatewayProcess(
        demo_repo,
        tmp_path_factory.mktemp("small-gateway"),
        env={"GATEWAY_SERVER__MAX_MESSAGE_BYTES": str(MAX_MESSAGE_BYTES)},
    )
    yield proc
    assert proc.stop() == 0, proc.stderr()


@pytest.fixture(scope="module")
def stub(small_gateway: GatewayProcess):
    with grpc.insecure_channel(small_gateway.url) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


def request(rows: int = 2, **overrides) -> service_pb2.ModelInferRequest:
    message = service_pb2.ModelInferRequest(model_name="fraud")
    message.inputs.add(name="features", datatype="FP32", shape=[rows, DEMO_WIDTH])
    message.raw_input_contents.append(demo_features(rows).tobytes())
    for key, value in overrides.items():
        setattr(message, key, value)
    return message


def call_fails(stub, message) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(message)
    err = info.value
    assert err.code() != grpc.StatusCode.UNKNOWN
    assert "Traceback" not in (err.details() or "")
    return err


def test_unknown_model_is_not_found(stub):
    err = call_fails(stub, request(model_name="nope"))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert "'nope'" in err.details()


def test_unknown_version_is_not_found(stub):
    err = call_fails(stub, request(model_version="7"))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert "version '7'" in err.details()


def test_wrong_datatype_names_the_input(stub):
    message = request()
    message.inputs[0].datatype = "FP64"
    message.raw_input_contents[0] = demo_features(2).astype(np.float64).tobytes()
    err = call_fails(stub, message)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'features'" in err.details() and "FP64" in err.details()


def test_wrong_shape_names_the_input(stub):
    message = request()
    message.inputs[0].shape[:] = [2, 18]
    message.raw_input_contents[0] = np.zeros((2, 18), np.float32).tobytes()
    err = call_fails(stub, message)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'features'" in err.details() and "[2,18]" in err.details()


def test_raw_length_not_matching_shape_names_the_input(stub):
    message = request()
    message.raw_input_contents[0] = message.raw_input_contents[0][:-4]
    err = call_fails(stub, message)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'features'" in err.details() and f"{2 * DEMO_WIDTH * 4} bytes" in err.details()


def test_typed_contents_count_not_matching_shape(stub):
    message = service_pb2.ModelInferRequest(model_name="fraud")
    tensor = message.inputs.add(name="features", datatype="FP32", shape=[1, DEMO_WIDTH])
    tensor.contents.fp32_contents.extend([0.0] * 18)
    err = call_fails(stub, message)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'features'" in err.details() and "18 values" in err.details()


def test_missing_input_is_named(stub):
    message = service_pb2.ModelInferRequest(model_name="fraud")
    err = call_fails(stub, message)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    # Under a feature contract, what is missing is its features.
    assert "none of the features contract v2" in err.details()
    assert "amount, hour" in err.details()


def test_unexpected_input_is_named(stub):
    message = request()
    message.inputs.add(name="extra", datatype="FP32", shape=[2, DEMO_WIDTH])
    message.raw_input_contents.append(demo_features(2).tobytes())
    err = call_fails(stub, message)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'extra'" in err.details()


def test_unsupported_datatype_is_named(stub):
    message = request()
    message.inputs[0].datatype = "COMPLEX128"
    err = call_fails(stub, message)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'features'" in err.details() and "COMPLEX128" in err.details()


def test_raw_contents_for_only_some_inputs_is_refused(stub):
    message = request()
    message.raw_input_contents.append(b"")
    err = call_fails(stub, message)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "raw_input_contents" in err.details()


def test_unknown_requested_output_is_named(stub):
    message = request()
    message.outputs.add(name="logits")
    err = call_fails(stub, message)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'logits'" in err.details()


def test_bad_scheduling_parameters_are_named(stub):
    for key, value in [
        ("priority", "urgent"),
        ("priority", 3),
        ("priority", "²"),  # a digit to str.isdigit(), not to int(): was INTERNAL
        ("priority", 0),
        ("timeout_ms", -5),
        ("timeout_ms", "inf"),
        ("cache", "maybe"),
        ("sticky_key", 1.5),
        ("tenant", "t" * 2000),
    ]:
        message = request()
        param = message.parameters[key]
        if isinstance(value, int):
            param.int64_param = value
        elif isinstance(value, float):
            param.double_param = value
        else:
            param.string_param = value
        err = call_fails(stub, message)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"'{key}'" in err.details()


def test_message_over_the_configured_size_names_the_input(stub):
    rows = MAX_MESSAGE_BYTES // (19 * 4) + 1  # just over the limit (checked before the signature)
    err = call_fails(stub, request(rows=rows))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_message_bytes" in err.details() and "'features'" in err.details()


def test_malformed_bytes_tensor_names_the_input(small_gateway: GatewayProcess, tmp_path):
    # The demo model has no BYTES input; the decoder runs before the signature check, so the
    # error still names the input and its element.
    with grpc.insecure_channel(small_gateway.url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        message = service_pb2.ModelInferRequest(model_name="fraud")
        message.inputs.add(name="text", datatype="BYTES", shape=[2])
        message.raw_input_contents.append(b"\x05\x00\x00\x00abc")
        err = call_fails(stub, message)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'text'" in err.details() and "element 0" in err.details()


def test_server_keeps_serving_after_bad_requests(small_gateway: GatewayProcess):
    client = small_gateway.client()
    inp = triton_grpc.InferInput("features", [1, DEMO_WIDTH], "FP32")
    inp.set_data_from_numpy(demo_features(1))
    assert client.infer("fraud", [inp]).as_numpy("probability").shape == (1, 1)
    with pytest.raises(InferenceServerException) as info:
        client.get_model_metadata("nope")
    assert info.value.status() == "StatusCode.NOT_FOUND"
    client.close()
    assert small_gateway.process.poll() is None
    assert "Traceback" not in small_gateway.stderr()


def test_an_overlong_request_id_is_refused_naming_it(stub):
    """The id is echoed back and kept in the prediction event: it is bounded."""
    err = call_fails(stub, request(id="r" * 5000))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "request id" in err.details()
    assert stub.ModelInfer(request(id="r" * 64)).id == "r" * 64


def test_bytes_that_are_not_a_request_are_invalid_argument(small_gateway: GatewayProcess):
    with grpc.insecure_channel(small_gateway.url) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        with pytest.raises(grpc.RpcError) as info:
            call(b"\x0a\xff\xff\xff\xff")  # a string field whose length runs past the end
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid ModelInferRequest" in info.value.details()
