"""Stage 1, the HTTP/REST edge: KServe v2 (Open Inference Protocol) REST with Triton's binary
tensor extension, on the same servicer as the gRPC edge. Transport-free: a server
(``rest.servers``) hands ``RestApp.handle`` a request's method, path, headers and body and
writes back the ``Reply``.

Nothing here serves anything itself. Every call but infer is the gRPC method's own: its path
and body become the protobuf request the gRPC edge would have parsed, it runs through the same
guard (credentials, model rights, audit) and servicer method, and its reply is written as
JSON (protobuf field names, 64-bit integers as numbers, as Triton writes them). Infer decodes
JSON or binary tensors (``rest.codec``) into the same ``InferRequest`` and goes through the
servicer's ``infer`` (span, metrics, pipeline). A GatewayError (or a gRPC status) becomes
``{"error": "..."}`` with the HTTP status gRPC's maps to.
"""

from __future__ import annotations

import re
import time
import zlib
from collections.abc import AsyncIterable, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import grpc
import orjson
from google.protobuf.message import Message  # type: ignore[import-untyped]

from gateway._version import __version__
from gateway.api.v1 import inference_pb2 as pb
from gateway.errors import GatewayError, InvalidRequest
from gateway.server.guard import Guard
from gateway.server.rest.codec import HEADER_LENGTH, decode_infer, encode_infer, json_object
from gateway.server.servicer import EXTENSIONS, InferenceServicer, error_trailers, guarded

__all__ = ["HTTP_STATUS", "Reply", "RestApp"]

# gRPC status -> HTTP status (google.rpc's mapping; Triton's clients read only the body's error).
HTTP_STATUS: Final[dict[grpc.StatusCode, int]] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
_JSON: Final = "application/json"
_TOO_LARGE: Final = "request body larger than server.max_message_bytes"
_BINARY: Final = "application/octet-stream"
_MODEL = re.compile(
    r"/v2/models/(?P<model>[^/]+)(?:/versions/(?P<version>[0-9]+))?"
    r"(?:/(?P<action>infer|ready|config|stats))?"
)
_REPOSITORY = re.compile(r"/v2/repository/models/(?P<model>[^/]+)/(?P<action>load|unload)")


@dataclass
class Reply:
    status: int
    body: bytes = b""
    content_type: str = _JSON
    headers: list[tuple[str, str]] = field(default_factory=list)


class _Refused(grpc.aio.AbortError):  # type: ignore[misc]
    """A call ended with a gRPC status (what ``context.abort`` raises on the gRPC edge)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code, self.details = code, details


class HttpCall:
    """What the guard and the servicer read of a call, for an HTTP request: its headers as
    metadata, its peer; ``abort`` raises as grpc.aio's does."""

    def __init__(self, headers: Mapping[str, str], peer: str) -> None:
        self._metadata = tuple(headers.items())
        self._peer = peer
        self._code: grpc.StatusCode | None = None
        self.trailers: tuple[tuple[str, str], ...] = ()

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def auth_context(self) -> dict[str, list[bytes]]:
        return {}  # no client certificates over HTTP (auth.mode mtls serves no HTTP)

    def peer(self) -> str:
        return self._peer

    def time_remaining(self) -> float | None:
        return None

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def set_trailing_metadata(self, trailers: Iterable[tuple[str, str]]) -> None:
        self.trailers = tuple(trailers)

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self._code = code
        raise _Refused(code, details)


Unary = Callable[[Message, Any], Awaitable[object]]


