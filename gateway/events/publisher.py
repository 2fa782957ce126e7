"""Stage 7, delivery: stream the write-ahead log to the sidecar; delete what it acknowledges.

Reads always come from the log, never from memory, so a reconnect, a sidecar restart or a
gateway restart all resume the same way: from the first unacknowledged record. Batches are
sent as encoded EventBatch bytes built from the stored event payloads (no parse, no re-encode).
At most ``max_in_flight`` batches wait for their Ack; acks come back in order on one stream.

The stream carries the gateway's credential (``events.token``: ``authorization: Bearer``) and,
with ``events.tls.ca_file``, runs over TLS whose files are read again at each reconnect. Nothing
is written before the sidecar's headers say it took the stream (``ADMITTED``). A sidecar that
refuses the credential is retried like one that is down: the events wait in the log, and
arrive once the sidecar accepts the key.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import grpc

from gateway.api.v1 import events_pb2 as ev
from gateway.auth import ADMITTED, bearer_metadata, channel_credentials, channel_options
from gateway.errors import SettingsError
from gateway.events.wal import Record, WriteAheadLog
from gateway.settings import ClientTlsSettings
from gateway.telemetry import GatewayMetrics
from gateway.wire import varint

__all__ = ["EventSink", "Publisher", "encode_batch"]

log = logging.getLogger(__name__)

PUBLISH_METHOD = "/gateway.v1.EvaluationService/Publish"
_ADMIT_WAIT_S = 5.0  # then write anyway: a sidecar that sends no headers before its first ack
_MAX_BATCH_BYTES = 4 * 1024 * 1024
_BACKOFF_S = (0.05, 2.0)  # first retry, cap
_REFUSED = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)


class EventSink:
    """Where the log's records are delivered (``events.sink``): the sidecar's stream
    (Publisher) or a broker (gateway.events.broker). A sink reads the log from its first
    unacknowledged record and acknowledges in it what its destination has durably taken; this
    base holds what every sink does alike: its task, its log thread, and waiting for acks."""

    def __init__(self, wal: WriteAheadLog, name: str) -> None:
        self._wal = wal
        self._name = name
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="events-io")
        self._new_data = asyncio.Event()
        self._acked = asyncio.Event()  # set on every ack: waiters re-check what they need
        self._task: asyncio.Task[None] | None = None
        self.connected = False

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=self._name)

    def notify(self) -> None:
        """New records are in the log."""
        self._new_data.set()

    async def drained(self, timeout_s: float) -> bool:
        """Wait until every record in the log is acknowledged (True), or the timeout passes."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                while self._wal.acked < self._wal.last:
                    self._acked.clear()
                    await self._acked.wait()
        return self._wal.acked >= self._wal.last

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._release()
        self._io.shutdown(wait=True)

    async def _run(self) -> None:
        """Deliver until cancelled (a sink's own loop)."""
        raise NotImplementedError

    async def _release(self) -> None:
        """What the sink holds beside its task and thread (a client), closed last."""


