"""Stage 7, durable part: a segmented, size-bounded write-ahead log of serialized events.

Layout: ``<directory>/<first sequence, 20 digits>.wal`` segments, each a run of records::

    u32 length | u32 crc32(payload) | u64 sequence | payload

Sequences rise for as long as the directory lives (by one within a segment). A segment goes
once all its records are acknowledged (``ack``), or whole at the disk bound (``drop_oldest``).
``dropped`` counts only records whose segment went before the sidecar acknowledged them: one
never sent at once, one sent only if the stream ends without its ack (an ack that comes says
the sidecar holds it: delivered, not dropped).

Opening the log recovers what a crash or a bad disk left: a torn tail is cut off, and past a
corrupt record the scan resyncs to the next whole one (CRC right, sequence the next one's): a
flipped byte loses that record only, logged and counted (``corrupt``), the segment rewritten.

The acknowledged position is kept at every ack (``gateway.events.acked``), before the segments
it covers go: a restart after a crash (SIGKILL included) resends nothing acknowledged, and
sequences go on past it.

One writer thread appends; the publisher reads and acknowledges from another. A lock guards the
segment list; readers open their own file handles and see what the writer has flushed.
"""

from __future__ import annotations

import fcntl
import logging
import os
import struct
import threading
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from gateway.events.acked import AckedPosition, FsyncPolicy, SyncClock, fsync_directory

__all__ = ["LogInUse", "Record", "WriteAheadLog"]

log = logging.getLogger(__name__)

_HEADER = struct.Struct("<IIQ")
_SUFFIX = ".wal"
_ACKED = "acked"


@dataclass(frozen=True, slots=True)
class Record:
    sequence: int
    payload: bytes


@dataclass(slots=True)
class _Segment:
    path: Path
    first: int  # sequence of its first record
    last: int  # sequence of its last record (first - 1 while empty)
    size: int  # bytes
    missing: tuple[int, ...] = ()  # sequences between first and last lost to corruption

    @property
    def records(self) -> int:
        return self.count(self.first - 1, self.last)

    def count(self, after: int, upto: int) -> int:
        """Records it holds with a sequence in (after, upto]."""
        low, high = max(after, self.first - 1), min(upto, self.last)
        if high <= low:
            return 0
        return high - low - sum(1 for m in self.missing if low < m <= high)


