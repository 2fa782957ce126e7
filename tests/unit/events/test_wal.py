"""The event write-ahead log on a real directory: segments, acks, bounds and crash recovery."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gateway.events.publisher import encode_batch
from gateway.events.wal import WriteAheadLog


def payloads(count: int, start: int = 0, size: int = 100) -> list[bytes]:
    return [f"event-{i:06d}".encode().ljust(size, b".") for i in range(start, start + count)]


@pytest.fixture
def open_log() -> Iterator[Callable[..., WriteAheadLog]]:
    """Open logs (1000-byte segments unless told); every one is closed at teardown."""
    opened: list[WriteAheadLog] = []

    def open_(path: Path, **kw: object) -> WriteAheadLog:
        options = {"segment_bytes": 1000, "max_bytes": 100_000, "fsync": "batch"} | kw
        wal = WriteAheadLog(path, **options)  # type: ignore[arg-type]
        opened.append(wal)
        return wal

    yield open_
    for wal in opened:
        wal.close()


def test_records_come_back_in_order_with_rising_sequences(open_log, tmp_path: Path):
    wal = open_log(tmp_path)
    assert wal.append(payloads(25)) == 25
    records = wal.read(after=0, max_records=100, max_bytes=1 << 20)
    assert [r.sequence for r in records] == list(range(1, 26))
    assert [r.payload for r in records] == payloads(25)
    assert len(list(tmp_path.glob("*.wal"))) == 3  # 116-byte records: 9 per 1000-byte segment
    assert wal.read(after=20, max_records=100, max_bytes=1 << 20)[0].sequence == 21
    assert len(wal.read(after=0, max_records=7, max_bytes=1 << 20)) == 7
    assert len(wal.read(after=0, max_records=100, max_bytes=250)) == 2


def test_acknowledged_segments_are_deleted_and_the_active_one_is_kept(open_log, tmp_path: Path):
    wal = open_log(tmp_path)
    wal.append(payloads(25))
    before = wal.size
    freed = wal.ack(17)  # segments hold 1-9, 10-18, 19-25: only the first is wholly acked
    assert freed > 0 and wal.size == before - freed
    assert wal.unacked == 8 and wal.acked == 17
    assert len(list(tmp_path.glob("*.wal"))) == 2
    wal.ack(25)
    assert wal.unacked == 0
    assert wal.read(after=wal.acked, max_records=10, max_bytes=1 << 20) == []


def test_reopening_resumes_the_sequence_and_resends_what_was_not_acked(open_log, tmp_path: Path):
    wal = open_log(tmp_path)
    wal.append(payloads(25))
    wal.ack(9)
    wal.close()
    again = open_log(tmp_path)
    assert again.unacked == 16
    records = again.read(after=again.acked, max_records=100, max_bytes=1 << 20)
    assert [r.sequence for r in records] == list(range(10, 26))
    assert again.append(payloads(1, start=99)) == 26


@pytest.mark.parametrize("cut", [1, 10, 50])
def test_a_torn_tail_is_cut_off_at_the_last_whole_record(open_log, tmp_path: Path, cut: int):
    wal = open_log(tmp_path, segment_bytes=1 << 20)
    wal.append(payloads(5))
    wal.close()
    (segment,) = tmp_path.glob("*.wal")
    data = segment.read_bytes()
    segment.write_bytes(data[:-cut])  # a crash in the middle of the last record
    again = open_log(tmp_path, segment_bytes=1 << 20)
    records = again.read(after=0, max_records=100, max_bytes=1 << 20)
    assert [r.payload for r in records] == payloads(4)
    assert again.append(payloads(1, start=7)) == 5  # the lost record's sequence is reused
    assert segment.stat().st_size == len(data)


@pytest.mark.parametrize(
    ("where", "lost"),
    [
        (0 * 116 + 20, 1),  # the first record's payload
        (3 * 116 + 20, 4),  # a record's payload in the middle
        (3 * 116 + 2, 4),  # a record's length field: the scan resyncs byte by byte
        (5 * 116 + 8, 6),  # a record's sequence field
        (9 * 116 + 50, 10),  # the last record: a corrupt tail, cut off
    ],
)
def test_a_corrupt_record_loses_only_itself(open_log, tmp_path: Path, caplog, where, lost):
    wal = open_log(tmp_path, segment_bytes=1 << 20)
    wal.append(payloads(10))
    wal.close()
    (segment,) = tmp_path.glob("*.wal")
    data = bytearray(segment.read_bytes())
    data[where] ^= 0xFF  # one flipped byte
    segment.write_bytes(bytes(data))
    again = open_log(tmp_path, segment_bytes=1 << 20)
    kept = [i for i in range(1, 11) if i != lost]
    records = again.read(0, 100, 1 << 20)
    assert [r.sequence for r in records] == kept
    assert [r.payload for r in records] == [payloads(10)[i - 1] for i in kept]
    assert again.corrupt == (0 if lost == 10 else 1)  # a bad last record is a torn tail
    assert again.unacked == 9  # the lost record is not waited for
    assert segment.stat().st_size == 9 * 116  # rewritten (or cut) to the intact records
    # The log goes on: acks, appends and a reopening see the same records.
    assert again.append(payloads(1, start=50)) == (10 if lost == 10 else 11)
    again.close()
    third = open_log(tmp_path, segment_bytes=1 << 20)
    assert third.corrupt == 0
    assert [r.sequence for r in third.read(0, 100, 1 << 20)][: len(kept)] == kept


def test_drop_oldest_deletes_a_whole_segment_and_counts_what_was_unacked(open_log, tmp_path: Path):
    wal = open_log(tmp_path)
    wal.append(payloads(25))
    wal.ack(4)
    assert wal.drop_oldest() == 5  # records 5-9 of the first segment
    assert wal.dropped == 5 and wal.acked == 9
    assert wal.read(after=wal.acked, max_records=1, max_bytes=1 << 20)[0].sequence == 10
    assert wal.size == 16 * 116  # records 10-25 are left


@pytest.mark.parametrize(
    ("acks", "stream_ends", "dropped"),
    [
        ((4, 6), False, 3),  # every record sent is acknowledged: only the unsent were lost
        ((4, 6), True, 3),  # ... and the stream ending afterwards changes nothing
        ((4,), True, 3 + 2),  # 5 and 6 never acknowledged: lost once the stream ends
        ((), True, 3 + 4),
        ((), False, 3),  # still awaiting their ack: not (yet) counted
    ],
)
def test_drop_oldest_counts_only_records_the_sidecar_never_acknowledged(
    open_log, tmp_path: Path, acks: tuple[int, ...], stream_ends: bool, dropped: int
):
    """Segment 1-9 dropped with 1-2 acknowledged, 3-6 sent (two batches in flight) and
    7-9 never sent."""
    wal = open_log(tmp_path)
    wal.append(payloads(25))
    wal.ack(2)
    assert [r.sequence for r in wal.read(2, 2, 1 << 20)] == [3, 4]
    assert [r.sequence for r in wal.read(4, 2, 1 << 20)] == [5, 6]
    assert wal.drop_oldest() == 3  # 7, 8 and 9: lost for sure
    assert (wal.dropped, wal.unconfirmed, wal.acked) == (3, 4, 9)
    for sequence in acks:
        wal.ack(sequence)
    if stream_ends:
        wal.rewind()
    assert wal.dropped == dropped
    assert wal.unconfirmed == (0 if stream_ends else 4 - 2 * len(acks))
    assert wal.read(wal.acked, 100, 1 << 20)[0].sequence == 10  # never sent again


def test_a_read_from_before_a_drop_starts_after_it_and_what_it_hands_out_counts_as_sent(
    open_log, tmp_path: Path
):
    """A reconnect reads from an older position than a drop left: it gets only what is left,
    and those records, dropped in turn before their ack, wait for it rather than count."""
    wal = open_log(tmp_path)
    wal.append(payloads(25))
    wal.drop_oldest()
    assert wal.dropped == 9
    assert [r.sequence for r in wal.read(0, 3, 1 << 20)] == [10, 11, 12]
    wal.drop_oldest()  # 10-12 sent: unconfirmed; 13-18 never sent
    assert (wal.dropped, wal.unconfirmed) == (15, 3)
    wal.ack(12)
    assert (wal.dropped, wal.unconfirmed, wal.unacked) == (15, 0, 7)


def test_an_empty_log_starts_at_one_and_reads_nothing(open_log, tmp_path: Path):
    wal = open_log(tmp_path)
    assert (wal.last, wal.acked, wal.unacked, wal.size) == (0, 0, 0, 0)
    assert wal.read(after=0, max_records=10, max_bytes=100) == []


def test_a_batch_on_the_wire_is_an_event_batch():
    from gateway.api.v1 import events_pb2 as ev
    from gateway.events.wal import Record

    events = [ev.PredictionEvent(event_id=f"e{i}", rows=i) for i in range(3)]
    records = [Record(300 + i, e.SerializeToString()) for i, e in enumerate(events)]
    batch = ev.EventBatch.FromString(encode_batch(records))
    assert batch.sequence == 302
    assert list(batch.events) == events


def test_reading_on_in_small_steps_and_starting_over_both_see_every_record(open_log, tmp_path):
    wal = open_log(tmp_path)
    wal.append(payloads(40))
    seen, after = [], 0
    while records := wal.read(after=after, max_records=3, max_bytes=1 << 20):
        seen += [r.sequence for r in records]
        after = records[-1].sequence
    assert seen == list(range(1, 41))  # across segment boundaries, from the read cursor
    assert [r.sequence for r in wal.read(after=12, max_records=2, max_bytes=1 << 20)] == [13, 14]
    wal.append(payloads(2, start=40))
    assert [r.sequence for r in wal.read(after=40, max_records=9, max_bytes=1 << 20)] == [41, 42]


def test_a_log_directory_has_one_writer(open_log, tmp_path: Path):
    from gateway.events.wal import LogInUse

    first = open_log(tmp_path)
    with pytest.raises(LogInUse, match="in use by another gateway"):
        WriteAheadLog(tmp_path, 1000, 100_000)
    first.close()
    open_log(tmp_path).append(payloads(1))  # free again once closed


def test_a_restart_after_a_crash_resends_only_what_was_not_acknowledged(open_log, tmp_path: Path):
    """The acknowledged position is persisted (atomically): the log as a crash would leave it
    (copied while open, never closed) reopens past what was acknowledged, mid-segment too."""
    wal = open_log(tmp_path / "log")
    wal.append(payloads(25))  # segments of 1-9, 10-18, 19-25
    wal.ack(12)  # the first segment goes; the second is acknowledged up to 12
    shutil.copytree(tmp_path / "log", tmp_path / "crashed", ignore=shutil.ignore_patterns(".lock"))
    again = open_log(tmp_path / "crashed")
    assert again.acked == 12 and again.unacked == 13
    assert [r.sequence for r in again.read(again.acked, 100, 1 << 20)] == list(range(13, 26))


@pytest.mark.parametrize("fsync", ["batch", "interval", "never"])
def test_every_ack_is_on_disk_when_it_returns(open_log, tmp_path: Path, fsync: str):
    """Acks in quick succession: a crash after any of them resends nothing it covered (the
    written position outlives the process whatever the fsync policy; the policy is about the
    machine going down)."""
    wal = open_log(tmp_path / "log", fsync=fsync, fsync_interval_s=3600.0)
    wal.append(payloads(25))
    for acked in (3, 4, 12, 20):
        wal.ack(acked)
        crashed = tmp_path / f"crashed-{acked}"
        shutil.copytree(tmp_path / "log", crashed, ignore=shutil.ignore_patterns(".lock"))
        assert open_log(crashed).acked == acked
    wal.close()
    wal.close()  # twice is harmless
    assert open_log(tmp_path / "log").acked == 20


def test_a_torn_ack_write_leaves_the_position_before_it(open_log, tmp_path: Path):
    """The file as a crash mid-write leaves it, at every byte the write could stop at: the
    bytes of the new position written up to there, the old ones after."""
    wal = open_log(tmp_path / "log")
    wal.append(payloads(25))
    for acked in (3, 7, 12):
        wal.ack(acked)
    before = (tmp_path / "log" / "acked").read_bytes()
    wal.ack(13)  # in the segment of 10-18: a crash before or after, the segments are alike
    after = (tmp_path / "log" / "acked").read_bytes()
    changed = [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a != b]
    assert changed and changed[-1] - changed[0] < 512  # one slot, in place
    for stop in range(changed[0], changed[-1] + 1):
        torn = tmp_path / f"torn-{stop}"
        shutil.copytree(tmp_path / "log", torn, ignore=shutil.ignore_patterns(".lock"))
        (torn / "acked").write_bytes(after[:stop] + before[stop:])
        assert open_log(torn).acked == 12, f"a write torn at byte {stop}"
    wal.close()
    assert open_log(tmp_path / "log").acked == 13


def test_the_older_one_number_position_file_is_read_and_replaced(open_log, tmp_path: Path):
    wal = open_log(tmp_path)
    wal.append(payloads(25))
    wal.close()
    (tmp_path / "acked").write_text("12")  # what the log wrote before the two slots
    again = open_log(tmp_path)
    assert again.acked == 12 and again.unacked == 13
    again.ack(15)
    again.close()
    assert not (tmp_path / "acked").read_bytes().strip().isdigit()
    assert open_log(tmp_path).acked == 15


def test_a_position_file_with_no_whole_slot_resends_what_is_on_disk(open_log, tmp_path: Path):
    wal = open_log(tmp_path)
    wal.append(payloads(25))
    wal.ack(12)
    wal.close()
    (tmp_path / "acked").write_bytes(b"\xff" * 5000)
    again = open_log(tmp_path)
    assert again.acked == 9 and again.unacked == 16  # from the first segment left: 10-18
    again.ack(25)
    again.close()
    assert open_log(tmp_path).acked == 25


def test_sequences_go_on_from_the_acknowledged_position_when_no_segment_is_left(
    open_log, tmp_path: Path
):
    wal = open_log(tmp_path)
    wal.append(payloads(25))
    wal.ack(25)
    wal.close()
    for segment in tmp_path.glob("*.wal"):  # the active one goes once it has rolled
        segment.unlink()
    again = open_log(tmp_path)
    assert again.acked == 25 and again.unacked == 0
    assert again.append(payloads(1, start=99)) == 26


def test_a_position_ahead_of_the_logs_tail_is_not_reused(open_log, tmp_path: Path):
    """The position's file synced, the log's tail not (power lost between): the sequences up
    to that position are not written again, where the next start would take them as acked."""
    wal = open_log(tmp_path)
    wal.append(payloads(25))
    wal.close()
    (tmp_path / "acked").write_text("40")  # a position past the 25 records the tail kept
    again = open_log(tmp_path)
    assert again.acked == 25 and again.unacked == 0
    assert again.append(payloads(1, start=99)) == 41
    again.close()
    third = open_log(tmp_path)
    assert third.unacked == 1  # the new record is still to send
    assert [r.sequence for r in third.read(third.acked, 10, 1 << 20)] == [41]
