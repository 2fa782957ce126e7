"""The grpcio transport: grpc.aio serves every RPC (and, behind the native front, the rest)."""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from gateway.api.v1 import admin_pb2, admin_pb2_grpc
from gateway.api.v1 import inference_pb2 as pb
from gateway.api.v1 import inference_pb2_grpc as pb_grpc
from gateway.auth import server_credentials
from gateway.errors import SettingsError
from gateway.server.servicer import decoded
from gateway.server.transports.base import Services
from gateway.settings import ServerSettings, TlsSettings

__all__ = ["GrpcioTransport", "add_services", "bind", "make_server"]

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
ADMIN_SERVICE_NAME = admin_pb2.DESCRIPTOR.services_by_name["GatewayAdmin"].full_name


def make_server(
    settings: ServerSettings, cap: grpc.aio.ServerInterceptor | None = None
) -> grpc.aio.Server:
    """The server, bounded by ``settings``; ``cap``, where given, holds the call cap in
    grpcio's place (the native front counts its calls and the ones behind it together)."""
    limit = settings.max_message_bytes
    return grpc.aio.server(
        interceptors=None if cap is None else [cap],
        maximum_concurrent_rpcs=settings.max_concurrent_rpcs if cap is None else None,
        options=[
            # The transport refuses only gross excess; up to the limit we answer
            # INVALID_ARGUMENT naming the input (convert.request_from_pb).
            ("grpc.max_receive_message_length", 2 * limit),
            ("grpc.max_send_message_length", 2 * limit),
            # Off unless multi-process mode asks: two gateways must not share a port by accident.
            ("grpc.so_reuseport", 1 if settings.reuse_port else 0),
        ],
    )


class _Handlers:
    """Takes what generated code registers, to change a handler before a server gets it."""

    def __init__(self) -> None:
        self.methods: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        pass  # the same methods as the registered ones

    def add_registered_method_handlers(
        self, service: str, methods: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        self.methods = methods


def add_services(server: grpc.aio.Server, services: Services) -> None:
    inference, admin = _Handlers(), _Handlers()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(services.inference, inference)  # type: ignore[no-untyped-call]
    admin_pb2_grpc.add_GatewayAdminServicer_to_server(services.admin, admin)  # type: ignore[no-untyped-call]
    bad = services.inference.bad_messages
    # Every request's bytes reach the servicer undecoded: a message that does not parse is
    # INVALID_ARGUMENT naming its type, not grpcio's UNKNOWN with a traceback logged per call.
    # ModelInfer and ModelStreamInfer decode their own (natively where they can); the rest are
    # parsed by servicer.decoded.
    for service, handlers in ((SERVICE_NAME, inference), (ADMIN_SERVICE_NAME, admin)):
        methods = {
            name: grpc.unary_unary_rpc_method_handler(
                decoded(
                    name, handler.request_deserializer, handler.unary_unary, bad, services.guard
                ),
                response_serializer=handler.response_serializer,
            )
            for name, handler in handlers.methods.items()
            if handler.unary_unary is not None
        }
        if service == SERVICE_NAME:
            methods["ModelInfer"] = grpc.unary_unary_rpc_method_handler(
                services.inference.ModelInfer
            )
            methods["ModelStreamInfer"] = grpc.stream_stream_rpc_method_handler(
                services.inference.ModelStreamInfer
            )
        unknown = set(handlers.methods) - set(methods)
        assert not unknown, f"{service}: no undecoded handler for {sorted(unknown)}"
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, methods),))
        server.add_registered_method_handlers(service, methods)
    health_pb2_grpc.add_HealthServicer_to_server(services.health, server)
    reflection.enable_server_reflection(
        [SERVICE_NAME, ADMIN_SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )


def bind(server: grpc.aio.Server, address: str, tls: TlsSettings | None = None) -> int:
    """Listen on ``address``; with TLS where ``tls`` turns it on (mTLS with its client CA)."""
    try:
        if tls is not None and tls.enabled:
            port: int = server.add_secure_port(address, server_credentials(tls, "tls"))
        else:
            port = server.add_insecure_port(address)
    except RuntimeError as err:
        raise SettingsError(f"server.port: cannot bind {address}: {err}") from None
    return port


class GrpcioTransport:
    name = "grpcio"

    def __init__(
        self, settings: ServerSettings, services: Services, tls: TlsSettings | None = None
    ) -> None:
        self._settings = settings
        self._services = services
        self._tls = tls
        self._server: grpc.aio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        server = make_server(self._settings)
        add_services(server, self._services)
        self.port = bind(server, f"{self._settings.host}:{self._settings.port}", self._tls)
        await server.start()
        self._server = server

    async def stop(self, grace_s: float) -> None:
        if self._server is not None:
            await self._server.stop(grace_s)
            self._server = None
