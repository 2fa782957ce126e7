"""Stage 1, the gRPC edge: the OIP service. Thin: decode, call the pipeline or repository, encode.

Every RPC, and every request on a stream, runs inside ``_observe``: the one place that opens
the server span and records metrics; anything unexpected is logged there and becomes a generic
INTERNAL error, never a traceback. ``_rpc`` turns a GatewayError into the call's status; on a
stream it rides in the response's ``error_message``. ``infer_bytes`` is ModelInfer without a
grpc.aio context, for a transport that hands over the request's bytes and answers by itself
(``error_trailers`` gives it what a GatewayError adds to the status).

Every request arrives as bytes and is decoded here (ModelInfer, ModelStreamInfer) or by
``decoded`` around the other methods: a message that does not parse is INVALID_ARGUMENT naming
its type, counted in ``codec.BadMessages`` and logged at most once a minute, never a traceback each.
On a stream it is answered in its turn and the stream goes on. ``guarded`` runs the same guard
around a method given a message already built (the REST edge's).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Generic, NoReturn, TypeAlias, TypeVar

import grpc
from google.protobuf.message import DecodeError  # type: ignore[import-untyped]
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from gateway._version import __version__
from gateway.api.v1 import inference_pb2 as pb
from gateway.api.v1 import inference_pb2_grpc as pb_grpc
from gateway.auth import Principal, current_principal
from gateway.errors import (
    GatewayError,
    InvalidRequest,
    ModelNotFound,
    RateLimited,
    RuntimeFailure,
)
from gateway.pipeline import Pipeline
from gateway.runtime.repository import LoadedVersion, ModelRepository
from gateway.server import convert, model_config
from gateway.server.codec import BadMessages, decode_fast, encode_response
from gateway.server.guard import Guard
from gateway.settings import ServerSettings
from gateway.telemetry import GatewayMetrics, Tracing
from gateway.types import InferRequest, InferResponse
from gateway.wire import varint

__all__ = ["InferenceServicer", "Metadata", "decoded", "error_trailers", "guarded"]

log = logging.getLogger(__name__)

T = TypeVar("T")
# The call's metadata, read only when something needs it (tracing).
Metadata: TypeAlias = Callable[[], Iterable[tuple[str, str | bytes]]]
SERVICE = "inference.GRPCInferenceService"
EXTENSIONS = ["model_repository", "model_configuration", "statistics", "binary_tensor_data"]
_STREAM_INFER_RESPONSE = b"\x12"  # ModelStreamInferResponse.infer_response: field 2, bytes


def decoded(
    rpc: str,
    decode: Callable[[bytes], T],
    behavior: Callable[[T, grpc.aio.ServicerContext], Awaitable[object]],
    bad: BadMessages,
    guard: Guard,
) -> Callable[[bytes, grpc.aio.ServicerContext], Awaitable[object]]:
    """A unary method taking its request's bytes: parsed here, INVALID_ARGUMENT if they do not
    (grpcio's own deserializer would answer UNKNOWN and log a traceback per message).
    ``guard`` runs first: nothing is parsed for a caller it refuses; then it checks the model
    the request names and audits what needs admin rights."""
    name = rpc.rsplit("/", 1)[-1]

    async def unary(request: bytes, context: grpc.aio.ServicerContext) -> object:
        principal = await _identify(name, guard, context)
        try:
            message = decode(request)
        except DecodeError as err:
            await _abort(context, bad.note(name, type_name(decode), err))
        return await _guarded(name, guard, context, principal, message, behavior)

    return unary


def guarded(
    rpc: str,
    behavior: Callable[[T, grpc.aio.ServicerContext], Awaitable[object]],
    guard: Guard,
) -> Callable[[T, grpc.aio.ServicerContext], Awaitable[object]]:
    """``decoded`` for a request that is a message already (the REST app builds them): the
    same guard, nothing to parse."""
    name = rpc.rsplit("/", 1)[-1]

    async def unary(message: T, context: grpc.aio.ServicerContext) -> object:
        principal = await _identify(name, guard, context)
        return await _guarded(name, guard, context, principal, message, behavior)

    return unary


async def _identify(name: str, guard: Guard, context: grpc.aio.ServicerContext) -> Principal:
    try:
        return guard.identify(name, context)
    except GatewayError as err:
        await _abort(context, err)


async def _guarded(
    name: str,
    guard: Guard,
    context: grpc.aio.ServicerContext,
    principal: Principal,
    message: T,
    behavior: Callable[[T, grpc.aio.ServicerContext], Awaitable[object]],
) -> object:
    try:
        return await guard.run(
            name, context, message, principal, lambda: behavior(message, context)
        )
    except GatewayError as err:
        await _abort(context, err)


def type_name(decode: Callable[[bytes], object]) -> str:
    """The message type a generated ``FromString`` parses."""
    owner = getattr(decode, "__self__", None)
    return getattr(owner, "__name__", "request")


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(
        self,
        pipeline: Pipeline,
        settings: ServerSettings,
        metrics: GatewayMetrics,
        tracing: Tracing,
        guard: Guard,
    ) -> None:
        self._pipeline = pipeline
        self._guard = guard
        self._repository: ModelRepository = pipeline.repository
        self._settings = settings
        self._metrics = metrics
        self._tracing = tracing
        self.is_ready = False
        self.bad_messages = BadMessages()
        # Plain counters read at scrape time: no metric lock taken twice per request.
        self._in_flight = dict.fromkeys(
            pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods_by_name, 0
        )
        for name in self._in_flight:
            metrics.in_flight.labels(name).set_function(
                functools.partial(self._in_flight.__getitem__, name)
            )

    # -- the one wrapper ---------------------------------------------------------------------

    async def _observe(
        self,
        rpc: str,
        metadata: Metadata,
        call: Callable[[trace.Span], Awaitable[T]],
        model: str = "",
        arrived: float | None = None,
    ) -> T:
        """Run ``call`` inside a server span, counted and timed; failures leave as GatewayError.

        Timed from ``arrived`` (``time.monotonic()`` when the transport took the call) where
        given: a request that waited for the loop reports that wait too. An unexpected
        exception is logged with its trace id and becomes a RuntimeFailure whose message
        carries only that id, never a traceback.
        """
        started = time.monotonic() if arrived is None else arrived
        code = "OK"
        version = ""
        self._in_flight[rpc] += 1
        with self._span(rpc, metadata) as span:
            if model:
                span.set_attribute("gateway.model", model)
            try:
                result = await call(span)
                version = str(getattr(result, "model_version", ""))
                return result
            except GatewayError as err:
                code = err.grpc_status.name
                span.set_status(Status(StatusCode.ERROR, str(err)))
                raise
            except asyncio.CancelledError:
                code = "CANCELLED"
                raise
            except Exception as err:
                code = "INTERNAL"
                span_context = span.get_span_context()
                trace_id = (
                    format(span_context.trace_id, "032x")
                    if span_context.is_valid
                    else uuid.uuid4().hex  # tracing off: still an id to find the log line
                )
                log.exception("%s failed (trace id %s)", rpc, trace_id)
                span.set_status(Status(StatusCode.ERROR, "internal error"))
                raise RuntimeFailure(f"internal error (trace id {trace_id})") from err
            finally:
                self._in_flight[rpc] -= 1
                self._metrics.observe(rpc, model, version, code, time.monotonic() - started)

    def _span(self, rpc: str, metadata: Metadata) -> contextlib.AbstractContextManager[trace.Span]:
        if not self._tracing.enabled:
            return contextlib.nullcontext(trace.INVALID_SPAN)  # no context work per request
        return self._tracing.tracer.start_as_current_span(
            f"{SERVICE}/{rpc}",
            context=self._tracing.extract(metadata()),
            kind=SpanKind.SERVER,
            attributes={"rpc.system": "grpc", "rpc.service": SERVICE, "rpc.method": rpc},
            record_exception=False,
            set_status_on_exception=False,
        )

    async def _rpc(
        self,
        rpc: str,
        context: grpc.aio.ServicerContext,
        call: Callable[[trace.Span], Awaitable[T]],
        model: str = "",
    ) -> T:
        """A unary RPC: the one place a GatewayError becomes the call's gRPC status."""
        try:
            return await self._observe(rpc, context.invocation_metadata, call, model)
        except GatewayError as err:
            await _abort(context, err)

    # -- health and metadata -----------------------------------------------------------------

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.is_ready)

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        try:
            self._pipeline.describe(request.name, request.version)
        except GatewayError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="gateway", version=__version__, extensions=EXTENSIONS)

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        async def call(span: trace.Span) -> pb.ModelMetadataResponse:
            loaded = self._pipeline.describe(request.name, request.version)
            reply = model_config.metadata_to_pb(loaded, self._repository.versions(loaded.name))
            reply.name = request.name  # a route answers under its own name
            return reply

        return await self._rpc("ModelMetadata", context, call, request.name)

    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelConfigResponse:
        async def call(span: trace.Span) -> pb.ModelConfigResponse:
            loaded = self._pipeline.describe(request.name, request.version)
            config = model_config.config_to_pb(loaded)
            config.name = request.name
            return pb.ModelConfigResponse(config=config)

        return await self._rpc("ModelConfig", context, call, request.name)

    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelStatisticsResponse:
        async def call(span: trace.Span) -> pb.ModelStatisticsResponse:
            routed = self._pipeline.route_versions(request.name) if not request.version else None
            versions = routed or self._select_versions(request.name, request.version)
            caller = current_principal.get()
            versions = [v for v in versions if request.name or caller.allows(v.name)]
            stats = [model_config.statistics_to_pb(v) for v in versions]
            if routed:
                for entry in stats:  # a route reports its variants' versions under its name
                    entry.name = request.name
            return pb.ModelStatisticsResponse(model_stats=stats)

        return await self._rpc("ModelStatistics", context, call, request.name)

    def _select_versions(self, name: str, version: str) -> list[LoadedVersion]:
        if not name:
            return self._repository.loaded()
        if version:
            return [self._repository.get(name, version)]
        versions = self._repository.versions(name)
        if not versions:
            raise ModelNotFound(f"model '{name}' has no loaded version")
        return versions

    # -- repository --------------------------------------------------------------------------

    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryIndexResponse:
        caller = current_principal.get()
        entries = [
            e for e in self._repository.index(ready_only=request.ready) if caller.allows(e.name)
        ]
        return pb.RepositoryIndexResponse(
            models=[
                pb.RepositoryIndexResponse.ModelIndex(
                    name=e.name, version=e.version, state=e.state, reason=e.reason
                )
                for e in entries
            ]
        )

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelLoadResponse:
        async def call(span: trace.Span) -> pb.RepositoryModelLoadResponse:
            if request.parameters:
                raise InvalidRequest(
                    f"RepositoryModelLoad parameters are not supported "
                    f"(got {', '.join(sorted(request.parameters))}); "
                    "edit the model's files in the repository and load again"
                )
            await self._repository.load(request.model_name)
            return pb.RepositoryModelLoadResponse()

        return await self._rpc("RepositoryModelLoad", context, call, request.model_name)

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelUnloadResponse:
        async def call(span: trace.Span) -> pb.RepositoryModelUnloadResponse:
            await self._repository.unload(request.model_name)
            return pb.RepositoryModelUnloadResponse()

        return await self._rpc("RepositoryModelUnload", context, call, request.model_name)

    # -- inference ---------------------------------------------------------------------------

    async def _predict(
        self, request: InferRequest, span: trace.Span, arrived: float, caller: Principal
    ) -> InferResponse:
        request.arrived = arrived  # whichever decoder made it: its deadline counts from here
        if caller.tenant is not None:  # known by its credential: its tenant, not the parameter's
            caller.require(request.model_name)
            request.options = caller.options_of(request.options)
        span.set_attribute("gateway.rows", request.rows)
        response = await self._pipeline.predict(request)
        span.set_attribute("gateway.model_version", response.model_version)
        return response

    async def infer_bytes(
        self,
        payload: bytes,
        metadata: Metadata,
        time_remaining: float | None,
        rpc: str = "ModelInfer",
        arrived: float | None = None,
        *,
        caller: Principal,
    ) -> bytes:
        """ModelInfer from the request's bytes to the response's, for ``caller`` (``identify``
        found it); a failure leaves as a GatewayError (bytes that are not a ModelInferRequest:
        InvalidRequest).

        The native codec takes what it can (codec.decode_fast, codec.encode_response); the
        rest, and every error, goes the protobuf way."""
        limit = self._settings.max_message_bytes
        if arrived is None:
            arrived = time.monotonic()
        decode: Callable[[], InferRequest]
        fast = decode_fast(payload, limit, time_remaining)
        if fast is not None:
            model, decode = fast.model_name, lambda: fast
        else:
            try:
                message = pb.ModelInferRequest.FromString(payload)
            except DecodeError as err:
                invalid = self.bad_messages.note(rpc, "ModelInferRequest", err)
                model, decode = "", functools.partial(_raise, invalid)
            else:  # decoded inside _observe: its InvalidRequest is counted under the model
                model = message.model_name
                decode = functools.partial(convert.request_from_pb, message, limit, time_remaining)
        return await self.infer(decode, encode_response, model, metadata, arrived, caller, rpc)

    async def infer(
        self,
        decode: Callable[[], InferRequest],
        encode: Callable[[InferResponse], T],
        model: str,
        metadata: Metadata,
        arrived: float,
        caller: Principal,
        rpc: str = "ModelInfer",
    ) -> T:
        """One inference for ``caller``, whatever front end decoded it and encodes its answer:
        ``decode`` runs inside the server span (its InvalidRequest is counted under
        ``model``); with tracing on, so does ``encode`` (span ``respond``)."""
        if not self._tracing.enabled:
            response = await self._observe(
                rpc,
                metadata,
                lambda span: self._predict(decode(), span, arrived, caller),
                model,
                arrived,
            )
            return encode(response)
        tracer = self._tracing.tracer

        async def call(span: trace.Span) -> _Encoded[T]:
            response = await self._predict(decode(), span, arrived, caller)
            with tracer.start_as_current_span("respond"):
                return _Encoded(response.model_version, encode(response))

        encoded = await self._observe(rpc, metadata, call, model, arrived)
        return encoded.data

    async def ModelInfer(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        """Registered without (de)serializers (``transports.grpcio.add_services``): bytes that
        are not a ModelInferRequest are INVALID_ARGUMENT here, as on every transport."""
        try:
            caller = self._guard.identify("ModelInfer", context)
            return await self.infer_bytes(
                request, context.invocation_metadata, context.time_remaining(), caller=caller
            )
        except GatewayError as err:
            await _abort(context, err)

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        """Many requests in flight per stream; each answered as soon as it is done.

        Registered without (de)serializers (``transports.grpcio.add_services``): each message
        is decoded as ModelInfer's are, and one that fails, even one that is not a
        ModelInferRequest at all, gets its error on the stream while the stream goes on
        (Triton's convention). A slot is taken per request read and given back once its
        response is written, so a slow reader of responses stops the stream from reading more
        (bounded memory).
        """
        try:  # refused before anything is read; then each request is checked again, so a key
            # revoked or expired while the stream is open stops serving it
            self._guard.identify("ModelStreamInfer", context)
        except GatewayError as err:
            await _abort(context, err)
        slots = asyncio.Semaphore(self._settings.stream_max_in_flight)
        done: asyncio.Queue[bytes | None] = asyncio.Queue()

        async def answer(payload: bytes, arrived: float, remaining: float | None) -> None:
            try:
                caller = self._guard.identify("ModelStreamInfer", context)
                response = await self.infer_bytes(
                    payload,
                    context.invocation_metadata,
                    remaining,
                    "ModelStreamInfer",
                    arrived,
                    caller=caller,
                )
                reply = _STREAM_INFER_RESPONSE + varint(len(response)) + response
            except GatewayError as err:
                reply = _stream_error(payload, str(err)).SerializeToString()
            await done.put(reply)

        async def read() -> None:
            try:
                async with asyncio.TaskGroup() as group:
                    async for payload in request_iterator:
                        arrived, remaining = time.monotonic(), context.time_remaining()
                        await slots.acquire()
                        group.create_task(answer(payload, arrived, remaining))
            finally:
                await done.put(None)

        reader = asyncio.create_task(read())
        try:
            while (reply := await done.get()) is not None:
                yield reply
                slots.release()
            await reader
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader


@dataclass(frozen=True, slots=True)
class _Encoded(Generic[T]):
    """An answer encoded inside its span; its version is what the metrics label it with."""

    model_version: str
    data: T


def error_trailers(err: GatewayError) -> tuple[tuple[str, str], ...]:
    """Trailing metadata a failed call carries beside its status."""
    if isinstance(err, RateLimited):
        wait_ms = str(max(1, round(err.retry_after_s * 1000)))
        # gRPC's own retry hint (a client with a retry policy waits this long), and the same
        # under a name of ours for transports that keep grpc-* keys to themselves (native).
        return (("grpc-retry-pushback-ms", wait_ms), ("retry-after-ms", wait_ms))
    return ()


async def _abort(context: grpc.aio.ServicerContext, err: GatewayError) -> NoReturn:
    """End the call with ``err``'s status (grpc.aio's abort raises)."""
    if trailers := error_trailers(err):
        context.set_trailing_metadata(trailers)
    await context.abort(err.grpc_status, str(err))
    raise AssertionError("unreachable: context.abort raises") from err


def _raise(err: GatewayError) -> NoReturn:
    raise err


def _stream_error(payload: bytes, message: str) -> pb.ModelStreamInferResponse:
    """The error, with the request's model, version and id where its bytes parse (a client
    matches answers to requests by id)."""
    try:
        request = pb.ModelInferRequest.FromString(payload)
    except DecodeError:
        request = pb.ModelInferRequest()
    return pb.ModelStreamInferResponse(
        error_message=message,
        infer_response=pb.ModelInferResponse(
            model_name=request.model_name, model_version=request.model_version, id=request.id
        ),
    )
