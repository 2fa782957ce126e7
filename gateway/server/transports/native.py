"""The native transport: pygrpc-native's front runs HTTP/2 and gRPC framing in Rust, outside
the GIL, and serves ModelInfer itself; every other RPC goes to a grpc.aio server behind it.

ModelInfer calls arrive in batches: one thread waits on the front (without the GIL) and hands
each batch to the event loop in one wake-up; each call then runs as a task from the request's
bytes to the response's (``InferenceServicer.infer_bytes``) and is answered by its id. The
rest (ModelStreamInfer, metadata, repository, health, reflection, admin) is forwarded by the
front to a grpcio server on a Unix socket in a private directory: the same services, unchanged.

Bounds as on grpcio: at most ``server.max_concurrent_rpcs`` calls at once, counted together
on both sides (a stream counts once), and a request over twice ``max_message_bytes`` is
RESOURCE_EXHAUSTED undecoded (the front has read it whole by then: it hands over messages).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import shutil
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
from pygrpc_native import EVENT_CANCEL, NativeGrpcFront

from gateway.errors import GatewayError, SettingsError
from gateway.server.servicer import error_trailers
from gateway.server.transports import grpcio as behind
from gateway.server.transports.base import Services
from gateway.settings import ServerSettings

__all__ = ["NativeTransport"]

log = logging.getLogger(__name__)

MODEL_INFER = f"/{behind.SERVICE_NAME}/ModelInfer"
_FLUSH_S = 5.0  # for answers given to the front to leave before it closes, at most
_BATCH = 256  # calls handed to the event loop per wake-up, at most
_UNAVAILABLE = grpc.StatusCode.UNAVAILABLE.value[0]
_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
_INTERNAL = grpc.StatusCode.INTERNAL.value[0]
_OVER_CAP = "Concurrent RPC limit exceeded!"  # grpcio's words for its maximum_concurrent_rpcs


class _Cap:
    """Calls held at once, on the front and behind it together (all on the event loop)."""

    __slots__ = ("held", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    def take(self) -> bool:
        if self.held >= self.limit:
            return False
        self.held += 1
        return True

    def give(self) -> None:
        self.held -= 1


class _CapBehind(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Holds a place in the cap for each call the server behind the front runs."""

    def __init__(self, cap: _Cap) -> None:
        self._cap = cap

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        return handler if handler is None else _held(handler, self._cap)


