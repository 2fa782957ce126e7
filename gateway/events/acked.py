"""The event log's acknowledged position on disk (``<directory>/acked``): two fixed slots in
different disk blocks, ``u64 generation | u64 sequence | u32 crc32`` each, written in turn in
place (pwrite, then fdatasync as the log's ``fsync`` says). A torn write spoils only the slot it
hit; the other still holds the position before. The older one-number text file is read, and
replaced (aside, fsync, rename) by the two slots at the first write.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import time
import zlib
from pathlib import Path
from typing import Literal

__all__ = ["AckedPosition", "FsyncPolicy", "SyncClock", "fsync_directory"]

log = logging.getLogger(__name__)

FsyncPolicy = Literal["batch", "interval", "never"]
_ACK_SLOT = struct.Struct("<QQI")  # generation, sequence, crc32 of the two
# NOTE: a block apart, so that a write torn mid-block cannot spoil the other slot too.
_ACK_SLOTS = (0, 4096)


class SyncClock:
    """When an ``fsync`` policy says to sync: every time (batch), at most once an interval
    (interval), or never; the log's segments and its position file keep one each."""

    def __init__(self, policy: FsyncPolicy, interval_s: float) -> None:
        self._policy = policy
        self._interval_s = interval_s
        self._last = time.monotonic()

    def due(self, now_please: bool = False) -> bool:
        """Whether to sync now (``now_please``: unless the policy is never); if so, from now
        the interval counts again."""
        if self._policy == "never":
            return False
        now = time.monotonic()
        if not now_please and self._policy == "interval" and now - self._last < self._interval_s:
            return False
        self._last = now
        return True


class AckedPosition:
    """The acknowledged position on disk: two slots in one file, written in turn, in place.

    Its own lock: the log's writer never waits on an ack's fdatasync.
    """

    def __init__(self, path: Path, fsync: FsyncPolicy, fsync_interval_s: float) -> None:
        self._path = path
        self._syncs = SyncClock(fsync, fsync_interval_s)
        self._lock = threading.Lock()
        self._fd: int | None = None
        # What the file holds (0 and generation 0: nothing yet, or only the older text file).
        self.sequence, self._generation = _read_acked(path)

    def write(self, sequence: int, sync: bool = False) -> None:
        """Put ``sequence`` into the slot the newest position is not in, then fdatasync as
        the log's ``fsync`` policy says (``sync``: now, unless it says never)."""
        with self._lock:
            if self._fd is None and not self._generation:
                self._create(sequence)  # the first write (synced): two slots from now on
                return
            if sequence > self.sequence:
                if self._fd is None:
                    self._fd = os.open(self._path, os.O_RDWR)
                self._generation += 1
                slot = _ACK_SLOTS[self._generation % 2]
                os.pwrite(self._fd, _pack_ack(self._generation, sequence), slot)
                self.sequence = sequence
            if self._fd is not None and self._syncs.due(now_please=sync):
                os.fdatasync(self._fd)

    def _create(self, sequence: int) -> None:
        """The two-slot file, its first slot written: aside, synced, renamed in (it replaces
        the older text file whole: a crash leaves one or the other)."""
        self._generation, self.sequence = 1, sequence
        data = bytearray(_ACK_SLOTS[1] + _ACK_SLOT.size)
        offset = _ACK_SLOTS[self._generation % 2]
        data[offset : offset + _ACK_SLOT.size] = _pack_ack(self._generation, sequence)
        aside = self._path.with_suffix(".tmp")
        with aside.open("wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(aside, self._path)
        fsync_directory(self._path.parent)
        self._fd = os.open(self._path, os.O_RDWR)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


def _pack_ack(generation: int, sequence: int) -> bytes:
    head = struct.pack("<QQ", generation, sequence)
    return _ACK_SLOT.pack(generation, sequence, zlib.crc32(head))


def _read_acked(path: Path) -> tuple[int, int]:
    """The acknowledged position last persisted and its generation: the newest whole slot.

    The older text file (one decimal number) reads as generation 0, as does none at all
    (position 0); so does a file with no whole slot, which resends what is on disk.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return 0, 0
    if data.strip().isdigit() and len(data) < _ACK_SLOTS[1]:
        return int(data), 0
    slots = []
    for offset in _ACK_SLOTS:
        if len(data) >= offset + _ACK_SLOT.size:
            generation, sequence, _ = _ACK_SLOT.unpack_from(data, offset)
            if generation and data[offset : offset + _ACK_SLOT.size] == _pack_ack(
                generation, sequence
            ):
                slots.append((generation, sequence))
    if not slots:
        log.warning("event log: %s holds no whole position; resending what is on disk", path)
        return 0, 0
    generation, sequence = max(slots)
    return sequence, generation


def fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