class RestApp:
    """Routes a KServe v2 REST request to the servicer; ``handle`` never raises."""

    def __init__(self, servicer: InferenceServicer, guard: Guard, max_body_bytes: int) -> None:
        self._servicer = servicer
        self._guard = guard
        self.max_body_bytes = max_body_bytes

        def method(name: str) -> Unary:
            return guarded(name, getattr(servicer, name), guard)

        self._metadata = method("ModelMetadata")
        self._ready = method("ModelReady")
        self._config = method("ModelConfig")
        self._stats = method("ModelStatistics")
        self._index = method("RepositoryIndex")
        self._load = method("RepositoryModelLoad")
        self._unload = method("RepositoryModelUnload")

    async def serve(
        self,
        method: str,
        path: str,
        headers: Mapping[str, str],
        chunks: AsyncIterable[bytes],
        peer: str,
    ) -> Reply:
        """The reply to a request whose body arrives in ``chunks``: read up to
        ``max_body_bytes`` (past it, or a Content-Length past it, 413 and no more is read)."""
        limit = self.max_body_bytes
        if int(headers.get("content-length") or 0) > limit:
            return _error(413, _TOO_LARGE)
        parts: list[bytes] = []
        size = 0
        async for chunk in chunks:
            size += len(chunk)
            if size > limit:
                return _error(413, _TOO_LARGE)
            parts.append(chunk)
        return await self.handle(method, path, headers, b"".join(parts), peer)

    async def handle(
        self, method: str, path: str, headers: Mapping[str, str], body: bytes, peer: str
    ) -> Reply:
        """The reply to one request; ``headers`` with lower-case names."""
        call = HttpCall(headers, peer)
        try:
            body = _decompressed(headers.get("content-encoding", ""), body, self.max_body_bytes)
            reply = await self._route(method, path, headers, body, call)
        except _Refused as refused:
            reply = _error(HTTP_STATUS.get(refused.code, 500), refused.details, call.trailers)
        except GatewayError as err:
            reply = _error(HTTP_STATUS.get(err.grpc_status, 500), str(err), error_trailers(err))
        except _Unsupported as err:
            reply = _error(501, str(err), (("accept-encoding", "gzip, deflate"),))
        return _compressed(reply, headers.get("accept-encoding", ""))

    async def _route(
        self, method: str, path: str, headers: Mapping[str, str], body: bytes, call: HttpCall
    ) -> Reply:
        if path == "/v2/health/live":
            return _get(method) or _json({"live": True})
        if path == "/v2/health/ready":
            ready = self._servicer.is_ready
            return _get(method) or _json({"ready": ready}, 200 if ready else 503)
        if path == "/v2":
            metadata = {"name": "gateway", "version": __version__, "extensions": EXTENSIONS}
            return _get(method) or _json(metadata)
        if path == "/v2/models/stats":
            return _get(method) or await self._message(
                self._stats, pb.ModelStatisticsRequest(), call
            )
        if path == "/v2/repository/index":
            if method != "POST":
                return _not_allowed()
            wanted = json_object(body) if body.strip() else {}
            ready = wanted.get("ready", False)
            if not isinstance(ready, bool):
                raise InvalidRequest("ready: true or false")
            request = pb.RepositoryIndexRequest(ready=ready)
            reply = await self._call(self._index, request, call)
            assert isinstance(reply, pb.RepositoryIndexResponse)
            return _json([_plain(entry) for entry in reply.models])
        if match := _REPOSITORY.fullmatch(path):
            if method != "POST":
                return _not_allowed()
            model, action = match["model"], match["action"]
            if action == "load":
                await self._call(self._load, pb.RepositoryModelLoadRequest(model_name=model), call)
            else:
                unload = pb.RepositoryModelUnloadRequest(model_name=model)
                await self._call(self._unload, unload, call)
            return Reply(200)
        if match := _MODEL.fullmatch(path):
            return await self._model(method, match, headers, body, call)
        return _error(404, "Not Found")

    async def _model(
        self,
        method: str,
        match: re.Match[str],
        headers: Mapping[str, str],
        body: bytes,
        call: HttpCall,
    ) -> Reply:
        model, version, action = match["model"], match["version"] or "", match["action"]
        if action == "infer":
            if method != "POST":
                return _not_allowed()
            return await self._infer(model, version, headers, body, call)
        if method != "GET":
            return _not_allowed()
        if action == "ready":
            reply = await self._call(
                self._ready, pb.ModelReadyRequest(name=model, version=version), call
            )
            assert isinstance(reply, pb.ModelReadyResponse)
            return _json({"name": model, "ready": reply.ready}, 200 if reply.ready else 503)
        if action == "config":
            config = await self._call(
                self._config, pb.ModelConfigRequest(name=model, version=version), call
            )
            assert isinstance(config, pb.ModelConfigResponse)
            return _json(_plain(config.config))
        if action == "stats":
            request = pb.ModelStatisticsRequest(name=model, version=version)
            return await self._message(self._stats, request, call)
        request = pb.ModelMetadataRequest(name=model, version=version)
        return await self._message(self._metadata, request, call)

    async def _infer(
        self, model: str, version: str, headers: Mapping[str, str], body: bytes, call: HttpCall
    ) -> Reply:
        arrived = time.monotonic()
        caller = self._guard.identify("ModelInfer", call)
        length = headers.get(HEADER_LENGTH)
        try:
            header_length = None if length is None else int(length)
        except ValueError:
            raise InvalidRequest(
                f"Inference-Header-Content-Length: {length!r}: a byte count"
            ) from None
        choice = []

        def decode() -> Any:
            request, outputs = decode_infer(body, header_length, model, version)
            choice.append(outputs)
            return request

        data, json_length = await self._servicer.infer(
            decode,
            lambda response: encode_infer(response, choice[0]),
            model,
            call.invocation_metadata,
            arrived,
            caller,
        )
        if json_length is None:
            return Reply(200, data)
        return Reply(200, data, _BINARY, [(HEADER_LENGTH, str(json_length))])

    async def _message(self, unary: Unary, request: Message, call: HttpCall) -> Reply:
        return _json(_plain(await self._call(unary, request, call)))

    @staticmethod
    async def _call(unary: Unary, request: Message, call: HttpCall) -> Message:
        reply = await unary(request, call)
        assert isinstance(reply, Message)
        return reply