def _held(handler: grpc.RpcMethodHandler, cap: _Cap) -> grpc.RpcMethodHandler:
    """``handler`` whose behaviour runs only with a place in ``cap``, given back at its end."""
    if handler.request_streaming and handler.response_streaming:
        behaviour, make = handler.stream_stream, grpc.stream_stream_rpc_method_handler
    elif handler.request_streaming:
        behaviour, make = handler.stream_unary, grpc.stream_unary_rpc_method_handler
    elif handler.response_streaming:
        behaviour, make = handler.unary_stream, grpc.unary_stream_rpc_method_handler
    else:
        behaviour, make = handler.unary_unary, grpc.unary_unary_rpc_method_handler

    async def refuse(context: grpc.aio.ServicerContext) -> None:
        if not cap.take():
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, _OVER_CAP)

    async def held_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await refuse(context)
        try:
            async for reply in behaviour(request, context):
                yield reply
        finally:
            cap.give()

    async def held(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await refuse(context)
        try:
            return await behaviour(request, context)
        finally:
            cap.give()

    wrapped = held_stream if inspect.isasyncgenfunction(behaviour) else held
    return make(
        wrapped,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class NativeTransport:
    name = "native"

    def __init__(self, settings: ServerSettings, services: Services) -> None:
        self._settings = settings
        self._infer = services.inference.infer_bytes
        self._identify = services.guard.gate.identify  # its metadata only: no TLS here
        self._services = services
        self._cap = _Cap(settings.max_concurrent_rpcs)
        self._receive_limit = 2 * settings.max_message_bytes
        self._front: NativeGrpcFront | None = None
        self._behind: grpc.aio.Server | None = None
        self._directory: str | None = None
        self._receiver: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._calls: dict[int, asyncio.Task[None]] = {}
        self._stopping = False
        self.port = 0

    async def start(self) -> None:
        settings = self._settings
        address = f"{settings.host}:{settings.port}"
        self._directory = tempfile.mkdtemp(prefix="gateway-grpc-")
        socket = str(Path(self._directory) / "behind.sock")
        server = behind.make_server(settings, cap=_CapBehind(self._cap))
        behind.add_services(server, self._services)
        behind.bind(server, f"unix:{socket}")
        await server.start()
        self._behind = server
        try:
            front = NativeGrpcFront(
                address,
                [(MODEL_INFER, False)],
                call_details=True,
                metrics=True,  # what it has answered, for a clean close
                reuse_port=settings.reuse_port,
            )
        except OSError as err:
            await self.stop(0)
            raise SettingsError(f"server.port: cannot bind {address}: {err}") from None
        front.set_fallback(socket)
        self._loop = asyncio.get_running_loop()
        front.start()
        self._front = front
        self.port = front.bound_port
        self._receiver = threading.Thread(
            target=self._receive, args=(front, self._loop), name="grpc-native-receive", daemon=True
        )
        self._receiver.start()

    def _receive(self, front: NativeGrpcFront, loop: asyncio.AbstractEventLoop) -> None:
        """Wait for calls without the GIL; hand each batch to the loop in one wake-up."""
        while (events := front.recv_batch_details(_BATCH)) is not None:
            try:
                # Stamped here: a deadline counts from arrival, not from the loop's turn.
                loop.call_soon_threadsafe(self._on_events, events, time.monotonic())
            except RuntimeError:  # the loop closed without stop()
                front.close()
                return

    def _on_events(self, events: Sequence[tuple[Any, ...]], received: float) -> None:
        front, loop = self._front, self._loop
        if front is None or loop is None:  # handed over as the transport closed: gone with it
            return
        calls = self._calls
        for kind, call_id, _method, payload, _key, details in events:
            if kind == EVENT_CANCEL:  # the client left, or its deadline passed
                if (task := calls.get(call_id)) is not None:
                    task.cancel()
            elif self._stopping:
                front.fail(call_id, _UNAVAILABLE, "server is shutting down")
            elif len(payload) > self._receive_limit:
                front.fail(
                    call_id,
                    _EXHAUSTED,
                    f"Received message larger than max ({len(payload)} vs. {self._receive_limit})",
                )
            elif not self._cap.take():
                front.fail(call_id, _EXHAUSTED, _OVER_CAP)
            else:
                metadata, _peer, time_remaining = details
                calls[call_id] = loop.create_task(
                    self._answer(front, call_id, payload, metadata, time_remaining, received)
                )

    async def _answer(
        self,
        front: NativeGrpcFront,
        call_id: int,
        payload: bytes,
        metadata: tuple[tuple[str, str | bytes], ...],
        time_remaining: float | None,
        received: float,
    ) -> None:
        try:
            caller = self._identify("ModelInfer", metadata)
            reply = await self._infer(
                payload, metadata.__iter__, time_remaining, "ModelInfer", received, caller=caller
            )
            front.respond(call_id, reply)
        except GatewayError as err:
            # The front sends grpc-* keys itself and refuses them from us.
            trailers = [(k, v) for k, v in error_trailers(err) if not k.startswith("grpc-")]
            front.fail(call_id, err.grpc_status.value[0], str(err), trailing_metadata=trailers)
        except asyncio.CancelledError:
            pass  # the call is over already (client gone, deadline passed, server closing)
        except Exception:  # never a call left without an answer
            log.exception("ModelInfer call %d could not be answered", call_id)
            front.fail(call_id, _INTERNAL, "internal error")
        finally:
            self._calls.pop(call_id, None)
            self._cap.give()

    @staticmethod
    async def _sent(front: NativeGrpcFront, timeout_s: float) -> None:
        """Until the front has put every answer on the wire (closing drops what it holds)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            counts = (front.metrics() or {}).get("methods", {}).get(MODEL_INFER, {})
            ended = sum(status["count"] for status in counts.get("status", {}).values())
            if ended >= counts.get("started", 0):
                return
            await asyncio.sleep(0.005)

    async def stop(self, grace_s: float) -> None:
        self._stopping = True
        stopping_behind = (
            asyncio.ensure_future(self._behind.stop(grace_s)) if self._behind is not None else None
        )
        if tasks := list(self._calls.values()):
            _done, late = await asyncio.wait(tasks, timeout=grace_s)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        if stopping_behind is not None:
            await stopping_behind
        if self._front is not None:
            await self._sent(self._front, _FLUSH_S)
            await asyncio.to_thread(self._front.close)
        if self._receiver is not None:
            await asyncio.to_thread(self._receiver.join, 5.0)
        if self._directory is not None:
            shutil.rmtree(self._directory, ignore_errors=True)
        self._front = self._behind = None
        self._directory = None
