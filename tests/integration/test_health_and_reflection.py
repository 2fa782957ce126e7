"""The standard gRPC health service and server reflection, through their own clients."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import descriptor_pool  # type: ignore[import-untyped]  # no types-protobuf
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from tests.conftest import GatewayProcess

pytestmark = pytest.mark.integration

OIP = "inference.GRPCInferenceService"


@pytest.mark.parametrize("service", ["", OIP])
def test_health_reports_serving(gateway: GatewayProcess, service: str):
    with grpc.insecure_channel(gateway.url) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service)
        )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_health_of_an_unknown_service_is_not_found(gateway: GatewayProcess):
    with grpc.insecure_channel(gateway.url) as channel, pytest.raises(grpc.RpcError) as info:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="nope"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_and_describes_the_services(gateway: GatewayProcess):
    """What `grpcurl list` and `grpcurl describe` do, with grpcio-reflection's own client."""
    with grpc.insecure_channel(gateway.url) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        assert {
            OIP,
            "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection",
        } <= services
        # A private pool: the descriptors come over the wire, not from any local module.
        pool = descriptor_pool.DescriptorPool(database)
        service = pool.FindServiceByName(OIP)
        methods = {m.name: m for m in service.methods}
    assert {
        "ServerLive",
        "ServerReady",
        "ServerMetadata",
        "ModelReady",
        "ModelMetadata",
        "ModelConfig",
        "ModelInfer",
        "ModelStreamInfer",
        "ModelStatistics",
        "RepositoryIndex",
        "RepositoryModelLoad",
        "RepositoryModelUnload",
    } <= methods.keys()
    infer = methods["ModelInfer"]
    assert infer.input_type.full_name == "inference.ModelInferRequest"
    assert infer.input_type.fields_by_name["raw_input_contents"].number == 7
    assert methods["ModelStreamInfer"].output_type.full_name == "inference.ModelStreamInferResponse"
