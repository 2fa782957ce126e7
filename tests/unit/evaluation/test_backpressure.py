"""The sidecar's memory bound: the Publish stream on a real DuckDB file, its store held at a gate.

Events read and not yet stored are bounded by ``evaluation.max_pending_events`` (all streams
together): at the bound the next batch is not read until a group is stored, and nothing read
is lost, even by a stream that ends with events unstored.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from gateway.api.v1 import events_pb2 as ev
from gateway.evaluation.service import EvaluationServicer
from gateway.evaluation.store import EventStore
from gateway.settings import EvaluationSettings
from tests.fakes import until

BATCH = 5


class GatedStore(EventStore):
    """A real store whose ingest waits at a gate (and can be told to fail once)."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory, memory_limit_bytes=64 * 1024 * 1024)
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.fail_next = False

    def ingest(self, events: Sequence[ev.PredictionEvent], arrival_us: int) -> tuple[int, int]:
        self.entered.set()
        self.gate.wait()
        if self.fail_next:
            self.fail_next = False
            raise OSError("disk full")
        return super().ingest(events, arrival_us)


@pytest.fixture
def store(tmp_path: Path):
    s = GatedStore(tmp_path)
    yield s
    s.gate.set()
    s.close()


def make_servicer(store: EventStore, max_pending_events: int) -> EvaluationServicer:
    settings = EvaluationSettings(
        max_pending_events=max_pending_events, commit_events=2 * BATCH, commit_interval_s=60
    )
    return EvaluationServicer(store, settings)


class Batches:
    """A publisher's stream: ``count`` batches of BATCH events; notes what the sidecar held
    each time it read one."""

    def __init__(self, servicer: EvaluationServicer, count: int, prefix: str = "e") -> None:
        self.servicer = servicer
        self.count = count
        self.prefix = prefix
        self.pending_at_read: list[int] = []

    async def __aiter__(self) -> AsyncIterator[ev.EventBatch]:
        for sequence in range(1, self.count + 1):
            self.pending_at_read.append(self.servicer.pending)
            events = [
                ev.PredictionEvent(event_id=f"{self.prefix}{sequence}-{i}", model="m", rows=1)
                for i in range(BATCH)
            ]
            yield ev.EventBatch(sequence=sequence, events=events)


def waits(servicer: EvaluationServicer) -> float:
    """Reads that found the bound full (and waited)."""
    return servicer.metrics.registry.get_sample_value("sidecar_pending_full_total") or 0.0


def stored_count(store: EventStore) -> int:
    return int(store.query("SELECT count(*) FROM events")[0][0])


async def test_at_max_pending_events_the_stream_is_not_read_until_a_group_is_stored(store):
    servicer = make_servicer(store, max_pending_events=5 * BATCH)
    batches = Batches(servicer, count=20)
    acks = servicer.Publish(batches.__aiter__(), None)
    first = asyncio.ensure_future(anext(acks))
    await asyncio.to_thread(store.entered.wait, 30)  # the first group is in the store, held
    await until(lambda: waits(servicer) == 1, "a read waits for room")
    for _ in range(100):  # however long the loop runs, nothing more is read
        await asyncio.sleep(0)
    assert len(batches.pending_at_read) == 5
    assert servicer.pending == 5 * BATCH
    assert not first.done()  # nothing is acknowledged before it is stored

    store.gate.set()
    sequences = [(await first).sequence] + [ack.sequence async for ack in acks]
    assert sequences == list(range(1, 21))
    assert max(batches.pending_at_read) < 5 * BATCH  # each read found room under the bound
    assert servicer.pending == 0
    assert stored_count(store) == 20 * BATCH


async def test_the_bound_is_shared_by_every_stream(store):
    servicer = make_servicer(store, max_pending_events=2 * BATCH)
    one = Batches(servicer, count=4, prefix="a")
    acks_one = servicer.Publish(one.__aiter__(), None)
    first = asyncio.ensure_future(anext(acks_one))
    await asyncio.to_thread(store.entered.wait, 30)  # stream one holds the bound, in the store
    two = Batches(servicer, count=4, prefix="b")
    acks_two = servicer.Publish(two.__aiter__(), None)
    second = asyncio.ensure_future(anext(acks_two))
    await until(lambda: waits(servicer) == 2, "both streams wait for room")
    assert two.pending_at_read == []  # stream two has read nothing: the bound is full
    assert not second.done()

    store.gate.set()

    async def sequences(head: asyncio.Future[ev.Ack], rest: AsyncIterator[ev.Ack]) -> list[int]:
        return [(await head).sequence] + [ack.sequence async for ack in rest]

    # NOTE: both read at once, as grpc does: a stream whose acks nobody reads stops storing.
    got = await asyncio.gather(sequences(first, acks_one), sequences(second, acks_two))
    assert list(got) == [[1, 2, 3, 4], [1, 2, 3, 4]]
    assert servicer.pending == 0
    assert stored_count(store) == 8 * BATCH


async def test_a_stream_that_ends_unstored_gives_back_its_share_and_its_resend_is_stored(store):
    servicer = make_servicer(store, max_pending_events=4 * BATCH)
    store.fail_next = True
    store.gate.set()
    with pytest.raises(OSError, match="disk full"):
        [ack async for ack in servicer.Publish(Batches(servicer, count=6).__aiter__(), None)]
    assert servicer.pending == 0  # nothing it read still counts against the bound
    assert stored_count(store) == 0

    # The publisher reconnects and sends the same batches again (its log still holds them).
    acks = [a async for a in servicer.Publish(Batches(servicer, count=6).__aiter__(), None)]
    assert [a.sequence for a in acks] == [1, 2, 3, 4, 5, 6]
    assert sum(a.stored for a in acks) == 6 * BATCH
    assert servicer.pending == 0
    assert stored_count(store) == 6 * BATCH