class _Unsupported(Exception):
    """A Content-Encoding this server does not read (501)."""


def _decompressed(encoding: str, body: bytes, limit: int) -> bytes:
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise _Unsupported(f"Content-Encoding {encoding!r}: gzip, deflate or identity")
    inflater = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as err:
        raise InvalidRequest(f"request body: not {encoding}: {err}") from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise InvalidRequest(f"request body inflates past server.max_message_bytes ({limit} bytes)")
    return out


def _compressed(reply: Reply, accept: str) -> Reply:
    """The reply compressed as the client accepts (gzip before deflate), when it has a body."""
    if len(reply.body) < 1024 or not accept:
        return reply
    accepted = {part.split(";")[0].strip().lower() for part in accept.split(",")}
    if "gzip" in accepted:
        compressor = zlib.compressobj(wbits=31)
        encoding = "gzip"
    elif "deflate" in accepted:
        compressor = zlib.compressobj()
        encoding = "deflate"
    else:
        return reply
    reply.body = compressor.compress(reply.body) + compressor.flush()
    reply.headers.append(("content-encoding", encoding))
    return reply


def _get(method: str) -> Reply | None:
    return None if method == "GET" else _not_allowed()


def _not_allowed() -> Reply:
    return _error(405, "Method Not Allowed")


def _json(value: object, status: int = 200) -> Reply:
    return Reply(status, orjson.dumps(value))


def _error(status: int, message: str, trailers: Iterable[tuple[str, str]] = ()) -> Reply:
    headers = []
    for key, value in trailers:
        if key == "retry-after-ms":  # a rate limit's wait, in HTTP's own header too
            headers.append(("retry-after", str(max(1, round(int(value) / 1000)))))
            headers.append((key, value))
    return Reply(status, orjson.dumps({"error": message}), _JSON, headers)


def _plain(message: Message) -> dict[str, Any]:
    """A protobuf message as Triton writes it in JSON: field names as declared, every field
    (defaults too), enums by name, 64-bit integers as numbers (not strings)."""
    out: dict[str, Any] = {}
    for descriptor in message.DESCRIPTOR.fields:
        value = getattr(message, descriptor.name)
        if descriptor.message_type is not None and descriptor.message_type.GetOptions().map_entry:
            value_field = descriptor.message_type.fields_by_name["value"]
            out[descriptor.name] = {
                key: _plain(item) if value_field.message_type is not None else item
                for key, item in value.items()
            }
        elif descriptor.label == descriptor.LABEL_REPEATED:
            out[descriptor.name] = [_value(descriptor, item) for item in value]
        else:
            if descriptor.message_type is not None and not message.HasField(descriptor.name):
                continue
            out[descriptor.name] = _value(descriptor, value)
    return out


def _value(descriptor: Any, value: Any) -> Any:
    if descriptor.message_type is not None:
        return _plain(value)
    if descriptor.enum_type is not None:
        return descriptor.enum_type.values_by_number[value].name
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value
