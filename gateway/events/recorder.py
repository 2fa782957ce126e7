"""Stage 7, intake: every answered prediction -> a bounded queue -> the write-ahead log.

``record`` is all the request path pays: an append to an in-memory queue. A background task
takes batches from it and, on the writer thread, builds the events, serializes them and
appends them to the log; the publisher streams the log to the sidecar (or publishes it to
the broker: ``events.sink``).

Bounds: the queue (events and the request bytes they hold) and the log on disk. At a bound,
``on_full: shed`` refuses new predictions (``admit`` raises EventLogFull, UNAVAILABLE) until
the sidecar catches up; ``on_full: drop_oldest`` deletes the oldest unacknowledged events.
Either way it is counted (``gateway_events_total{outcome}``) and logged. ``dropped`` counts
only events the sidecar never acknowledged: one deleted while sent and awaiting its ack counts
only if the ack never comes (``WriteAheadLog.drop_oldest``).

The key that hashes sensitive feature values (``hash_key``) never sits beside the log: whoever
reads the log could try every value of a small vocabulary against its hashes.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import secrets
import tempfile
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from gateway.errors import EventLogFull, SettingsError
from gateway.events._encoder import encode_event
from gateway.events.broker import BrokerPublisher
from gateway.events.builder import Pending, Redact
from gateway.events.publisher import EventSink, Publisher
from gateway.events.wal import LogInUse, WriteAheadLog
from gateway.settings import EventsSettings, read_secret
from gateway.telemetry import GatewayMetrics

__all__ = ["EventRecorder", "default_hash_key_file", "hash_key"]

log = logging.getLogger(__name__)

_SLICE = 32  # events encoded between two turns of the loop
_OLD_KEY_FILE = "hash.key"  # where versions before kept the hash key: inside events.directory
_KEY_BYTES = 32  # a new key's random bytes
_MIN_KEY_BYTES = 16  # shorter: guessable by trying keys against one known value's hash
_MAX_KEY_BYTES = 64  # blake2b's bound: features.redact uses no more of a key


class EventRecorder:
    """Create and use inside the running loop: ``await start()``, then ``record`` per answer."""

    def __init__(
        self,
        settings: EventsSettings,
        metrics: GatewayMetrics,
        redact: Redact,
        max_message_bytes: int,
    ) -> None:
        assert settings.enabled, "events are off without a sidecar address or the broker"
        self.settings = settings
        self._metrics = metrics
        self._redact = redact
        self._max_message_bytes = max_message_bytes
        self._pending: deque[Pending] = deque()
        self._pending_bytes = 0
        self._writing = 0  # events taken from _pending that the log does not hold yet
        self._disk_full = False
        self._full_size = 0  # log size when it was last found full
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="events-writer")
        self._wake = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        # Event ids: unique per run (a random prefix) and per event; a resend keeps its id.
        self._run_id = secrets.token_hex(6)
        self._events = itertools.count(1)
        self._requests = itertools.count(1)
        self._wal: WriteAheadLog | None = None
        self._publisher: EventSink | None = None
        self._hash_key = b""
        self._m_recorded = metrics.events.labels("recorded")
        self._m_written = metrics.events.labels("written")
        self._m_dropped = metrics.events.labels("dropped")
        self._m_shed = metrics.events.labels("shed")

    async def start(self) -> None:
        s = self.settings
        # NOTE: before the log is opened: a refused key leaves nothing behind.
        self._hash_key = await asyncio.to_thread(hash_key, s)
        token = await asyncio.to_thread(read_secret, s.token, s.token_file, "events.token_file")
        try:
            self._wal = await asyncio.to_thread(
                WriteAheadLog,
                s.directory,
                s.segment_bytes,
                s.max_disk_bytes,
                s.fsync,
                s.fsync_interval_ms / 1000,
            )
        except LogInUse as err:
            raise SettingsError(f"events.directory: {err}") from None
        if self._wal.corrupt:  # lost to a bad disk before this start: counted, and logged
            self._metrics.events.labels("corrupt").inc(self._wal.corrupt)
        if s.sink == "broker":
            self._publisher = BrokerPublisher(s.broker, self._wal, self._metrics, s.batch_events)
        else:
            assert s.sidecar is not None
            self._publisher = Publisher(
                s.sidecar,
                self._wal,
                self._metrics,
                s.batch_events,
                s.max_in_flight_batches,
                self._max_message_bytes,
                tls=s.tls,
                token=token,
            )
        wal = self._wal
        self._metrics.events_backlog.labels("memory").set_function(
            lambda: len(self._pending) + self._writing
        )
        self._metrics.events_backlog.labels("disk").set_function(lambda: wal.unacked)
        self._metrics.events_log_bytes.set_function(lambda: wal.size)
        self._publisher.start()
        self._task = asyncio.get_running_loop().create_task(self._flush(), name="events-writer")
        if wal.unacked:
            self._publisher.notify()

    # -- the request path --------------------------------------------------------------------

    def admit(self) -> None:
        """Refuse a prediction whose event could not be kept (on_full: shed)."""
        if self.settings.on_full != "shed":
            return
        if (
            self._disk_full
            or len(self._pending) >= self.settings.max_pending
            or self._pending_bytes >= self.settings.max_pending_bytes
        ):
            self._m_shed.inc()
            where = "on disk" if self._disk_full else "in memory"
            raise EventLogFull(
                f"prediction events are at their bound {where} ("
                f"{self.settings.destination} has not acknowledged "
                f"{len(self._pending) + (self._wal.unacked if self._wal else 0)} events); "
                "predictions are refused until it catches up (events.on_full: shed)"
            )

    def request_id(self) -> str:
        """An id for a request that came without one (returned to the client)."""
        return f"{self._run_id}-r{next(self._requests)}"

    def record(self, pending: Pending) -> None:
        self._pending.append(pending)
        self._pending_bytes += pending.nbytes
        self._m_recorded.inc()
        if self.settings.on_full == "drop_oldest":
            dropped = 0
            while len(self._pending) > 1 and (
                len(self._pending) > self.settings.max_pending
                or self._pending_bytes > self.settings.max_pending_bytes
            ):
                self._pending_bytes -= self._pending.popleft().nbytes
                dropped += 1
            if dropped:
                self._count_dropped(dropped, "in memory")
        if len(self._pending) >= self.settings.batch_events:
            self._wake.set()

    # -- background --------------------------------------------------------------------------

    async def _flush(self) -> None:
        interval_s = self.settings.flush_interval_ms / 1000
        while not self._closing:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval_s):
                    await self._wake.wait()
            self._wake.clear()
            await self._write_pending()

    async def _write_pending(self, everything: bool = False) -> None:
        while self._pending:
            count = min(len(self._pending), self.settings.batch_events)
            # NOTE: the batch counts in the memory backlog from before it leaves the queue
            # until the log holds it or it is back in the queue: a scrape (on the metrics
            # server's thread too) in between saw it nowhere. Counted twice for a moment
            # rather than not at all.
            self._writing = count
            try:
                if not await self._write_batch(count):
                    return
            finally:
                self._writing = 0
            if not everything and len(self._pending) < self.settings.batch_events:
                return

    async def _write_batch(self, count: int) -> bool:
        """The next ``count`` events from the queue into the log; False when the log is full
        (what did not fit is back at the head of the queue)."""
        batch = [self._pending.popleft() for _ in range(count)]
        self._pending_bytes -= sum(p.nbytes for p in batch)
        wal = self._wal
        assert wal is not None
        if self._disk_full and wal.size >= self._full_size:
            written = 0  # nothing acknowledged since the log was full: no room yet
        else:
            # NOTE: built here, on the loop, not on the writer thread: the work is the same,
            # but a second thread running Python would take the GIL from the loop in
            # switch-interval slices. The thread does the file work, GIL released.
            written = await asyncio.get_running_loop().run_in_executor(
                self._writer, self._store, await self._serialize(batch)
            )
        if written:
            assert self._publisher is not None
            self._publisher.notify()
        if written < len(batch):  # shed: the log is full; keep the rest, wait for acks
            rest = batch[written:]
            self._pending.extendleft(reversed(rest))
            self._pending_bytes += sum(p.nbytes for p in rest)
            return False
        return True

    async def _serialize(self, batch: list[Pending]) -> list[bytes]:
        """The batch's events, encoded a slice at a time: requests get the loop between
        slices (a whole batch at once held it for tens of milliseconds, a p99 of its own)."""
        max_columns = self.settings.max_columns
        payloads: list[bytes] = []
        for start in range(0, len(batch), _SLICE):
            if start:
                await asyncio.sleep(0)
            payloads += [
                encode_event(
                    pending=p,
                    event_id=f"{self._run_id}-{next(self._events)}",
                    hash_key=self._hash_key,
                    redact=self._redact,
                    max_columns=max_columns,
                )
                for p in batch[start : start + _SLICE]
            ]
        return payloads

    def _store(self, payloads: list[bytes]) -> int:
        """On the writer thread: append serialized events; returns how many.

        With ``on_full: shed`` that is the part of the batch the log has room for; with
        ``drop_oldest`` the oldest segments make room for all of it.
        """
        wal = self._wal
        assert wal is not None
        s = self.settings
        total = len(payloads)
        if s.on_full == "shed":
            room = wal.max_bytes - wal.size
            taken = 0
            for payload in payloads:
                room -= len(payload) + wal.overhead
                if room < 0 and (taken or wal.size):  # one event bigger than all: let it in
                    break
                taken += 1
            payloads = payloads[:taken]
            if taken < total:
                if not self._disk_full:
                    log.warning(
                        "event log at its bound (%d bytes, events.max_disk_bytes %d): "
                        "refusing new predictions until the sidecar acknowledges more",
                        wal.size,
                        wal.max_bytes,
                    )
                self._disk_full = True
        else:
            size = sum(len(p) + wal.overhead for p in payloads)
            while wal.size + size > wal.max_bytes and wal.size:
                lost = wal.drop_oldest()
                if lost:
                    self._count_dropped(lost, "on disk")
        if payloads:
            wal.append(payloads)
            self._m_written.inc(len(payloads))
        self._full_size = wal.size
        if len(payloads) == total:
            self._disk_full = False
        return len(payloads)

    def _count_dropped(self, count: int, where: str) -> None:
        self._m_dropped.inc(count)
        log.warning(
            "event log full: dropped the %d oldest unacknowledged events %s "
            "(events.on_full: drop_oldest)",
            count,
            where,
        )

    async def close(self, grace_s: float) -> None:
        """Write what is pending, give the sidecar ``grace_s`` to take it, then stop.

        What it does not acknowledge stays in the log and is sent after the next start.
        """
        if self._task is not None:
            # NOTE: not cancelled: a write cut at its await would leave its batch landing in
            # the log after the drain below had already looked, unsent until the next start.
            self._closing = True
            self._wake.set()
            await self._task
            self._task = None
        if self._wal is None or self._publisher is None:
            return
        await self._write_pending(everything=True)
        if self._pending:
            self._m_dropped.inc(len(self._pending))
            log.error(
                "stopping with %d prediction events that do not fit the full event log: lost",
                len(self._pending),
            )
        if not await self._publisher.drained(grace_s):
            log.warning(
                "stopping with %d events not yet acknowledged by %s; they stay in "
                "%s and are sent after the next start",
                self._wal.unacked,
                self.settings.destination,
                self.settings.directory,
            )
        await self._publisher.close()
        await asyncio.get_running_loop().run_in_executor(self._writer, self._wal.close)
        self._writer.shutdown(wait=True)


def hash_key(settings: EventsSettings) -> bytes:
    """The key of the hash that stands in for sensitive feature values.

    ``events.hash_key`` (its UTF-8 bytes) wins; else the bytes of ``events.hash_key_file``,
    which must exist; else those of ``default_hash_key_file()``, made with 32 random bytes on
    first use. A file's key is its raw bytes, as they are (a trailing newline is part of it):
    the files this makes, and the ``hash.key`` of older versions, hold random bytes, not text.

    SettingsError, naming ``events.hash_key_file``, when the file lies inside
    ``events.directory`` (links resolved) or group or others may open it.
    """
    if settings.hash_key is not None:
        where = "events.hash_key"
        key = settings.hash_key.get_secret_value().encode()
        if not key:
            raise SettingsError(f"{where} is empty: set a key, or unset it to use a key file")
    else:
        path = settings.hash_key_file or default_hash_key_file()
        where = f"events.hash_key_file ({path})"
        key = _file_key(path, settings.directory, make=settings.hash_key_file is None)
    if len(key) < _MIN_KEY_BYTES:
        log.warning(
            "%s: a %d-byte key can be found by trying keys against a hash; use %d random bytes",
            where,
            len(key),
            _KEY_BYTES,
        )
    elif len(key) > _MAX_KEY_BYTES:
        log.warning("%s: only the first %d bytes of the key are used", where, _MAX_KEY_BYTES)
    _warn_old_key(settings)
    return key


def default_hash_key_file() -> Path:
    """$XDG_STATE_HOME/gateway/hash.key (~/.local/state/gateway/hash.key when unset)."""
    state = os.environ.get("XDG_STATE_HOME", "")
    # NOTE: the XDG spec says a relative XDG_STATE_HOME is invalid and is to be ignored.
    root = Path(state) if os.path.isabs(state) else Path.home() / ".local" / "state"
    return root / "gateway" / "hash.key"


def _file_key(path: Path, log_directory: Path, make: bool) -> bytes:
    where = "events.hash_key_file"
    try:
        inside = path.resolve().is_relative_to(Path(log_directory).resolve())
    except (OSError, RuntimeError) as err:  # RuntimeError: a loop of links
        raise SettingsError(f"{where}: cannot resolve {path}: {err}") from None
    if inside:
        raise SettingsError(
            f"{where}: {path} is inside events.directory ({log_directory}): whoever reads the "
            f"log would find the key beside it; keep the key file elsewhere (the default is "
            f"{default_hash_key_file()})"
        )
    try:
        try:
            mode = path.stat().st_mode
        except FileNotFoundError:
            if not make:
                raise SettingsError(
                    f"{where}: {path} does not exist; to make a key: "
                    f"(umask 077; head -c {_KEY_BYTES} /dev/urandom > {path})"
                ) from None
            try:
                made = _make_key(path)
            except OSError as err:
                raise SettingsError(f"{where}: cannot make {path}: {err.strerror}") from None
            if made is not None:
                return made
            mode = path.stat().st_mode  # another process made it first: use its key
        if mode & 0o077:
            raise SettingsError(
                f"{where}: {path} has mode {mode & 0o777:04o}: group or others may open it; "
                f"chmod 600 {path}"
            )
        key = path.read_bytes()
    except OSError as err:
        raise SettingsError(f"{where}: cannot read {path}: {err.strerror}") from None
    if not key:
        raise SettingsError(f"{where}: {path} is empty")
    return key


def _make_key(path: Path) -> bytes | None:
    """A new random key in ``path`` (directory 0700, file 0600); None when another process
    made it first.

    NOTE: written whole to a private file, then linked to ``path``: a link, like O_EXCL, fails
    when the name exists, and a racing gateway never reads a key half written. Workers starting
    together all end up with the one key that won.
    """
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = secrets.token_bytes(_KEY_BYTES)
    fd, partial = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # mode 0600
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(key)
            handle.flush()
            os.fsync(handle.fileno())
        os.link(partial, path)
    except FileExistsError:
        return None
    finally:
        os.unlink(partial)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    log.info("events: a new key for hashing sensitive feature values, in %s", path)
    return key


def _warn_old_key(settings: EventsSettings) -> None:
    old = Path(settings.directory) / _OLD_KEY_FILE
    if not old.is_file():
        return
    target = settings.hash_key_file or default_hash_key_file()
    instead = "events.hash_key" if settings.hash_key is not None else str(target)
    log.warning(
        "%s is the hash key an older version kept beside the event log; it is no longer used "
        "(the key is %s now), so sensitive values hash differently from the events it made. "
        "To keep the same hashes, move it to events.hash_key_file: mv %s %s%s; else delete it",
        old,
        instead,
        old,
        target,
        " and unset events.hash_key" if settings.hash_key is not None else "",
    )
