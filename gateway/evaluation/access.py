"""Who may call the sidecar (``evaluation.auth``): each RPC needs one role, and the caller's key
or client certificate, looked up in the keys file at every call, must hold it.

Roles are exact, none implies another: ``publish`` (Publish: the gateway), ``write``
(PutLabels, ResolveReview, RunTrigger), ``read`` (Report, Verdict, Export, ExportFile, Actions,
Reviews). A key that sends labels and reads reports lists both. An RPC of the service missing from
``ROLES`` is refused to everyone.

A key (mode ``api_key``) is checked from the call's metadata before the request is read; a
client certificate (mode ``mtls``) once the handshake made it known, before the request is
parsed. Refusals are counted (``sidecar_auth_refused_total{rpc,reason}``) and never echo the
key. With mode ``none`` every caller is admitted.

An admitted request stream (Publish) is answered with headers carrying ``ADMITTED`` at once,
so that its client writes only once it knows the stream is taken. NOTE: a write racing a
refusal fails inside gRPC, whose INTERNAL then stands in for the refusal's status.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Final, Literal

import grpc

from gateway.auth import ADMITTED, KeyRing, bearer, peer_names
from gateway.errors import GatewayError, PermissionDenied, Unauthenticated
from gateway.evaluation.metrics import SidecarMetrics
from gateway.settings import SidecarAuthSettings

__all__ = ["ADMITTED", "ROLES", "SERVICE", "AccessInterceptor"]

log = logging.getLogger(__name__)

SERVICE: Final = "gateway.v1.EvaluationService"
ROLES: Final[dict[str, Literal["publish", "write", "read"]]] = {
    "Publish": "publish",
    "PutLabels": "write",
    "Report": "read",
    "Verdict": "read",
    "Export": "read",
    "ExportFile": "read",
    "Actions": "read",
    "Reviews": "read",
    "ResolveReview": "write",
    "RunTrigger": "write",
}
_PREFIX: Final = f"/{SERVICE}/"

_Admit = Callable[[grpc.aio.ServicerContext], Awaitable[None]]


class AccessInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Admits a call to the EvaluationService only from a caller whose entry in
    ``evaluation.auth.keys_file`` holds the RPC's role (anyone, with mode none); other
    services (health) pass untouched."""

    def __init__(self, settings: SidecarAuthSettings, metrics: SidecarMetrics) -> None:
        self._mode = settings.mode
        self._metrics = metrics
        self._keys: KeyRing | None = None
        if settings.mode != "none":
            assert settings.keys_file is not None
            self._keys = KeyRing(
                settings.keys_file,
                "evaluation.auth.keys_file",
                on_reload=lambda outcome: metrics.key_reloads.labels(outcome).inc(),
            )

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method: str = details.method
        if not method.startswith(_PREFIX):
            return await continuation(details)
        rpc = method[len(_PREFIX) :]
        keys = self._keys
        if self._mode == "api_key" and keys is not None:
            refusal = self._refusal(rpc, key=bearer(details.invocation_metadata))
            if refusal is not None:
                return _refusing(refusal)
        handler = await continuation(details)
        if handler is None:
            return handler

        async def admit(context: grpc.aio.ServicerContext) -> None:
            if self._mode == "mtls" and keys is not None:
                refusal = self._refusal(rpc, names=peer_names(context.auth_context()))
                if refusal is not None:
                    await context.abort(refusal.grpc_status, str(refusal))
            if handler.request_streaming:
                await context.send_initial_metadata((ADMITTED,))

        return _admitting(handler, admit)

    def _refusal(
        self, rpc: str, key: str | None = None, names: list[str] | None = None
    ) -> GatewayError | None:
        """Why the caller with ``key`` (mode api_key) or a certificate of ``names`` (mode
        mtls) may not call ``rpc`` (counted), or None when it may."""
        assert self._keys is not None
        role = ROLES.get(rpc)
        refusal: GatewayError
        try:
            entry = self._keys.admit(key, names, now=_utc_now)
        except Unauthenticated as err:
            reason, refusal = err.reason, err
        else:
            if role is not None and role in entry.roles:
                return None
            reason = "role"
            needs = f"the '{role}' role" if role is not None else "a role no key has"
            refusal = PermissionDenied(
                f"'{entry.name}' may not call {rpc}: it needs {needs} "
                f"(it has: {', '.join(entry.roles) or 'none'})",
                entry.name,
            )
        # NOTE: a method name no RPC has is counted as "other": callers choose it, and each
        # label value would be a series kept for good.
        self._metrics.refused.labels(rpc if role is not None else "other", reason).inc()
        log.debug("refused %s (%s): %s", rpc, reason, refusal)
        return refusal


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _refusing(refusal: GatewayError) -> grpc.RpcMethodHandler:
    """A handler that answers ``refusal`` at once. It is request-streaming whatever the RPC
    (the wire does not tell), so the server runs it without reading the request first."""

    async def refuse(requests: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort(refusal.grpc_status, str(refusal))

    return grpc.stream_unary_rpc_method_handler(refuse)


def _admitting(handler: grpc.RpcMethodHandler, admit: _Admit) -> grpc.RpcMethodHandler:
    """``handler`` that runs ``admit`` before it parses the request: the server hands over the
    request's bytes (no deserializer), parsed here once the caller is admitted. Shaped like
    ``handler`` (grpc tells a streaming behaviour by its being an async generator function)."""
    parse: Callable[[bytes], Any] = handler.request_deserializer or (lambda raw: raw)
    serialize = handler.response_serializer

    async def parsed(requests: AsyncIterator[bytes]) -> AsyncIterator[Any]:
        async for raw in requests:
            yield parse(raw)

    if handler.request_streaming and handler.response_streaming:

        async def stream_stream(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[Any]:
            await admit(context)
            async with contextlib.aclosing(handler.stream_stream(parsed(requests), context)) as out:
                async for reply in out:
                    yield reply

        return grpc.stream_stream_rpc_method_handler(stream_stream, None, serialize)
    if handler.request_streaming:

        async def stream_unary(requests: AsyncIterator[bytes], context: Any) -> Any:
            await admit(context)
            return await handler.stream_unary(parsed(requests), context)

        return grpc.stream_unary_rpc_method_handler(stream_unary, None, serialize)
    if handler.response_streaming:

        async def unary_stream(raw: bytes, context: Any) -> AsyncIterator[Any]:
            await admit(context)
            async with contextlib.aclosing(handler.unary_stream(parse(raw), context)) as out:
                async for reply in out:
                    yield reply

        return grpc.unary_stream_rpc_method_handler(unary_stream, None, serialize)

    async def unary_unary(raw: bytes, context: Any) -> Any:
        await admit(context)
        return await handler.unary_unary(parse(raw), context)

    return grpc.unary_unary_rpc_method_handler(unary_unary, None, serialize)