class WriteAheadLog:
    def __init__(
        self,
        directory: Path,
        segment_bytes: int,
        max_bytes: int,
        fsync: FsyncPolicy = "batch",
        fsync_interval_s: float = 1.0,
    ) -> None:
        self.directory = directory
        self.segment_bytes = segment_bytes
        self.max_bytes = max_bytes
        self._syncs = SyncClock(fsync, fsync_interval_s)
        self._lock = threading.Lock()
        directory.mkdir(parents=True, exist_ok=True)
        self._owner = _lock_directory(directory)
        self.corrupt = 0  # records lost to corruption when the log was opened (about: by gaps)
        self._segments: list[_Segment] = self._recover()
        self._position = AckedPosition(directory / _ACKED, fsync, fsync_interval_s)
        persisted = self._position.sequence
        if self._segments:
            first, last = self._segments[0].first, self._segments[-1].last
            self._acked = max(first - 1, min(persisted, last))
            # Past a position synced before the tail was (power lost between): its sequences
            # are not reused; the next record opens its own segment (sequences run on in one).
            self._next = max(last, persisted) + 1
            log.info(
                "event log: %d segments, %d events not yet acknowledged, recovered from %s",
                len(self._segments),
                self.unacked,
                directory,
            )
        else:
            self._acked = persisted
            self._next = persisted + 1
        tail = self._segments[-1] if self._segments else None
        self._file = tail.path.open("ab") if tail and tail.last + 1 == self._next else None
        self.dropped = 0  # records whose segment went before their ack (see drop_oldest)
        self._sent = self._acked  # the newest record read for sending since the stream began
        # Parts of dropped segments sent and not yet acknowledged: delivered if acked in time.
        self._unconfirmed: list[_Segment] = []
        # Where the last read stopped: (segment, byte offset, sequence of the record there).
        self._cursor: tuple[Path | None, int, int] = (None, 0, 0)

    # -- state -------------------------------------------------------------------------------

    @property
    def size(self) -> int:
        """Bytes on disk."""
        with self._lock:
            return sum(s.size for s in self._segments)

    @property
    def acked(self) -> int:
        """Every record up to this sequence is acknowledged (or dropped)."""
        return self._acked

    @property
    def last(self) -> int:
        """Sequence of the newest record (0 when none was ever written)."""
        return self._next - 1

    @property
    def unacked(self) -> int:
        """Records on disk not yet acknowledged."""
        with self._lock:
            return sum(s.count(self._acked, s.last) for s in self._segments)

    @property
    def unconfirmed(self) -> int:
        """Records dropped while sent, whose ack has not come yet (not counted in ``dropped``)."""
        with self._lock:
            return sum(s.records for s in self._unconfirmed)

    @property
    def overhead(self) -> int:
        """Bytes a record takes beyond its payload."""
        return _HEADER.size

    # -- writer ------------------------------------------------------------------------------

    def append(self, payloads: Iterable[bytes]) -> int:
        """Write records (one per payload) and return the last sequence; fsync per policy.

        The caller keeps the bound: it makes room (``drop_oldest``) or writes only what fits
        (``size`` and ``overhead`` against ``max_bytes``).
        """
        records = list(payloads)
        with self._lock:
            i = 0
            while i < len(records):
                if self._file is None or self._segments[-1].size >= self.segment_bytes:
                    self._roll()
                assert self._file is not None
                segment = self._segments[-1]
                # What fits the segment (the record crossing its size included) in one write.
                parts: list[bytes] = []
                size = segment.size
                while i < len(records) and size < self.segment_bytes:
                    payload = records[i]
                    parts += (_HEADER.pack(len(payload), zlib.crc32(payload), self._next), payload)
                    size += _HEADER.size + len(payload)
                    self._next += 1
                    i += 1
                self._file.write(b"".join(parts))
                segment.last = self._next - 1
                segment.size = size
            if self._file is not None:
                self._file.flush()
                self._sync(self._file.fileno())
            return self._next - 1

    def _sync(self, fd: int) -> None:
        if self._syncs.due():
            os.fsync(fd)

    def _roll(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())  # a closed segment is always whole on disk
            self._file.close()
        path = self.directory / f"{self._next:020d}{_SUFFIX}"
        self._file = path.open("ab")
        self._segments.append(_Segment(path, self._next, self._next - 1, 0))
        fsync_directory(self.directory)

    def drop_oldest(self) -> int:
        """Delete the oldest segment, acknowledged or not; returns its records never sent.

        Those are lost, counted in ``dropped`` now. Its records sent and awaiting their ack
        are not counted yet: the sidecar may hold them. Their ack coming clears them
        (``ack``); the stream ending first counts them dropped (``rewind``).
        """
        with self._lock:
            if not self._segments:
                return 0
            if len(self._segments) == 1:
                self._close_active()
            segment = self._segments.pop(0)
            segment.path.unlink(missing_ok=True)
            acked, sent = self._acked, max(self._sent, self._acked)
            if segment.count(acked, sent):
                first = max(acked, segment.first - 1) + 1
                last = min(sent, segment.last)
                self._unconfirmed.append(_Segment(segment.path, first, last, 0, segment.missing))
            lost = segment.count(sent, segment.last)
            self._acked = max(acked, segment.last)
            self.dropped += lost
            return lost

    def _close_active(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    # -- publisher ---------------------------------------------------------------------------

    def read(self, after: int, max_records: int, max_bytes: int) -> list[Record]:
        """Records with sequence > ``after``, oldest first, up to the limits (at least one).
        They count as sent (in flight) until acknowledged, or until ``rewind``.

        Reading on from where the last read stopped seeks straight there (the publisher's
        case); any other ``after`` scans its segment from the start (a reconnect).
        """
        with self._lock:
            # Copies: the writer moves `last` on; reading stops at what was flushed by then.
            segments = [
                _Segment(s.path, s.first, s.last, s.size)
                for s in self._segments
                if s.last > after and s.records > 0
            ]
        out: list[Record] = []
        size = 0
        for segment in segments:
            path, offset, following = self._cursor
            start = offset if path == segment.path and following == after + 1 else 0
            try:
                handle = segment.path.open("rb")
            except FileNotFoundError:  # dropped under us: the caller sees the gap in acked
                continue
            with handle:
                handle.seek(start)
                position = start
                for record in _scan(handle, segment.path, limit=segment.last):
                    if record.sequence > after:
                        if out and (
                            len(out) >= max_records or size + len(record.payload) > max_bytes
                        ):
                            return self._hand_out(out)
                        out.append(record)
                        size += len(record.payload)
                        after = record.sequence
                    position += _HEADER.size + len(record.payload)
                    self._cursor = (segment.path, position, record.sequence + 1)
        return self._hand_out(out)

    def _hand_out(self, records: list[Record]) -> list[Record]:
        """The records read, less any dropped meanwhile (counted, so never sent); the rest
        count as sent from here."""
        with self._lock:
            records = [r for r in records if r.sequence > self._acked]
            if records:
                self._sent = max(self._sent, records[-1].sequence)
        return records

    def ack(self, sequence: int) -> int:
        """Everything up to ``sequence`` is stored downstream: persist that, then delete the
        segments it covers. Returns the bytes freed.

        The position is on disk when this returns: a restart, even after SIGKILL, resends
        nothing up to it. Call it off the event loop (it may fdatasync).
        """
        with self._lock:
            sequence = min(sequence, self._next - 1)
            behind = sequence <= self._acked
        if not behind:
            self._position.write(sequence)  # before any deletion; outside the writer's lock
        freed = 0
        with self._lock:
            # Records dropped while in flight that this ack covers were delivered after all.
            while self._unconfirmed and self._unconfirmed[0].first <= sequence:
                if self._unconfirmed[0].last <= sequence:
                    self._unconfirmed.pop(0)
                else:
                    self._unconfirmed[0].first = sequence + 1
            if sequence <= self._acked:
                return 0
            self._acked = sequence
            while self._segments and self._segments[0].last <= self._acked:
                if len(self._segments) == 1:
                    if self._segments[0].size < self.segment_bytes and self._file is not None:
                        break  # the active segment keeps filling; deleted once it rolls
                    self._close_active()
                segment = self._segments.pop(0)
                segment.path.unlink(missing_ok=True)
                freed += segment.size
        return freed

    def rewind(self) -> int:
        """The stream ended: what was sent and not acknowledged is sent again from ``acked``.

        Records among them already dropped (``drop_oldest``) cannot be: no ack will come for
        them now, so they count as dropped. Returns how many.
        """
        with self._lock:
            lost = sum(s.records for s in self._unconfirmed)
            self._unconfirmed.clear()
            self.dropped += lost
            self._sent = self._acked
            return lost

    def close(self) -> None:
        if not self._owner.closed:
            self._position.write(self._acked, sync=True)
            self._position.close()
        with self._lock:
            if self._file is not None:
                self._file.flush()
                os.fsync(self._file.fileno())
                self._file.close()
                self._file = None
            if not self._owner.closed:
                self._owner.close()  # releases the directory's lock

    # -- recovery ----------------------------------------------------------------------------

    def _recover(self) -> list[_Segment]:
        segments: list[_Segment] = []
        for path in sorted(self.directory.glob(f"*{_SUFFIX}")):
            try:
                first = int(path.stem)
            except ValueError:
                log.warning("event log: ignoring %s (not a segment name)", path)
                continue
            data = path.read_bytes()
            records, end, skipped = _resync_scan(data, first - 1)
            size = len(data)
            missing = _missing(records) if skipped and records else ()
            if skipped:
                head = records[0].sequence - first if records else 0
                lost = head + len(missing) or 1
                self.corrupt += lost
                log.warning(
                    "event log: %s has %d bytes of corrupt records (about %d events lost) "
                    "between whole ones; %d intact records kept, the segment rewritten",
                    path,
                    skipped,
                    lost,
                    len(records),
                )
                _rewrite(path, records)
                end = _HEADER.size * len(records) + sum(len(r.payload) for r in records)
                size = end
            if end < size:
                log.warning(
                    "event log: %s has %d bytes of torn or corrupt tail after %d whole "
                    "records; cut off",
                    path,
                    size - end,
                    len(records),
                )
                with path.open("r+b") as handle:
                    handle.truncate(end)
            if not records:
                path.unlink()
                continue
            if segments and records[0].sequence <= segments[-1].last:
                log.warning("event log: %s overlaps the segment before it; skipped", path)
                continue
            # From the first record kept: one lost at the head is not waited for.
            first_kept, last_kept = records[0].sequence, records[-1].sequence
            segments.append(_Segment(path, first_kept, last_kept, end, missing))
        return segments


def _record_at(data: bytes, at: int, previous: int) -> Record | None:
    """The whole record at ``at``: its payload's CRC right and its sequence after
    ``previous`` by at most what the rest of the segment could hold; else None."""
    if at + _HEADER.size > len(data):
        return None
    length, crc, sequence = _HEADER.unpack_from(data, at)
    start = at + _HEADER.size
    if start + length > len(data):
        return None
    if not previous < sequence <= previous + 1 + (len(data) - at) // _HEADER.size:
        return None
    payload = data[start : start + length]
    if zlib.crc32(payload) != crc:
        return None
    return Record(sequence, payload)


def _resync_scan(data: bytes, previous: int) -> tuple[list[Record], int, int]:
    """A segment's whole records, resyncing past corrupt ones: (records, the end of the last
    one, bytes skipped between whole records). What follows the last whole record (a torn
    tail) is not counted as skipped."""
    records: list[Record] = []
    at = end = skipped = 0
    while at < len(data):
        found = next(
            (
                (p, record)
                for p in range(at, len(data))
                if (record := _record_at(data, p, previous)) is not None
            ),
            None,
        )
        if found is None:
            break  # nothing whole from here: a torn or corrupt tail
        skipped += found[0] - at
        at, record = found
        records.append(record)
        previous = record.sequence
        at = end = at + _HEADER.size + len(record.payload)
    return records, end, skipped


def _missing(records: list[Record]) -> tuple[int, ...]:
    """Sequences lost between the first record and the last."""
    kept = {r.sequence for r in records}
    return tuple(i for i in range(records[0].sequence, records[-1].sequence) if i not in kept)


def _rewrite(path: Path, records: list[Record]) -> None:
    """The segment again, with only ``records``: written aside, synced, then put in place."""
    aside = path.with_suffix(".rewrite")
    with aside.open("wb") as handle:
        for record in records:
            handle.write(
                _HEADER.pack(len(record.payload), zlib.crc32(record.payload), record.sequence)
            )
            handle.write(record.payload)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(aside, path)
    fsync_directory(path.parent)


def _scan(handle: object, path: Path, limit: int | None = None) -> Iterable[Record]:
    """Whole records from an open segment, stopping at the first torn or corrupt one."""
    read = handle.read  # type: ignore[attr-defined]
    while True:
        header = read(_HEADER.size)
        if len(header) < _HEADER.size:
            return
        length, crc, sequence = _HEADER.unpack(header)
        payload = read(length)
        if len(payload) < length or zlib.crc32(payload) != crc:
            return
        yield Record(sequence, payload)
        if limit is not None and sequence >= limit:
            return


class LogInUse(RuntimeError):
    """Another process (or another log in this one) writes to the directory."""


def _lock_directory(directory: Path) -> IO[bytes]:
    """Hold an exclusive lock on ``directory/.lock`` for as long as the log is open."""
    handle = (directory / ".lock").open("a+b")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise LogInUse(
            f"event log {directory} is in use by another gateway: give each gateway its own "
            "events.directory (worker processes get one each)"
        ) from None
    return handle
