"""Stage 7, delivery through a broker: publish the write-ahead log to Redis Streams.

The log stays the local buffer, exactly as with a sidecar: reads come from it, and a record is
acknowledged in it (then deleted) only once Redis has added its batch to the stream. A model's
events go to one partition, the stream ``<stream>:<crc32(model) % partitions>``, so the sidecar
that owns a partition holds each of its models' whole history.

Delivery is at least once: a batch whose XADD was answered late (a timeout, a broken
connection) is published again, and the sidecar's store keeps one row per event id. Each
partition holds at most ``max_batches`` unconsumed batches (sidecars delete what they stored);
at the bound nothing is published until they catch up, and the log keeps the rest under its
own bound and ``events.on_full``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import zlib
from collections.abc import Sequence

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway.api.v1 import events_pb2 as ev
from gateway.events.publisher import EventSink, encode_batch
from gateway.events.wal import Record, WriteAheadLog
from gateway.settings import BrokerSettings
from gateway.telemetry import GatewayMetrics

__all__ = ["BrokerPublisher", "partition"]

log = logging.getLogger(__name__)

_MAX_BATCH_BYTES = 4 * 1024 * 1024
_BACKOFF_S = (0.05, 2.0)  # first retry, cap
_FULL_WAIT_S = 0.2  # a full partition is tried again this often

# Every partition's batch, or none: a partition at its bound refuses the whole set (returns
# its 1-based index), so the log's acknowledged position stays one number.
_PUBLISH = """
local bound = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  if redis.call('XLEN', key) >= bound then return i end
end
for i, key in ipairs(KEYS) do
  redis.call('XADD', key, '*', 'b', ARGV[i + 1])
