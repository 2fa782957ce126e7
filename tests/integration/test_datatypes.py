"""Every OIP datatype round-trips through a real ONNX model, as raw and as typed contents."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from tests.conftest import GatewayProcess
from tests.models import ECHO_TYPES, write_echo_model

pytestmark = pytest.mark.integration

CONTENTS = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP16": "fp32_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def sample(datatype: str) -> np.ndarray:
    """Values that exercise each type's range (extremes, negatives, fractions, UTF-8)."""
    if datatype == "BOOL":
        return np.array([[True, False], [False, True]])
    if datatype == "BYTES":
        return np.array([["héllo".encode(), b""], [b"x" * 40, "日本".encode()]], dtype=object)
    dtype = np.dtype(triton_grpc.triton_to_np_dtype(datatype))
    if dtype.kind == "f":
        return np.array([[1.5, -2.25], [np.finfo(dtype).max, np.finfo(dtype).tiny]], dtype=dtype)
    info = np.iinfo(dtype)
    return np.array([[info.min, info.max], [0, 7]], dtype=dtype)


@pytest.fixture(scope="module")
def echo_gateway(tmp_path_factory: pytest.TempPathFactory):
    repo = tmp_path_factory.mktemp("echo-repo")
    write_echo_model(repo / "echo")
    proc = GatewayProcess(repo, tmp_path_factory.mktemp("echo-gateway"))
    yield proc
    assert proc.stop() == 0, proc.stderr()


def _all_inputs(typed: bool) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name="echo")
    for datatype in ECHO_TYPES:
        values = sample(datatype)
        tensor = request.inputs.add(name=f"in_{datatype}", datatype=datatype, shape=[2, 2])
        if typed:
            getattr(tensor.contents, CONTENTS[datatype]).extend(values.reshape(-1).tolist())
        elif datatype == "BYTES":
            request.raw_input_contents.append(triton_grpc.serialize_byte_tensor(values).item())
        else:
            request.raw_input_contents.append(values.tobytes())
    return request


def _decode(response: service_pb2.ModelInferResponse) -> dict[str, np.ndarray]:
    out = {}
    for tensor, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        if tensor.datatype == "BYTES":
            out[tensor.name] = triton_grpc.deserialize_bytes_tensor(raw).reshape(tensor.shape)
        else:
            dtype = triton_grpc.triton_to_np_dtype(tensor.datatype)
            out[tensor.name] = np.frombuffer(raw, dtype=dtype).reshape(tensor.shape)
    return out


@pytest.mark.parametrize("typed", [False, True], ids=["raw", "typed"])
def test_every_datatype_round_trips(echo_gateway: GatewayProcess, typed: bool):
    with grpc.insecure_channel(echo_gateway.url) as channel:
        response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(_all_inputs(typed))
    outputs = _decode(response)
    for datatype in ECHO_TYPES:
        got = outputs[f"out_{datatype}"]
        want = sample(datatype)
        assert got.shape == (2, 2), datatype
        if datatype == "BYTES":
            assert got.tolist() == want.tolist()
        else:
            np.testing.assert_array_equal(got, want, err_msg=datatype)


def test_tritonclient_bytes_and_fp16_round_trip(echo_gateway: GatewayProcess):
    client = echo_gateway.client()
    inputs = []
    for datatype in ECHO_TYPES:
        inp = triton_grpc.InferInput(f"in_{datatype}", [2, 2], datatype)
        inp.set_data_from_numpy(sample(datatype))
        inputs.append(inp)
    requested = [triton_grpc.InferRequestedOutput(name) for name in ("out_BYTES", "out_FP16")]
    result = client.infer(model_name="echo", inputs=inputs, outputs=requested)
    assert result.as_numpy("out_BYTES").tolist() == sample("BYTES").tolist()
    np.testing.assert_array_equal(result.as_numpy("out_FP16"), sample("FP16"))
    assert result.as_numpy("out_FP32") is None  # not requested, not sent
    client.close()


def test_invalid_utf8_in_a_string_input_is_invalid_argument(echo_gateway: GatewayProcess):
    request = _all_inputs(typed=True)
    bad = next(t for t in request.inputs if t.datatype == "BYTES")
    bad.contents.bytes_contents[1] = b"\xff\xfe"
    with grpc.insecure_channel(echo_gateway.url) as channel, pytest.raises(grpc.RpcError) as info:
        service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "in_BYTES" in info.value.details()
    assert "UTF-8" in info.value.details()
