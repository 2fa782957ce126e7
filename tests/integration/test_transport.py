"""The two gRPC transports: how one is chosen, and that both answer alike.

``server.transport: auto`` serves on the native front where pygrpc-native imports, on grpcio
where it does not (saying why); ``native`` asked for where it cannot serve stops start-up. The
whole suite runs on each transport in turn (``make test``); here both serve at once.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from tests.conftest import DEMO_WIDTH, demo_features

pytestmark = pytest.mark.integration

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"


@pytest.fixture
def no_native(tmp_path: Path) -> dict[str, str]:
    """An environment where pygrpc-native is present but cannot load (as on a platform it has
    no wheel for)."""
    shim = tmp_path / "shim" / "pygrpc_native"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text('raise ImportError("no build for this platform")\n')
    return {"PYTHONPATH": str(shim.parent)}


def infer(url: str, message: service_pb2.ModelInferRequest) -> np.ndarray:
    with grpc.insecure_channel(url) as channel:
        reply = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(message)
    return np.frombuffer(reply.raw_output_contents[0], dtype=np.float32)


def fraud_request(rows: int = 3) -> service_pb2.ModelInferRequest:
    message = service_pb2.ModelInferRequest(model_name="fraud", id="r-1")
    message.inputs.add(name="features", datatype="FP32", shape=[rows, DEMO_WIDTH])
    message.raw_input_contents.append(demo_features(rows).tobytes())
    return message


def test_auto_serves_on_the_native_front_where_it_can(demo_repo, start_gateway):
    proc = start_gateway(demo_repo, "--transport", "auto")
    assert "transport: native (server.transport=auto and pygrpc-native is installed)" in (
        proc.stderr()
    )
    assert "transport=native" in proc.stderr()
    assert infer(proc.url, fraud_request()).shape == (3,)


def test_auto_falls_back_to_grpcio_and_says_why(demo_repo, start_gateway, no_native):
    proc = start_gateway(demo_repo, "--transport", "auto", env=no_native)
    assert (
        "transport: grpcio (server.transport=auto and pygrpc-native cannot be imported here "
        "(no build for this platform))" in proc.stderr()
    )
    assert infer(proc.url, fraud_request()).shape == (3,)


def test_native_asked_for_where_it_cannot_serve_stops_start_up(demo_repo, start_gateway, no_native):
    with pytest.raises(RuntimeError, match=r"server\.transport: native cannot serve here"):
        start_gateway(demo_repo, "--transport", "native", env=no_native)


def test_both_transports_answer_alike(demo_repo, start_gateway):
    native = start_gateway(demo_repo, "--transport", "native")
    grpcio = start_gateway(demo_repo, "--transport", "grpcio")
    assert "transport=native" in native.stderr() and "transport=grpcio" in grpcio.stderr()
    np.testing.assert_array_equal(
        infer(native.url, fraud_request()), infer(grpcio.url, fraud_request())
    )

    def failure(url: str, payload: bytes) -> tuple[grpc.StatusCode, str]:
        with grpc.insecure_channel(url) as channel:
            call = channel.unary_unary(MODEL_INFER)  # bytes as they are
            with pytest.raises(grpc.RpcError) as info:
                call(payload)
        return info.value.code(), info.value.details()

    unknown = service_pb2.ModelInferRequest(model_name="nope").SerializeToString()
    for payload, code in [
        (unknown, grpc.StatusCode.NOT_FOUND),
        (b"\xff\xff\xff\xff", grpc.StatusCode.INVALID_ARGUMENT),  # not a message at all
    ]:
        assert failure(native.url, payload) == failure(grpcio.url, payload)
        assert failure(native.url, payload)[0] == code
    # The services behind the native front: metadata (unary) and a stream.
    for proc in (native, grpcio):
        with proc.client() as client:
            assert client.get_model_metadata("fraud").name == "fraud"
            assert client.is_server_ready()
