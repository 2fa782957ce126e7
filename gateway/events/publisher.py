"""Stage 7, delivery: stream the write-ahead log to the sidecar; delete what it acknowledges.

Reads always come from the log, never from memory, so a reconnect, a sidecar restart or a
gateway restart all resume the same way: from the first unacknowledged record. Batches are
sent as encoded EventBatch bytes built from the stored event payloads (no parse, no re-encode).
At most ``max_in_flight`` batches wait for their Ack; acks come back in order on one stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import grpc

from gateway.api.v1 import events_pb2 as ev
from gateway.events.wal import Record, WriteAheadLog
from gateway.telemetry import GatewayMetrics
from gateway.wire import varint

__all__ = ["Publisher", "encode_batch"]

log = logging.getLogger(__name__)

PUBLISH_METHOD = "/gateway.v1.EvaluationService/Publish"
_MAX_BATCH_BYTES = 4 * 1024 * 1024
_BACKOFF_S = (0.05, 2.0)  # first retry, cap


class Publisher:
    def __init__(
        self,
        address: str,
        wal: WriteAheadLog,
        metrics: GatewayMetrics,
        batch_events: int,
        max_in_flight: int,
        max_message_bytes: int,
    ) -> None:
        self._address = address
        self._wal = wal
        self._metrics = metrics
        self._m_acked = metrics.events.labels("acked")
        self._batch_events = batch_events
        self._max_in_flight = max_in_flight
        self._max_message_bytes = max_message_bytes
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="events-io")
        self._new_data = asyncio.Event()
        self._acked = asyncio.Event()  # set on every ack: waiters re-check what they need
        self._task: asyncio.Task[None] | None = None
        self.connected = False

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="events-publisher")

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
        self._io.shutdown(wait=True)

    async def _run(self) -> None:
        delay_s = _BACKOFF_S[0]
        failures = 0
        while True:
            try:
                await self._session()
            # InvalidStateError: a write on a call the sidecar already ended (it went away).
            except (
                grpc.aio.AioRpcError,
                asyncio.InvalidStateError,
                ConnectionError,
                OSError,
            ) as err:
                failures += 1
                detail = err.details() if isinstance(err, grpc.aio.AioRpcError) else str(err)
                # First failure loudly, then quietly while it lasts: no log flood.
                level = logging.WARNING if failures == 1 else logging.DEBUG
                log.log(
                    level,
                    "event stream to sidecar %s broken (%s); %d events wait in the log, retrying",
                    self._address,
                    detail,
                    self._wal.unacked,
                )
            except Exception:  # never let the publisher die: the log would only grow
                failures += 1
                log.exception("event publisher failed; retrying")
            else:
                failures = 0
            self._set_connected(False)
            await asyncio.sleep(delay_s)
            delay_s = min(delay_s * 2, _BACKOFF_S[1]) if failures else _BACKOFF_S[0]

    def _set_connected(self, connected: bool) -> None:
        if connected != self.connected:
            self.connected = connected
            self._metrics.events_connected.set(1 if connected else 0)
            if connected:
                log.info("event stream to sidecar %s open", self._address)

    async def _session(self) -> None:
        limit = 2 * self._max_message_bytes + _MAX_BATCH_BYTES
        options = [("grpc.max_send_message_length", limit)]
        async with grpc.aio.insecure_channel(self._address, options=options) as channel:
            call = channel.stream_stream(
                PUBLISH_METHOD,
                request_serializer=None,  # bytes: the batch is encoded by encode_batch
                response_deserializer=ev.Ack.FromString,
            )()
            in_flight: deque[tuple[int, int]] = deque()  # (last sequence, events)
            receiver = asyncio.get_running_loop().create_task(self._receive(call, in_flight))
            try:
                await self._send(call, in_flight, receiver)
            finally:
                receiver.cancel()
                with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                    await receiver
                call.cancel()
                await self._rewind()

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
            self._set_connected(True)
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
