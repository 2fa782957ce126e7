"""Stage 4, the response cache: per row, for deterministic model versions.

A row's key is the xxh3-128 hash of its input bytes, seeded by the model version's identity
(name, version, contract version and the load it came from, so a new version, a reloaded file
or another contract can never meet an old entry). The entry keeps the row's bytes and that
identity, and a hit compares both: a hash collision is a miss, counted, never a wrong answer.

A request is looked up row by row. Hits are answered from the cache; only the missing rows go
to the batcher, and the response is stitched back in row order. A row already being computed
for another request (or twice in one request) is computed once: the later ones wait for it
(coalesced).

Bounded by bytes (cachetools' TTLCache, least recently used out first) and by age.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np
import xxhash
from cachetools import TTLCache
from numpy.typing import NDArray

from gateway.batching.batcher import Outcome
from gateway.settings import CacheSettings
from gateway.telemetry import GatewayMetrics

__all__ = ["CacheResult", "ResponseCache", "cacheable", "identity"]

Feeds = dict[str, NDArray[np.generic]]
Compute = Callable[[Feeds, int], Awaitable[Outcome]]
_ENTRY_OVERHEAD = 160  # bytes of Python objects around an entry's arrays


@dataclass(slots=True)
class _Entry:
    identity: bytes
    row: bytes
    outputs: tuple[NDArray[np.generic], ...]
    nbytes: int


@dataclass(slots=True)
class _Flight:
    """A row being computed; requests that want it meanwhile wait here."""

    identity: bytes
    row: bytes
    waiters: list[asyncio.Future[tuple[NDArray[np.generic], ...]]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class CacheResult:
    outputs: list[NDArray[np.generic]]  # every model output, in model order, for all rows
    outcome: Outcome | None  # the batcher's, when any row was computed for this request
    cached_rows: int  # rows answered from the cache or by another request's computation
    lookup_ns: int


class _Store(TTLCache[int, _Entry]):
    """TTLCache counting what it evicts for room (expired entries are not evictions)."""

    def __init__(self, settings: CacheSettings, on_evict: Callable[[], None]) -> None:
        super().__init__(
            maxsize=settings.max_bytes, ttl=settings.ttl_s, getsizeof=lambda e: e.nbytes
        )
        self._on_evict = on_evict

    def popitem(self) -> tuple[int, _Entry]:
        item = super().popitem()
        self._on_evict()
        return item


def identity(name: str, version: str, contract_version: str, generation: int) -> bytes:
    """What a cached row must have been computed by."""
    return f"{name}\x00{version}\x00{contract_version}\x00{generation}".encode()


def cacheable(feeds: Feeds) -> bool:
    """Rows of fixed-width types have bytes to key on; BYTES (object) inputs do not."""
    return all(a.dtype != object for a in feeds.values())


class ResponseCache:
    def __init__(self, settings: CacheSettings, metrics: GatewayMetrics) -> None:
        self.settings = settings
        self._flights: dict[int, _Flight] = {}
        m = metrics.cache_events
        self._m_hit, self._m_miss = m.labels("hit"), m.labels("miss")
        self._m_coalesced, self._m_evicted = m.labels("coalesced"), m.labels("evicted")
        self._m_collision = m.labels("collision")
        self.hits = self.misses = self.coalesced = self.evictions = self.collisions = 0
        self._store = _Store(settings, self._evicted)
        metrics.cache_bytes.set_function(lambda: self._store.currsize)
        metrics.cache_entries.set_function(lambda: len(self._store))

    def _evicted(self) -> None:
        self.evictions += 1
        self._m_evicted.inc()

    def stats(self) -> dict[str, int]:
        return {
            "entries": len(self._store),
            "bytes": int(self._store.currsize),
            "max_bytes": self.settings.max_bytes,
            "hits": self.hits,
            "misses": self.misses,
            "coalesced": self.coalesced,
            "evictions": self.evictions,
            "collisions": self.collisions,
            "in_flight": len(self._flights),
        }

    def flush(self) -> int:
        count = len(self._store)
        self._store.clear()
        return count

    async def infer(self, who: bytes, feeds: Feeds, rows: int, compute: Compute) -> CacheResult:
        """``rows`` rows of ``feeds`` through the cache; ``compute`` runs the missing ones."""
        started = time.perf_counter_ns()
        seed = xxhash.xxh3_64_intdigest(who)
        matrix = _row_bytes(feeds, rows)
        store, flights = self._store, self._flights
        found: dict[int, tuple[NDArray[np.generic], ...]] = {}  # row -> outputs
        waiting: list[tuple[int, asyncio.Future[tuple[NDArray[np.generic], ...]]]] = []
        missing: list[int] = []  # rows this request computes
        mine: list[tuple[int, _Flight]] = []  # and the flights it owns, in that order
        duplicates: list[tuple[int, int]] = []  # (row, the earlier row of this request)
        owned: dict[int, int] = {}  # key -> the row of this request computing it
        loop = asyncio.get_running_loop()
        for i in range(rows):
            row = matrix[i].tobytes()
            key = xxhash.xxh3_128_intdigest(row, seed)
            entry = store.get(key)
            if entry is not None:
                if entry.row == row and entry.identity == who:
                    found[i] = entry.outputs
                    continue
                self.collisions += 1
                self._m_collision.inc()
            flight = flights.get(key)
            if flight is not None and flight.row == row and flight.identity == who:
                if key in owned:
                    duplicates.append((i, owned[key]))
                else:
                    future: asyncio.Future[tuple[NDArray[np.generic], ...]] = loop.create_future()
                    flight.waiters.append(future)
                    waiting.append((i, future))
                continue
            flight = _Flight(who, row)
            if key not in flights:  # a colliding key in flight: compute, don't share
                flights[key] = flight
            owned[key] = i
            missing.append(i)
            mine.append((key, flight))
        hit_count = len(found)
        self.hits += hit_count
        if hit_count:
            self._m_hit.inc(hit_count)
        shared = len(waiting) + len(duplicates)
        if shared:
            self.coalesced += shared
            self._m_coalesced.inc(shared)
        if missing:
            self.misses += len(missing)
            self._m_miss.inc(len(missing))
        lookup_ns = time.perf_counter_ns() - started

        outcome = None
        computed: list[NDArray[np.generic]] = []
        if missing:
            part = feeds if len(missing) == rows else {n: a[missing] for n, a in feeds.items()}
            try:
                outcome = await compute(part, len(missing))
            except BaseException as err:
                self._land(mine, None, err)
                raise
            computed = outcome.outputs
            self._land(mine, computed, None)
            if len(missing) == rows:
                return CacheResult(computed, outcome, 0, lookup_ns)
        for i, future in waiting:
            found[i] = await future
        positions = {row: j for j, row in enumerate(missing)}
        for i, earlier in duplicates:
            j = positions[earlier]
            found[i] = tuple(o[j] for o in computed)
        return CacheResult(_stitch(rows, found, missing, computed), outcome, rows - len(missing),
                           lookup_ns)  # fmt: skip

    def _land(
        self,
        mine: list[tuple[int, _Flight]],
        outputs: list[NDArray[np.generic]] | None,
        error: BaseException | None,
    ) -> None:
        """Store computed rows, hand them to whoever waits, and end their flights."""
        flights, store = self._flights, self._store
        for j, (key, flight) in enumerate(mine):
            if flights.get(key) is flight:
                del flights[key]
            if outputs is None:
                for future in flight.waiters:
                    if not future.done():
                        future.set_exception(
                            error if isinstance(error, Exception) else asyncio.CancelledError()
                        )
                continue
            row_outputs = tuple(o[j].copy() for o in outputs)
            nbytes = len(flight.row) + sum(o.nbytes for o in row_outputs) + _ENTRY_OVERHEAD
            if nbytes <= store.maxsize:
                store[key] = _Entry(flight.identity, flight.row, row_outputs, nbytes)
            for future in flight.waiters:
                if not future.done():
                    future.set_result(row_outputs)


def _row_bytes(feeds: Feeds, rows: int) -> NDArray[np.uint8]:
    """Each row's bytes over every input (in name order), as one uint8 matrix."""
    views = [
        np.ascontiguousarray(feeds[name]).reshape(rows, -1).view(np.uint8) for name in sorted(feeds)
    ]
    return views[0] if len(views) == 1 else np.hstack(views)


def _stitch(
    rows: int,
    found: dict[int, tuple[NDArray[np.generic], ...]],
    missing: list[int],
    computed: list[NDArray[np.generic]],
) -> list[NDArray[np.generic]]:
    sample = next(iter(found.values())) if found else tuple(o[0] for o in computed)
    outputs = []
    for k, first in enumerate(sample):
        out = np.empty((rows, *first.shape), dtype=first.dtype)
        for i, values in found.items():
            out[i] = values[k]
        if missing:
            out[missing] = computed[k]
        outputs.append(out)
    return outputs
