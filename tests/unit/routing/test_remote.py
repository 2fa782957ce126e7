"""Remote variants as settings, and RemoteModels over fake channels (no sockets): what each
remote status becomes, the deadline every call carries, the metrics and the channel bound."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import numpy as np
import pytest
from pydantic import ValidationError

from gateway.errors import (
    DeadlineExceeded,
    GatewayError,
    InvalidRequest,
    ModelNotFound,
    ModelNotReady,
    Overloaded,
    RuntimeFailure,
)
from gateway.routing import RemoteModels
from gateway.settings import RemoteSettings, RouteSpec, VariantSpec
from gateway.telemetry import GatewayMetrics
from gateway.types import InferRequest, InferResponse, Tensor

# -- settings --------------------------------------------------------------------------------


def variant(**fields: Any) -> VariantSpec:
    return VariantSpec.model_validate({"name": "v", "weight": 1, **fields})


@pytest.mark.parametrize(
    "endpoint", ["127.0.0.1:8001", "triton.models.svc.cluster.local:8001", "[::1]:1", "h_1:65535"]
)
def test_an_endpoint_is_a_host_and_a_port(endpoint):
    spec = variant(endpoint=endpoint, model="m")
    assert spec.local_model is None and spec.required_model is None


@pytest.mark.parametrize(
    ("endpoint", "why"),
    [
        ("localhost", "is not host:port"),
        (":8001", "is not host:port"),
        ("h:0", "the port must be 1-65535"),
        ("h:65536", "the port must be 1-65535"),
        ("h:-1", "the port must be 1-65535"),
        ("h:８０", "the port must be 1-65535"),  # noqa: RUF001 - digits int() would take
        ("bad host:80", "is no host name"),
        ("10.0.0.300:80", "is no IPv4 address"),
        ("[not-v6]:80", "is no IPv6 address"),
        ("http://h:80", "is no host name"),
    ],
)
def test_a_bad_endpoint_is_refused_saying_why(endpoint, why):
    with pytest.raises(ValidationError, match=why) as info:
        variant(endpoint=endpoint, model="m")
    assert info.value.errors()[0]["loc"] == ("endpoint",)


def test_a_variant_is_exactly_one_of_a_model_a_remote_model_or_an_output():
    with pytest.raises(ValidationError, match="endpoint needs model"):
        variant(endpoint="h:1", output={"y": [1.0]})  # a remote variant names its model there
    with pytest.raises(ValidationError, match="set exactly one of model"):
        variant(endpoint="h:1", model="m", output={"y": [1.0]})
    with pytest.raises(ValidationError, match="contract is for a remote variant"):
        variant(model="m", contract="m")
    with pytest.raises(ValidationError, match="contract"):
        variant(endpoint="h:1", model="m", contract="m@v2")  # a version is a number
    spec = variant(endpoint="h:1", model="dense", contract="fraud@2")
    assert spec.required_model == "fraud" and spec.local_model is None
    assert variant(model="fraud").local_model == "fraud"


def test_a_route_may_mix_remote_and_local_variants():
    spec = RouteSpec.model_validate(
        {
            "variants": [
                {"name": "far", "endpoint": "h:1", "model": "m", "weight": 1},
                {"name": "near", "model": "m"},
            ],
            "fallbacks": ["near"],
            "shadows": [{"variant": "far"}],
        }
    )
    assert [v.endpoint for v in spec.variants] == ["h:1", None]


# -- calls -----------------------------------------------------------------------------------


class FakeCall:
    """A channel's ModelInfer: answers ``answer`` or raises ``error``; records each call."""

    def __init__(self) -> None:
        self.calls: list[tuple[bytes, float, object]] = []
        self.answer = b"answer"
        self.error: BaseException | None = None

    # grpc's own signature
    async def __call__(self, data: bytes, *, timeout: float, metadata: object) -> bytes:  # noqa: ASYNC109
        self.calls.append((data, timeout, metadata))
        if self.error is not None:
            raise self.error
        return self.answer


class FakeChannel:
    def __init__(self, target: str) -> None:
        self.target = target
        self.call = FakeCall()
        self.closed = False

    def unary_unary(self, method: str) -> FakeCall:
        assert method == "/inference.GRPCInferenceService/ModelInfer"
        return self.call

    async def close(self, grace: float | None = None) -> None:
        self.closed = True


@pytest.fixture
def channels(monkeypatch: pytest.MonkeyPatch) -> dict[str, FakeChannel]:
    opened: dict[str, FakeChannel] = {}

    def insecure_channel(target: str, options: object = None) -> FakeChannel:
        opened[target] = FakeChannel(target)
        return opened[target]

    monkeypatch.setattr(grpc.aio, "insecure_channel", insecure_channel)
    return opened


