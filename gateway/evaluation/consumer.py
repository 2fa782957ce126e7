"""The sidecar's side of the broker: consume the partitions it owns from Redis Streams.

One consumer of a consumer group per sidecar, named the same across restarts. A read batch is
stored (one DuckDB statement, committed), then acknowledged and deleted from its stream in one
transaction. A sidecar that dies between the two reads the batch again at its next start (its
own pending entries come first), and the store's event_id key absorbs it: each event is
stored exactly once. Batches another consumer of the group read and left unacknowledged for
``claim_idle_s`` are taken over (a consumer that is gone for good).

Memory: at most ``read_batches`` batches are held, and only while fewer than
``max_pending_events`` events (shared with the gRPC streams) wait to be stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import socket
import time
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from google.protobuf.message import DecodeError  # type: ignore[import-untyped]
from redis.exceptions import RedisError, ResponseError

from gateway.api.v1 import events_pb2 as ev
from gateway.evaluation.service import EvaluationServicer
from gateway.settings import ConsumerSettings

__all__ = ["BrokerConsumer", "PartitionMismatch", "consumer_name"]

log = logging.getLogger(__name__)

_BLOCK_MS = 1000  # a read waits this long for new batches
_BACKOFF_S = (0.05, 2.0)
Entry = tuple[str, bytes, dict[bytes, bytes] | None]  # stream key, entry id, fields


class PartitionMismatch(Exception):
    """This sidecar's partition count is not the one the broker's streams were made with."""


def consumer_name(store: Path) -> str:
    """This sidecar in the group: its host and store, so a restart resumes its own reads."""
    digest = hashlib.sha256(str(store.resolve()).encode()).hexdigest()[:12]
    return f"{socket.gethostname()[:64]}:{digest}"


class BrokerConsumer:
    def __init__(
        self, servicer: EvaluationServicer, settings: ConsumerSettings, store: Path
    ) -> None:
        self._servicer = servicer
        self._settings = settings
        self._metrics = servicer.metrics
        self.name = settings.consumer or consumer_name(store)
        owned = settings.own if settings.own is not None else range(settings.partitions)
        self.keys = [settings.stream_key(p) for p in owned]
        timeout_s = settings.timeout_ms / 1000
        self._client = aioredis.from_url(
            settings.url.get_secret_value(),
            socket_timeout=timeout_s + _BLOCK_MS / 1000,  # a blocking read is no timeout
            socket_connect_timeout=timeout_s,
            retry_on_timeout=False,
        )
        self._failure = ""
        self._claimed_at = 0.0
        self._measured_at = 0.0
        self._consumed = False  # a batch stored since the last failure

    async def run(self) -> None:
        """Until cancelled: a broken broker, or a batch the store could not take (DuckDB out
        of memory, say), is retried with backoff, never fatal; what was read and not stored
        stays pending in Redis and is read again."""
        delay_s = _BACKOFF_S[0]
        try:
            while True:
                try:
                    await self._consume()
                except (RedisError, OSError, TimeoutError) as err:
                    self._set_connected(False, err)
                except Exception as err:  # never let the consumer die: the streams would fill
                    if type(err).__name__ != self._failure and not isinstance(
                        err, PartitionMismatch
                    ):
                        log.exception("consuming the event broker failed; retrying")
                    self._set_connected(False, err)
                if self._consumed:  # it worked for a while: the next failure starts afresh
                    self._consumed = False
                    delay_s = _BACKOFF_S[0]
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, _BACKOFF_S[1])
        finally:
            await self._client.aclose()

    async def _consume(self) -> None:
        await self._check_partitions()
        for key in self.keys:
            with contextlib.suppress(ResponseError):  # BUSYGROUP: made before
                await self._client.xgroup_create(key, self._settings.group, id="0", mkstream=True)
        self._set_connected(True)
        # What this consumer read before it stopped, first: it may not be stored yet.
        while entries := await self._read("0", block=False):
            await self._store(entries)
        while True:
            now = time.monotonic()
            if now >= self._claimed_at + self._settings.claim_idle_s / 2:
                self._claimed_at = now
                await self._claim()
            if now >= self._measured_at + 1.0:
                self._measured_at = now
                await self._measure()
            entries = await self._read(">", block=True)
            if entries:
                await self._store(entries)

    async def _measure(self) -> None:
        """The batches waiting in the owned partitions (read or not), for the backlog gauge."""
        async with self._client.pipeline(transaction=False) as pipe:
            for key in self.keys:
                _ = pipe.xlen(key)  # queued
            lengths = await pipe.execute()
        self._metrics.broker_backlog.set(sum(int(n) for n in lengths))

    async def _check_partitions(self) -> None:
        """Gateways and sidecars must agree on the partition count (a model's partition
        depends on it): the first to connect records it, the others compare."""
        key = f"{self._settings.stream}:partitions"
        count = self._settings.partitions
        await self._client.set(key, count, nx=True)
        recorded = int(await self._client.get(key) or count)
        if recorded != count:
            raise PartitionMismatch(
                f"evaluation.broker.partitions is {count}, but the broker's streams "
                f"{self._settings.stream}:* are in {recorded} partitions ({key}): every "
                "gateway and sidecar must use one count"
            )

    async def _read(self, start: str, *, block: bool) -> list[Entry]:
        streams: dict[Any, Any] = dict.fromkeys(self.keys, start)
        reply: Any = await self._client.xreadgroup(
            self._settings.group,
            self.name,
            streams,
            # NOTE: COUNT applies to each stream: the read stays within read_batches in all.
            count=max(1, self._settings.read_batches // len(self.keys)),
            block=_BLOCK_MS if block else None,
        )
        return [
            (_text(key), entry_id, fields or None)
            for key, entries in reply or []
            for entry_id, fields in entries
        ]

    async def _claim(self) -> None:
        """Take over what other consumers read and left unacknowledged for claim_idle_s."""
        idle_ms = int(self._settings.claim_idle_s * 1000)
        for key in self.keys:
            start: Any = "0-0"
            while True:
                reply = await self._client.xautoclaim(
                    key,
                    self._settings.group,
                    self.name,
                    idle_ms,
                    start_id=start,
                    count=max(1, self._settings.read_batches // len(self.keys)),
                )
                start, claimed = reply[0], reply[1]
                if claimed:
                    self._metrics.broker_claimed.inc(len(claimed))
                    log.warning(
                        "took over %d batches of %s another consumer of group %s left "
                        "unacknowledged for %g s",
                        len(claimed),
                        key,
                        self._settings.group,
                        self._settings.claim_idle_s,
                    )
                    await self._store([(key, i, f or None) for i, f in claimed])
                if _text(start) == "0-0":
                    break

    async def _store(self, entries: list[Entry]) -> None:
        """Store the entries' events in one statement, then acknowledge and delete them."""
        events: list[ev.PredictionEvent] = []
        batches = 0
        for key, entry_id, fields in entries:
            batch = fields.get(b"b") if fields else None
            if batch is None:  # deleted before it was acknowledged: nothing left to store
                continue
            try:
                events.extend(ev.EventBatch.FromString(batch).events)
                batches += 1
            except DecodeError:
                self._metrics.broker_batches.labels("malformed").inc()
                log.error(
                    "broker entry %s of %s is no EventBatch: acknowledged and skipped",
                    _text(entry_id),
                    key,
                )
        if events:
            await self._servicer.hold(len(events))
            try:
                await self._servicer.ingest(events)
            finally:
                self._servicer.release(len(events))
        by_key: dict[str, list[bytes]] = {}
        for key, entry_id, _fields in entries:
            by_key.setdefault(key, []).append(entry_id)
        async with self._client.pipeline(transaction=True) as pipe:
            for key, ids in by_key.items():
                _ = pipe.xack(key, self._settings.group, *ids)  # queued
                _ = pipe.xdel(key, *ids)
            await pipe.execute()
        self._metrics.broker_batches.labels("stored").inc(batches)
        self._consumed = True

    def _set_connected(self, connected: bool, err: Exception | None = None) -> None:
        self._metrics.broker_connected.set(1 if connected else 0)
        if connected:
            if self._failure:
                log.info("event broker %s consumed again", self._settings.address)
            self._failure = ""
            return
        kind = type(err).__name__
        log.log(
            logging.ERROR
            if isinstance(err, PartitionMismatch) and kind != self._failure
            else logging.WARNING
            if kind != self._failure
            else logging.DEBUG,
            "consuming the event broker %s failed (%s: %s); retrying",
            self._settings.address,
            kind,
            err,
        )
        self._failure = kind


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
