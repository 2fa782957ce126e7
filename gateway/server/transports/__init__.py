"""The gRPC transports: one module each, the same services on either.

``grpcio``: grpc.aio, every RPC on grpcio's core. ``native``: pygrpc-native's front (HTTP/2 and
gRPC framing in Rust, outside the GIL) serves ModelInfer itself and hands every other RPC
(ModelStreamInfer, metadata, health, reflection, admin) to a grpc.aio server behind it.
``server.transport: auto`` is native where it is installed and can serve the settings (not
TLS: with ``tls.cert_file`` set, auto picks grpcio and says why; native is refused).
"""

from __future__ import annotations

import importlib

from gateway.errors import SettingsError
from gateway.server.transports.base import Services, Transport
from gateway.settings import ServerSettings, TlsSettings

__all__ = ["Services", "Transport", "choose", "create"]


def _native_refuses(settings: ServerSettings, tls: TlsSettings) -> str | None:
    """Why the native transport cannot serve ``settings``; None when it can."""
    if tls.enabled:
        return "tls.cert_file is set and the native transport does not serve TLS"
    try:
        importlib.import_module("pygrpc_native._native")
    except ImportError as err:
        return f"pygrpc-native cannot be imported here ({err})"
    return None


def choose(settings: ServerSettings, tls: TlsSettings | None = None) -> tuple[str, str]:
    """The transport to serve ``settings`` (and ``tls``) on, and why."""
    if settings.transport == "grpcio":
        return "grpcio", "server.transport=grpcio"
    refusal = _native_refuses(settings, tls or TlsSettings())
    if settings.transport == "native":
        if refusal is not None:
            raise SettingsError(f"server.transport: native cannot serve here: {refusal}")
        return "native", "server.transport=native"
    if refusal is not None:
        return "grpcio", f"server.transport=auto and {refusal}"
    return "native", "server.transport=auto and pygrpc-native is installed"


def create(
    name: str, settings: ServerSettings, services: Services, tls: TlsSettings | None = None
) -> Transport:
    if name == "native":
        from gateway.server.transports.native import NativeTransport

        return NativeTransport(settings, services)
    from gateway.server.transports.grpcio import GrpcioTransport

    return GrpcioTransport(settings, services, tls)