def decode(data: bytes) -> InferResponse:
    if data != b"answer":
        raise InvalidRequest("not a ModelInferResponse")
    y = Tensor("y", "FP32", np.ones((2, 1), np.float32))
    return InferResponse("m", "3", "", [y])


def remote(metrics: GatewayMetrics, in_use: tuple[str, ...] = (), **settings: Any) -> RemoteModels:
    return RemoteModels(
        RemoteSettings(**settings),
        metrics,
        encode=lambda request: request.model_name.encode(),
        decode=decode,
        in_use=lambda: in_use,
    )


def sample(metrics: GatewayMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def failure(code: grpc.StatusCode, details: str = "said the server") -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)


async def test_a_call_carries_its_deadline_and_learns_the_remote_outputs(channels):
    metrics = GatewayMetrics()
    models = remote(metrics)
    assert models.layout("h:1", "m", "") is None
    response = await models.infer("h:1", InferRequest("m", inputs=[]), timeout_s=0.25)
    assert response.model_version == "3"
    assert channels["h:1"].call.calls == [(b"m", 0.25, ())]
    assert models.layout("h:1", "m", "") == (("y", "FP32"),)
    assert sample(metrics, "gateway_remote_requests_total", endpoint="h:1", outcome="ok") == 1
    assert sample(metrics, "gateway_remote_up", endpoint="h:1") == 1
    assert sample(metrics, "gateway_remote_duration_seconds_count", endpoint="h:1") == 1
    # No time left: no call at all.
    with pytest.raises(DeadlineExceeded, match="no time left"):
        await models.infer("h:1", InferRequest("m"), timeout_s=0)
    assert len(channels["h:1"].call.calls) == 1
    await models.close()
    assert channels["h:1"].closed


@pytest.mark.parametrize(
    ("code", "error", "up"),
    [
        (grpc.StatusCode.UNAVAILABLE, ModelNotReady, 0),
        (grpc.StatusCode.DEADLINE_EXCEEDED, DeadlineExceeded, 0),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, Overloaded, 1),
        (grpc.StatusCode.NOT_FOUND, ModelNotFound, 1),
        (grpc.StatusCode.INVALID_ARGUMENT, InvalidRequest, 1),
        (grpc.StatusCode.INTERNAL, RuntimeFailure, 1),
        (grpc.StatusCode.UNAUTHENTICATED, RuntimeFailure, 1),
    ],
)
async def test_each_remote_status_becomes_the_gateway_error_of_its_meaning(
    channels, code, error, up
):
    metrics = GatewayMetrics()
    models = remote(metrics)
    await models.infer("h:1", InferRequest("m"), timeout_s=1)  # the channel opens
    channels["h:1"].call.error = failure(code)
    with pytest.raises(GatewayError) as info:
        await models.infer("h:1", InferRequest("m"), timeout_s=1)
    assert type(info.value) is error
    assert "remote h:1 model 'm'" in str(info.value)
    outcome = code.name
    assert sample(metrics, "gateway_remote_requests_total", endpoint="h:1", outcome=outcome) == 1
    assert sample(metrics, "gateway_remote_up", endpoint="h:1") == up


async def test_an_answer_that_does_not_parse_is_a_runtime_failure_naming_the_endpoint(channels):
    models = remote(GatewayMetrics())
    await models.infer("h:1", InferRequest("m"), timeout_s=1)
    channels["h:1"].call.answer = b"garbage"
    with pytest.raises(RuntimeFailure, match="remote h:1: model 'm' answered a response that"):
        await models.infer("h:1", InferRequest("m"), timeout_s=1)


async def test_cancelling_a_call_cancels_it_through(channels):
    models = remote(GatewayMetrics())
    await models.infer("h:1", InferRequest("m"), timeout_s=1)
    channels["h:1"].call.error = asyncio.CancelledError()
    with pytest.raises(asyncio.CancelledError):
        await models.infer("h:1", InferRequest("m"), timeout_s=1)


async def test_channels_past_the_bound_close_those_no_route_names(channels):
    metrics = GatewayMetrics()
    models = remote(metrics, in_use=("h:2", "h:3"), max_endpoints=2)
    await models.infer("h:1", InferRequest("m"), timeout_s=1)
    await models.infer("h:2", InferRequest("m"), timeout_s=1)
    await models.infer("h:3", InferRequest("m"), timeout_s=1)  # h:1 is named by no route
    await asyncio.sleep(0)  # the closing task runs
    assert channels["h:1"].closed and not channels["h:2"].closed
    assert sample(metrics, "gateway_remote_up", endpoint="h:1") is None  # its series went
    assert models.layout("h:1", "m", "") is None
    with pytest.raises(Overloaded, match=r"more than routing\.remote\.max_endpoints"):
        await models.infer("h:4", InferRequest("m"), timeout_s=1)
    await models.close()
    assert channels["h:2"].closed and channels["h:3"].closed