end
return 0
"""


class PartitionMismatch(Exception):
    """This gateway's partition count is not the one the broker's streams were made with."""


def partition(model: str, partitions: int) -> int:
    """A model's partition: the same in every process (crc32, not Python's salted hash)."""
    return zlib.crc32(model.encode()) % partitions if partitions > 1 else 0


class BrokerPublisher(EventSink):
    """An EventSink to Redis Streams."""

    def __init__(
        self, settings: BrokerSettings, wal: WriteAheadLog, metrics: GatewayMetrics, batch: int
    ) -> None:
        super().__init__(wal, "events-broker")
        self._settings = settings
        self._metrics = metrics
        self._batch_events = batch
        self._address = settings.address
        timeout_s = settings.timeout_ms / 1000
        self._client = aioredis.from_url(
            settings.url.get_secret_value(),
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry_on_timeout=False,
        )
        self._script = self._client.register_script(_PUBLISH)
        self._m_acked = metrics.events.labels("acked")
        self._m_full = metrics.events_broker_full
        self._failure = ""
        self._full = False
        self._checked = False  # Redis' eviction and persistence looked at (once)

    async def _release(self) -> None:
        await self._client.aclose()

    async def _run(self) -> None:
        delay_s = _BACKOFF_S[0]
        while True:
            try:
                await self._publish()
            except (RedisError, OSError, TimeoutError, PartitionMismatch) as err:
                self._log_failure(err)
            except Exception:  # never let the publisher die: the log would only grow
                log.exception("event publisher failed; retrying")
            if self.connected:  # it worked for a while: the next failure starts afresh
                delay_s = _BACKOFF_S[0]
            self._set_connected(False)
            await self._rewind()
            await asyncio.sleep(delay_s)
            delay_s = min(delay_s * 2, _BACKOFF_S[1])

    async def _publish(self) -> None:
        loop = asyncio.get_running_loop()
        await self._check_broker()
        self._set_connected(True)
        while True:
            self._new_data.clear()
            if self._wal.last <= self._wal.acked:
                await self._idle()
                continue
            records = await loop.run_in_executor(
                self._io, self._wal.read, self._wal.acked, self._batch_events, _MAX_BATCH_BYTES
            )
            if not records:
                await self._idle()
                continue
            keys, batches = self._split(records)
            while full := int(
                await self._script(keys=keys, args=[self._settings.max_batches, *batches])
            ):
                self._on_full(keys[full - 1])
                await asyncio.sleep(_FULL_WAIT_S)
            if self._full:
                self._full = False
                log.info("the broker took events again")
            await loop.run_in_executor(self._io, self._wal.ack, records[-1].sequence)
            self._m_acked.inc(len(records))
            self._acked.set()

    async def _check_broker(self) -> None:
        """Before publishing: the partition count agrees with the streams' (the first process
        to connect records it; a model's partition depends on it), and Redis keeps what it
        took (an evicting or unpersisted Redis can lose batches this log no longer holds)."""
        key = f"{self._settings.stream}:partitions"
        count = self._settings.partitions
        await self._client.set(key, count, nx=True)
        recorded = int(await self._client.get(key) or count)
        if recorded != count:
            raise PartitionMismatch(
                f"events.broker.partitions is {count}, but the broker's streams "
                f"{self._settings.stream}:* are in {recorded} partitions ({key}): every "
                "gateway and sidecar must use one count; events wait in the log"
            )
        if self._checked:
            return
        self._checked = True
        memory = await self._client.info("memory")
        persistence = await self._client.info("persistence")
        policy = memory.get("maxmemory_policy", "noeviction")
        if policy != "noeviction":
            log.error(
                "event broker %s evicts keys for room (maxmemory-policy %s): a stream of "
                "batches this log no longer holds could be evicted and lost; use a Redis with "
                "noeviction for events.broker",
                self._address,
                policy,
            )
        if not persistence.get("aof_enabled"):
            log.warning(
                "event broker %s runs without appendonly: a restart of Redis loses the "
                "batches the sidecars have not stored yet",
                self._address,
            )

    async def _idle(self) -> None:
        """Until new records; a quiet second checks the broker is still there."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                await self._new_data.wait()
                return
        await self._client.ping()

    def _split(self, records: Sequence[Record]) -> tuple[list[str], list[bytes]]:
        """Each partition's stream key and its batch of the records, in log order."""
        count = self._settings.partitions
        if count == 1:
            return [self._settings.stream_key(0)], [encode_batch(list(records))]
        parts: dict[int, list[Record]] = {}
        for record in records:
            model = ev.PredictionEvent.FromString(record.payload).model
            parts.setdefault(partition(model, count), []).append(record)
        keys = [self._settings.stream_key(p) for p in parts]
        return keys, [encode_batch(part) for part in parts.values()]

    def _on_full(self, key: str) -> None:
        self._m_full.inc()
        if not self._full:
            self._full = True
            log.warning(
                "broker stream %s holds events.broker.max_batches (%d) unconsumed batches: "
                "events wait in the log (%d now) until the sidecars catch up",
                key,
                self._settings.max_batches,
                self._wal.unacked,
            )

    async def _rewind(self) -> None:
        lost = await asyncio.get_running_loop().run_in_executor(self._io, self._wal.rewind)
        if lost:
            self._metrics.events.labels("dropped").inc(lost)
            log.warning(
                "%d events sent to the broker and unconfirmed were in a log segment dropped to "
                "make room: lost (events.on_full: drop_oldest)",
                lost,
            )

    def _log_failure(self, err: Exception) -> None:
        kind = type(err).__name__
        level = logging.WARNING if kind != self._failure else logging.DEBUG
        if isinstance(err, PartitionMismatch) and kind != self._failure:
            level = logging.ERROR
        self._failure = kind
        log.log(
            level,
            "publishing to the event broker %s failed (%s: %s); %d events wait in the log, "
            "retrying",
            self._address,
            kind,
            err,
            self._wal.unacked,
        )

    def _set_connected(self, connected: bool) -> None:
        if connected != self.connected:
            self.connected = connected
            self._metrics.events_connected.set(1 if connected else 0)
            if connected:
                self._failure = ""
                log.info("event broker %s connected", self._address)
