"""Stage 2, remote variants: a model served by another OIP gRPC server (another gateway,
Triton, KServe), called over a pooled channel per endpoint.

``RemoteModels.infer`` makes one ModelInfer call under the attempt's remaining deadline (never
without one) and turns every failure into the gateway's error of the same meaning, so the
route's runner falls back from a remote that is down, slow or full as from a local model:

    UNAVAILABLE (down, refused, draining)      ModelNotReady      falls back
    DEADLINE_EXCEEDED                          DeadlineExceeded   falls back
    RESOURCE_EXHAUSTED (full, or too large)    Overloaded         falls back
    NOT_FOUND (no such model there)            ModelNotFound      falls back
    INVALID_ARGUMENT (the client's request)    InvalidRequest     fails: no variant would take it
    anything else, or an answer that does
    not parse                                  RuntimeFailure     falls back

The messages travel as bytes: what goes in and out of them is the edge's business
(``gateway.server.convert``, handed in as ``encode``/``decode``), so no protobuf type enters
this stage. Channels are bounded in number (``max_endpoints``: past it, those of endpoints no
route names are closed) and in the size of what they take (``max_message_bytes``).

Metrics per endpoint: ``gateway_remote_requests_total{endpoint,outcome}`` (ok or a gRPC
status name), ``gateway_remote_duration_seconds{endpoint}`` and ``gateway_remote_up{endpoint}``
(1 while the last call reached the remote server, 0 after one that could not).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Final

import grpc
from prometheus_client import Counter, Gauge, Histogram

from gateway.auth import bearer_metadata, channel_credentials, channel_options
from gateway.errors import (
    DeadlineExceeded,
    GatewayError,
    InvalidRequest,
    ModelNotFound,
    ModelNotReady,
    Overloaded,
    RuntimeFailure,
)
from gateway.settings import RemoteSettings, read_secret
from gateway.telemetry import GatewayMetrics
from gateway.types import Feeds, InferRequest, InferResponse, Outcome, Tensor

if TYPE_CHECKING:
    from gateway.routing.runner import Attempt

__all__ = ["Layout", "RemoteCall", "RemoteModels"]

log = logging.getLogger(__name__)

MODEL_INFER: Final = "/inference.GRPCInferenceService/ModelInfer"
_MAX_DETAIL = 300  # of a remote's error message, quoted in ours
_CLOSE_GRACE_S = 5.0
_MAX_RECONNECT_MS = 2000
# Latency buckets from 1 ms to 30 s: a network call on top of a model run.
_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# The statuses that say the remote server could not be reached or did not answer in time.
_DOWN: Final = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})

Encode = Callable[[InferRequest], bytes]
Decode = Callable[[bytes], InferResponse]


# A remote model's outputs as it last answered all of them: (name, datatype) in its order.
Layout = tuple[tuple[str, str], ...]
_MAX_LAYOUTS = 4096


class _Endpoint:
    __slots__ = ("call", "channel", "outcomes")

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.channel = channel
        self.call = channel.unary_unary(MODEL_INFER)  # bytes in, bytes out
        self.outcomes: set[str] = set()  # the labels of its series, removed with it


class RemoteModels:
    """ModelInfer on remote OIP servers, one channel per endpoint. Use on the event loop."""

    def __init__(
        self,
        settings: RemoteSettings,
        metrics: GatewayMetrics,
        encode: Encode,
        decode: Decode,
        in_use: Callable[[], Iterable[str]] = tuple,
    ) -> None:
        self.settings = settings
        self._encode = encode
        self._decode = decode
        self._in_use = in_use
        self._metadata = bearer_metadata(
            read_secret(None, settings.token_file, "routing.remote.token_file"),
            "routing.remote.token_file",
        )
        self._credentials = (
            channel_credentials(settings.tls, "routing.remote.tls")
            if settings.tls.enabled
            else None
        )
        self._options = [
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", -1),  # what the client sent us, bounded there
            # NOTE: a remote that comes back is called again within a few seconds, not after
            # gRPC's default reconnect backoff (up to two minutes); meanwhile calls fail fast.
            ("grpc.initial_reconnect_backoff_ms", 250),
            ("grpc.max_reconnect_backoff_ms", _MAX_RECONNECT_MS),
            *channel_options(settings.tls),
        ]
        self._endpoints: dict[str, _Endpoint] = {}
        self._layouts: dict[tuple[str, str, str], Layout] = {}
        self._closing: set[asyncio.Task[None]] = set()
        registry = metrics.registry
        self._requests = Counter(
            "gateway_remote_requests",
            "ModelInfer calls to remote variants' endpoints, by outcome: ok, or the gRPC "
            "status the call ended with.",
            ["endpoint", "outcome"],
            registry=registry,
        )
        self._seconds = Histogram(
            "gateway_remote_duration_seconds",
            "Time of one ModelInfer call to an endpoint (network included), by endpoint.",
            ["endpoint"],
            buckets=_BUCKETS_S,
            registry=registry,
        )
        self._up = Gauge(
            "gateway_remote_up",
            "1 while the last call to the endpoint reached its server (whatever it answered), "
            "0 after one that could not (unavailable, or no answer within its deadline).",
            ["endpoint"],
            registry=registry,
        )

    async def infer(self, endpoint: str, request: InferRequest, timeout_s: float) -> InferResponse:
        """``request`` answered by the server at ``endpoint`` within ``timeout_s``."""
        if timeout_s <= 0:
            raise DeadlineExceeded(f"remote {endpoint}: no time left for the call")
        used = self._endpoint(endpoint)
        data = self._encode(request)
        started = time.perf_counter()
        try:
            answer: bytes = await used.call(data, timeout=timeout_s, metadata=self._metadata)
        except grpc.aio.AioRpcError as err:
            self._observe(endpoint, used, err.code(), started)
            raise _error(endpoint, request.model_name, err) from None
        self._observe(endpoint, used, grpc.StatusCode.OK, started)
        try:
            response = self._decode(answer)
        except GatewayError as err:
            raise RuntimeFailure(
                f"remote {endpoint}: model '{request.model_name}' answered a response that does "
                f"not parse: {err}"
            ) from None
        if not request.requested_outputs:
            key = (endpoint, request.model_name, request.model_version)
            if len(self._layouts) >= _MAX_LAYOUTS and key not in self._layouts:
                self._layouts.clear()
            self._layouts[key] = tuple((t.name, t.datatype) for t in response.outputs)
        return response

    def layout(self, endpoint: str, model: str, version: str) -> Layout | None:
        """The outputs the model at ``endpoint`` answered the last time all were asked for
        (None: not seen yet): what the rows of its responses are cached as."""
        return self._layouts.get((endpoint, model, version))

    def _observe(
        self, endpoint: str, used: _Endpoint, code: grpc.StatusCode, started: float
    ) -> None:
        """A call's time and outcome, unless its channel was closed meanwhile (its series
        are gone with it; counting now would bring them back, never to be removed)."""
        if self._endpoints.get(endpoint) is not used:
            return
        self._seconds.labels(endpoint).observe(time.perf_counter() - started)
        outcome = "ok" if code == grpc.StatusCode.OK else code.name
        self._requests.labels(endpoint, outcome).inc()
        self._up.labels(endpoint).set(0 if code in _DOWN else 1)
        used.outcomes.add(outcome)

    def _endpoint(self, endpoint: str) -> _Endpoint:
        found = self._endpoints.get(endpoint)
        if found is None:
            if len(self._endpoints) >= self.settings.max_endpoints:
                self.prune()
            if len(self._endpoints) >= self.settings.max_endpoints:
                raise Overloaded(
                    f"remote {endpoint}: routes name more than routing.remote.max_endpoints "
                    f"({self.settings.max_endpoints}) endpoints"
                )
            if self._credentials is None:
                channel = grpc.aio.insecure_channel(endpoint, options=self._options)
            else:
                channel = grpc.aio.secure_channel(endpoint, self._credentials, self._options)
            found = self._endpoints[endpoint] = _Endpoint(channel)
            log.info("remote %s: channel opened", endpoint)
        return found

    def prune(self) -> list[str]:
        """Close the channels of endpoints no route names any more (their calls in flight get
        a grace period); returns those endpoints."""
        named = set(self._in_use())
        gone = [endpoint for endpoint in self._endpoints if endpoint not in named]
        for endpoint in gone:
            self._close(endpoint)
        return gone

    def _close(self, endpoint: str) -> None:
        closed = self._endpoints.pop(endpoint)
        channel = closed.channel
        for outcome in closed.outcomes:
            self._requests.remove(endpoint, outcome)
        if closed.outcomes:
            self._up.remove(endpoint)
            self._seconds.remove(endpoint)
        self._layouts = {k: v for k, v in self._layouts.items() if k[0] != endpoint}
        task = asyncio.get_running_loop().create_task(channel.close(_CLOSE_GRACE_S))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)
        log.info("remote %s: channel closed (no route names it)", endpoint)

    async def close(self) -> None:
        """Close every channel (at shutdown, after the requests in flight were answered)."""
        channels = [e.channel for e in self._endpoints.values()]
        self._endpoints.clear()
        await asyncio.gather(*(c.close(_CLOSE_GRACE_S) for c in channels), *self._closing)


class RemoteCall:
    """The calls of one attempt on a remote variant: under the attempt's deadline (or
    ``routing.remote.timeout_ms`` from now), adding up their time (what the attempt is charged
    for) and the version the remote said answered."""

    __slots__ = (
        "_remote",
        "deadline",
        "endpoint",
        "model",
        "outcome",
        "request_id",
        "took_ns",
        "version",
        "wanted",
    )

    def __init__(self, remote: RemoteModels, attempt: Attempt, request_id: str) -> None:
        self._remote = remote
        self.endpoint = attempt.endpoint
        self.model = attempt.model
        self.wanted = self.version = attempt.version
        self.request_id = request_id
        loop = asyncio.get_running_loop()
        self.deadline = attempt.deadline
        if self.deadline is None:  # no call goes without one
            self.deadline = loop.time() + remote.settings.timeout_ms / 1000
        self.took_ns = 0
        self.outcome: Outcome | None = None  # set once a call answered: what is charged

    def layout(self) -> Layout | None:
        return self._remote.layout(self.endpoint, self.model, self.wanted)

    def identity(self, layout: Layout) -> tuple[str, ...]:
        """What the remote model's cached rows are keyed by, besides its version."""
        return ("remote", self.endpoint, self.model, *(f"{n}:{d}" for n, d in layout))

    async def infer(self, inputs: list[Tensor], outputs: list[str]) -> InferResponse:
        loop = asyncio.get_running_loop()
        assert self.deadline is not None
        sent = InferRequest(self.model, self.wanted, self.request_id, inputs, outputs)
        started = time.perf_counter_ns()
        response = await self._remote.infer(self.endpoint, sent, self.deadline - loop.time())
        self.took_ns += time.perf_counter_ns() - started
        self.version = response.model_version or self.version
        rows = sent.rows
        self.outcome = Outcome([], 0, self.took_ns, rows, self.took_ns)
        return response

    def rows(
        self, layout: Layout, types: dict[str, str]
    ) -> Callable[[Feeds, int], Awaitable[Outcome]]:
        """What computes a request's missing rows for the cache: one call for all of them,
        its outputs in ``layout``'s order, each checked to hold those rows."""
        names = [name for name, _ in layout]

        async def compute(part: Feeds, count: int) -> Outcome:
            tensors = [Tensor(name, types[name], values) for name, values in part.items()]
            response = await self.infer(tensors, [])
            found = {t.name: t.data for t in response.outputs}
            if sorted(found) != sorted(names) or any(
                not a.shape or a.shape[0] != count for a in found.values()
            ):
                raise RuntimeFailure(
                    f"remote {self.endpoint} model '{self.model}' answered outputs "
                    f"{sorted(found)} for {count} rows, not {names} as before (its rows are "
                    "cached by those)"
                )
            assert self.outcome is not None
            self.outcome.outputs = [found[name] for name in names]
            return self.outcome

        return compute

    def select(self, outputs: list[Tensor], names: list[str]) -> list[Tensor]:
        """The outputs asked for, in the order asked (all when none are)."""
        if not names:
            return outputs
        found = {t.name: t for t in outputs}
        missing = [name for name in names if name not in found]
        if missing:
            raise InvalidRequest(
                f"remote {self.endpoint} model '{self.model}' has no output '{missing[0]}' "
                f"(outputs: {', '.join(found)})"
            )
        return [found[name] for name in names]


def _error(endpoint: str, model: str, err: grpc.aio.AioRpcError) -> GatewayError:
    """The gateway's error for a failed remote call: the route falls back from all but a
    request the remote found invalid (which every variant would refuse)."""
    code = err.code()
    detail = (err.details() or "")[:_MAX_DETAIL]
    where = f"remote {endpoint} model '{model}'"
    if code == grpc.StatusCode.UNAVAILABLE:
        return ModelNotReady(f"{where} is unavailable: {detail}")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(f"{where} did not answer within the attempt's deadline")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return Overloaded(f"{where}: RESOURCE_EXHAUSTED: {detail}")
    if code == grpc.StatusCode.NOT_FOUND:
        return ModelNotFound(f"{where}: NOT_FOUND: {detail}")
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidRequest(f"{where} refused the request: {detail}")
    return RuntimeFailure(f"{where} failed: {code.name}: {detail}")