class Publisher(EventSink):
    def __init__(
        self,
        address: str,
        wal: WriteAheadLog,
        metrics: GatewayMetrics,
        batch_events: int,
        max_in_flight: int,
        max_message_bytes: int,
        *,
        tls: ClientTlsSettings | None = None,
        token: str | None = None,
    ) -> None:
        """``tls``: events.tls (off without ca_file); ``token``: the credential to present.
        SettingsError when either cannot be used (a certificate file that does not read)."""
        self._address = address
        self._tls = tls if tls is not None and tls.enabled else None
        if self._tls is not None:
            channel_credentials(self._tls, "events.tls")  # bad files fail at start-up
        self._metadata = bearer_metadata(token, "events.token")
        self._failure = ""  # the kind of failure since the stream was last open
        super().__init__(wal, "events-publisher")
        self._metrics = metrics
        self._m_acked = metrics.events.labels("acked")
        self._batch_events = batch_events
        self._max_in_flight = max_in_flight
        self._max_message_bytes = max_message_bytes

    async def _run(self) -> None:
        delay_s = _BACKOFF_S[0]
        failures = 0
        while True:
            try:
                await self._session()
            # InvalidStateError: a write on a call the sidecar already ended (it went away).
            # SettingsError: a TLS file that no longer reads (it may be mid-renewal).
            except (
                grpc.aio.AioRpcError,
                asyncio.InvalidStateError,
                ConnectionError,
                OSError,
                SettingsError,
            ) as err:
                failures += 1
                self._log_failure(err)
            except Exception:  # never let the publisher die: the log would only grow
                failures += 1
                log.exception("event publisher failed; retrying")
            else:
                failures = 0
            self._set_connected(False)
            await asyncio.sleep(delay_s)
            delay_s = min(delay_s * 2, _BACKOFF_S[1]) if failures else _BACKOFF_S[0]

    def _log_failure(self, err: Exception) -> None:
        """A new kind of failure loudly, then quietly while it lasts: no log flood. A refusal
        (the sidecar does not take the credential) is an error an operator must fix."""
        refused = isinstance(err, grpc.aio.AioRpcError) and err.code() in _REFUSED
        if isinstance(err, grpc.aio.AioRpcError):
            kind, detail = err.code().name, f"{err.code().name}: {err.details()}"
        else:
            kind, detail = type(err).__name__, str(err)
        level = logging.DEBUG
        if kind != self._failure:
            level = logging.ERROR if refused else logging.WARNING
        self._failure = kind
        if refused:
            log.log(
                level,
                "the sidecar %s refused the event stream (%s): it needs events.token (or "
                "events.token_file) to be a key with the publish role in its "
                "evaluation.auth.keys_file; %d events wait in the log, retrying",
                self._address,
                detail,
                self._wal.unacked,
            )
        else:
            log.log(
                level,
                "event stream to sidecar %s broken (%s); %d events wait in the log, retrying",
                self._address,
                detail,
                self._wal.unacked,
            )

    def _set_connected(self, connected: bool) -> None:
        if connected != self.connected:
            self.connected = connected
            self._metrics.events_connected.set(1 if connected else 0)
            if connected:
                self._failure = ""  # the next outage is news again
                log.info("event stream to sidecar %s open", self._address)

    def _channel(self) -> grpc.aio.Channel:
        """A channel to the sidecar; with TLS, its files are read now (each reconnect), so a
        renewed certificate or CA is used from the next stream on."""
        limit = 2 * self._max_message_bytes + _MAX_BATCH_BYTES
        options: list[tuple[str, int | str]] = [("grpc.max_send_message_length", limit)]
        if self._tls is None:
            return grpc.aio.insecure_channel(self._address, options=options)
        credentials = channel_credentials(self._tls, "events.tls")
        options += channel_options(self._tls)
        return grpc.aio.secure_channel(self._address, credentials, options=options)

    async def _session(self) -> None:
        async with self._channel() as channel:
            call = channel.stream_stream(
                PUBLISH_METHOD,
                request_serializer=None,  # bytes: the batch is encoded by encode_batch
                response_deserializer=ev.Ack.FromString,
            )(metadata=self._metadata)
            in_flight: deque[tuple[int, int]] = deque()  # (last sequence, events)
            receiver = asyncio.get_running_loop().create_task(self._receive(call, in_flight))
            try:
                await self._admitted(call, receiver)
                await self._send(call, in_flight, receiver)
            except asyncio.InvalidStateError:
                # A write on a call the sidecar already ended: the call's status says why
                # (a refusal, say), and the receiver raises it.
                await receiver
                raise
            finally:
                receiver.cancel()
                with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                    await receiver
                call.cancel()
                await self._rewind()

    async def _admitted(
        self, call: grpc.aio.StreamStreamCall, receiver: asyncio.Task[None]
    ) -> None:
        """Until the sidecar takes the stream; raises the sidecar's status when it refuses.

        NOTE: nothing is written before: a write racing a refusal fails inside gRPC, whose
        INTERNAL then stands in for the sidecar's UNAUTHENTICATED. A refusal's headers come
        with its status and without the ADMITTED mark; the status is awaited from the receiver.
        """
        headers = asyncio.ensure_future(call.initial_metadata())
        try:
            await asyncio.wait(
                {headers, receiver}, timeout=_ADMIT_WAIT_S, return_when=asyncio.FIRST_COMPLETED
            )
            if headers.done() and headers.result().get(ADMITTED[0]) == ADMITTED[1]:
                self._set_connected(True)
                return
            if headers.done():  # headers without the mark: the call is ending; how?
                await asyncio.wait({receiver}, timeout=_ADMIT_WAIT_S)
        finally:
            headers.cancel()
        if receiver.done():
            receiver.result()  # the sidecar's status
            raise ConnectionError("the sidecar closed the event stream")

    async def _rewind(self) -> None:
        """The next stream starts from the first unacknowledged record; what was in flight
        and dropped meanwhile will never be acknowledged now: counted dropped."""
        loop = asyncio.get_running_loop()
        # NOTE: on the io thread, after any ack still running there (acks go first).
        lost = await loop.run_in_executor(self._io, self._wal.rewind)
        if lost:
            self._metrics.events.labels("dropped").inc(lost)
            log.warning(
                "the event stream ended with %d events sent and unacknowledged whose log "
                "segment was dropped to make room: lost (events.on_full: drop_oldest)",
                lost,
            )

    async def _send(
        self,
        call: grpc.aio.StreamStreamCall,
        in_flight: deque[tuple[int, int]],
        receiver: asyncio.Task[None],
    ) -> None:
        loop = asyncio.get_running_loop()
        sent = self._wal.acked  # resend from the first unacknowledged record
        while True:
            if receiver.done():
                receiver.result()  # the stream ended: raise its error
                raise ConnectionError("the sidecar closed the event stream")
            if len(in_flight) >= self._max_in_flight:
                await self._wait(self._acked, receiver)
                continue
            sent = max(sent, self._wal.acked)  # records dropped meanwhile are skipped
            self._new_data.clear()
            if self._wal.last <= sent:  # nothing new: no read (a thread handoff) to find that
                await self._wait(self._new_data, receiver, timeout_s=1.0)
                continue
            records = await loop.run_in_executor(
                self._io, self._wal.read, sent, self._batch_events, _MAX_BATCH_BYTES
            )
            if not records:
                await self._wait(self._new_data, receiver, timeout_s=1.0)
                continue
            await call.write(encode_batch(records))
            sent = records[-1].sequence
            in_flight.append((sent, len(records)))

    async def _wait(
        self, event: asyncio.Event, receiver: asyncio.Task[None], timeout_s: float | None = None
    ) -> None:
        """Until ``event`` is set or the stream ends (the caller then raises its error)."""
        waiter = asyncio.ensure_future(event.wait())
        try:
            await asyncio.wait(
                {waiter, receiver}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            waiter.cancel()
        event.clear()

    async def _receive(
        self,
        call: grpc.aio.StreamStreamCall,
        in_flight: deque[tuple[int, int]],
    ) -> None:
        loop = asyncio.get_running_loop()
        async for ack in call:
            # NOTE: open once the sidecar answers, not once a write is buffered: a sidecar
            # that refuses the stream must not look connected between its refusals.
            self._set_connected(True)
            if not in_flight or ack.sequence != in_flight[0][0]:
                raise ConnectionError(
                    f"sidecar acknowledged sequence {ack.sequence}, expected "
                    f"{in_flight[0][0] if in_flight else 'none'}"
                )
            _, count = in_flight.popleft()
            await loop.run_in_executor(self._io, self._wal.ack, ack.sequence)
            self._m_acked.inc(count)
            self._acked.set()


def encode_batch(records: list[Record]) -> bytes:
    """EventBatch wire bytes: field 1 the last sequence, field 2 each stored event payload."""
    parts = [b"\x08", varint(records[-1].sequence)]
    for record in records:
        parts += (b"\x12", varint(len(record.payload)), record.payload)
    return b"".join(parts)
