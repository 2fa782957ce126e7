"""Stage 4, the response cache: per row, for deterministic model versions.

A row's key is the xxh3-128 hash of its input bytes, seeded by the model version's identity
(name, version, contract version and the load it came from, so a new version, a reloaded file
or another contract can never meet an old entry). The entry keeps the row's bytes and that
identity, and a hit compares both: a hash collision is a miss, counted, never a wrong answer.

A request is looked up row by row. Hits are answered from the cache; only the missing rows go
to the batcher, and the response is stitched back in row order. A row already being computed
for another request (or twice in one request) is computed once: the later ones wait for it
(coalesced).

Bounded by bytes (cachetools' LRUCache: the least recently used rows make room) and by age: an
entry past ``ttl_s`` is a miss when next looked up, and goes.

With ``shared`` (state.backend: redis) the rows other replicas computed are a second tier:
rows missed here and computed by no request here are looked up there, in one round trip per
request, before they are computed; computed rows are stored there in the background (at most
``_MAX_PUTS`` writes at once; past it a row is not shared). A shared row is keyed by the model
file's digest (the same model on every replica, not this process's load) and carries its row
bytes: a collision is a miss there too. Redis not answering is a miss (fail open), counted.
"""

from __future__ import annotations

import asyncio
import math
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import xxhash
from cachetools import LRUCache
from numpy.typing import NDArray

from gateway.errors import RuntimeFailure
from gateway.settings import CacheSettings
from gateway.state import PastDeadline, SharedRows, StateUnavailable
from gateway.telemetry import GatewayMetrics
from gateway.types import Feeds, Outcome

__all__ = ["CacheResult", "Identity", "ResponseCache", "cacheable", "identity"]

Compute = Callable[[Feeds, int], Awaitable[Outcome]]
_ENTRY_OVERHEAD = 160  # bytes of Python objects around an entry's arrays
_MAX_PUTS = 64  # writes to the shared tier in flight at once


@dataclass(slots=True)
class _Entry:
    identity: bytes
    row: bytes
    outputs: tuple[NDArray[np.generic], ...]
    nbytes: int
    expires: float  # on the cache's clock


class _OwnerGone(Exception):
    """The request computing a row left (cancelled, past its own deadline, refused): those
    waiting for the row compute it themselves."""


@dataclass(slots=True)
class _Flight:
    """A row being computed; requests that want it meanwhile wait here."""

    identity: bytes
    row: bytes
    waiters: list[asyncio.Future[tuple[NDArray[np.generic], ...]]] = field(default_factory=list)
    shared_key: bytes = b""  # its key in the shared tier, once looked up there


@dataclass(slots=True)  # made per request: slotted, not frozen (see gateway.types)
class CacheResult:
    outputs: list[NDArray[np.generic]]  # every model output, in model order, for all rows
    outcome: Outcome | None  # the batcher's, when any row was computed for this request
    cached_rows: int  # rows answered from the cache or by another request's computation
    lookup_ns: int


class Identity(NamedTuple):
    """What a cached row must have been computed by, and the hash seed derived from it;
    ``shared``: the same model on every replica (its file's digest), for the shared tier."""

    who: bytes
    seed: int
    shared: bytes = b""


class _Store(LRUCache[int, _Entry]):
    """An LRUCache bounded by entry bytes, counting what it evicts for room.

    (Not cachetools' TTLCache: its clock and expiry bookkeeping on every get and set cost
    more than the lookup itself; an entry's age is checked when it is read instead.)
    """

    def __init__(self, settings: CacheSettings, on_evict: Callable[[], None]) -> None:
        super().__init__(maxsize=settings.max_bytes, getsizeof=_entry_size)
        self._on_evict = on_evict

    def popitem(self) -> tuple[int, _Entry]:
        item = super().popitem()
        self._on_evict()
        return item


def _entry_size(entry: _Entry) -> int:
    return entry.nbytes


def identity(
    name: str, version: str, contract_version: str, generation: int, digest: str = ""
) -> Identity:
    """A model version's identity: its name, version, contract version and load (and, for
    the shared tier, its model file's digest)."""
    who = f"{name}\x00{version}\x00{contract_version}\x00{generation}".encode()
    model = f"{name}\x00{version}\x00{contract_version}\x00{digest}".encode()
    shared = format(xxhash.xxh3_64_intdigest(model), "016x").encode()
    return Identity(who, xxhash.xxh3_64_intdigest(who), shared)


def cacheable(feeds: Feeds) -> bool:
    """Rows of fixed-width types have bytes to key on; BYTES (object) inputs do not."""
    return all(not a.dtype.hasobject for a in feeds.values())


class ResponseCache:
    def __init__(
        self,
        settings: CacheSettings,
        metrics: GatewayMetrics,
        clock: Callable[[], float] = time.monotonic,
        shared: SharedRows | None = None,
    ) -> None:
        self.settings = settings
        self._shared = shared
        self._shared_errors = metrics.state_errors.labels("cache")
        self._puts: set[asyncio.Task[None]] = set()
        self._clock = clock  # seconds; entries expire on it
        self._flights: dict[int, _Flight] = {}
        self._identities: dict[tuple[int, str], Identity] = {}
        # Plain counters, read at scrape time (no metric lock per row).
        self.hits = self.misses = self.coalesced = self.evictions = self.collisions = 0
        self._store = _Store(settings, self._evicted)
        metrics.cache_bytes.set_function(lambda: self._store.currsize)
        metrics.cache_entries.set_function(lambda: len(self._store))
        metrics.counter_function(
            "gateway_cache_rows",
            "Response cache rows by outcome: hit, miss, coalesced (computed once for several "
            "requests or rows), evicted (for room), collision (a hash met another row).",
            ["outcome"],
            lambda: [
                (("hit",), self.hits),
                (("miss",), self.misses),
                (("coalesced",), self.coalesced),
                (("evicted",), self.evictions),
                (("collision",), self.collisions),
            ],
        )

    def _evicted(self) -> None:
        self.evictions += 1

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

    def identity(
        self, name: str, version: str, contract_version: str, generation: int, digest: str = ""
    ) -> Identity:
        """A model version's identity under a contract version (made once, then looked up);
        ``generation`` is unique to one load of the version, ``digest`` to its file."""
        key = (generation, contract_version)
        found = self._identities.get(key)
        if found is None:
            if len(self._identities) > 4096:  # versions come and go: keep the map small
                self._identities.clear()
            found = self._identities[key] = identity(
                name, version, contract_version, generation, digest
            )
        return found

    def _lookup(self, who: bytes, row: bytes, key: int) -> _Entry | None:
        entry = self._store.get(key)
        if entry is None:
            return None
        if entry.expires < self._clock():
            del self._store[key]
            return None
        if entry.row == row and entry.identity == who:
            return entry
        self.collisions += 1
        return None

    async def infer(
        self,
        identity: Identity,
        feeds: Feeds,
        rows: int,
        compute: Compute,
        deadline: float | None = None,
    ) -> CacheResult:
        """``rows`` rows of ``feeds`` through the cache; ``compute`` runs the missing ones.
        ``deadline`` (the request's, on the loop clock) bounds the shared tier's lookup."""
        started = time.perf_counter_ns()
        who, seed, _ = identity
        flights = self._flights
        found: dict[int, tuple[NDArray[np.generic], ...]] = {}  # row -> outputs
        waiting: list[tuple[int, asyncio.Future[tuple[NDArray[np.generic], ...]]]] = []
        missing: list[int] = []  # rows this request computes
        mine: list[tuple[int, _Flight]] = []  # and the flights it owns, in that order
        duplicates: list[tuple[int, int]] = []  # (row, the earlier row of this request)
        owned: dict[int, int] = {}  # key -> the row of this request computing it
        for i, row in enumerate(_row_bytes(feeds, rows)):
            key = xxhash.xxh3_128_intdigest(row, seed)
            entry = self._lookup(who, row, key)
            if entry is not None:
                found[i] = entry.outputs
                continue
            flight = flights.get(key)
            if flight is not None and flight.row == row and flight.identity == who:
                if key in owned:
                    duplicates.append((i, owned[key]))
                else:
                    future: asyncio.Future[tuple[NDArray[np.generic], ...]] = (
                        asyncio.get_running_loop().create_future()
                    )
                    flight.waiters.append(future)
                    waiting.append((i, future))
                continue
            flight = _Flight(who, row)
            if key not in flights:  # a colliding key in flight: compute, don't share
                flights[key] = flight
            owned[key] = i
            missing.append(i)
            mine.append((key, flight))
        if missing and self._shared is not None:
            try:
                await self._from_shared(identity, missing, mine, found, deadline)
            except BaseException as err:  # cancelled meanwhile: its rows are no one's now
                self._land(mine, None, err)
                raise
        self.hits += len(found)
        self.coalesced += len(waiting) + len(duplicates)
        self.misses += len(missing)
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
            if self._shared is not None:
                self._share(identity, mine, computed)
            if len(missing) == rows:
                return CacheResult(computed, outcome, 0, lookup_ns)
        elif len(found) == rows == 1:  # the online hit: served as stored
            return CacheResult(list(found[0]), None, 1, lookup_ns)
        for i, future in waiting:
            try:
                found[i] = await future
            except _OwnerGone:
                # Rare: compute the whole request here (the rows already computed for it are
                # cached; this outcome is the one charged). The other waits are let go.
                for _, other in waiting:
                    if not other.done():
                        other.cancel()
                    elif not other.cancelled():
                        other.exception()  # retrieved: no "never retrieved" at collection
                outcome = await compute(feeds, rows)
                return CacheResult(outcome.outputs, outcome, 0, lookup_ns)
        positions = {row: j for j, row in enumerate(missing)}
        for i, earlier in duplicates:
            if earlier in found:  # the shared tier had it
                found[i] = found[earlier]
                continue
            j = positions[earlier]
            found[i] = tuple(o[j : j + 1] for o in computed)
        outputs = _stitch(rows, found, missing, computed)
        return CacheResult(outputs, outcome, rows - len(missing), lookup_ns)

    async def _from_shared(
        self,
        identity: Identity,
        missing: list[int],
        mine: list[tuple[int, _Flight]],
        found: dict[int, tuple[NDArray[np.generic], ...]],
        deadline: float | None,
    ) -> None:
        """Rows other replicas computed, taken out of ``missing`` (and ``mine``, landed as if
        computed here: waiters get them, the local tier keeps them). A lookup the request's
        deadline cut short is a miss, not a Redis failure: computing then meets the deadline."""
        assert self._shared is not None
        seed = int(identity.shared, 16)
        keys = []
        for _, flight in mine:  # hashed once: the write after computing reuses the key
            flight.shared_key = self._shared.key(
                identity.shared, xxhash.xxh3_128_intdigest(flight.row, seed)
            )
            keys.append(flight.shared_key)
        try:
            values = await self._shared.get(keys, deadline)
        except PastDeadline:
            return
        except StateUnavailable:
            self._shared_errors.inc()
            return
        still_missing, still_mine = [], []
        expires = self._clock() + self.settings.ttl_s
        for i, (key, flight), value in zip(missing, mine, values, strict=True):
            outputs = _unpack(value, identity.shared, flight.row) if value is not None else None
            if outputs is None:
                still_missing.append(i)
                still_mine.append((key, flight))
                continue
            found[i] = outputs
            self._land_row(key, flight, outputs, expires)
        missing[:] = still_missing
        mine[:] = still_mine

    def _share(
        self,
        identity: Identity,
        mine: list[tuple[int, _Flight]],
        outputs: list[NDArray[np.generic]],
    ) -> None:
        """Store the rows computed here in the shared tier, in the background."""
        assert self._shared is not None
        if len(self._puts) >= _MAX_PUTS or any(o.dtype.hasobject for o in outputs):
            return
        items = [
            (
                flight.shared_key,
                _pack(identity.shared, flight.row, tuple(o[j : j + 1] for o in outputs)),
            )
            for j, (_, flight) in enumerate(mine)  # each looked up there first: its key known
        ]
        task = asyncio.get_running_loop().create_task(self._put(items))
        self._puts.add(task)
        task.add_done_callback(self._puts.discard)

    async def _put(self, items: list[tuple[bytes, bytes]]) -> None:
        assert self._shared is not None
        try:
            await self._shared.put(items, self.settings.ttl_s)
        except StateUnavailable:
            self._shared_errors.inc()

    async def close(self) -> None:
        """Let the shared tier's writes in flight finish (bounded by the state timeout)."""
        await asyncio.gather(*self._puts, return_exceptions=True)

    def _land_row(
        self,
        key: int,
        flight: _Flight,
        row_outputs: tuple[NDArray[np.generic], ...],
        expires: float,
    ) -> None:
        """One row known (computed, or from the shared tier): kept, handed to its waiters."""
        if self._flights.get(key) is flight:
            del self._flights[key]
        nbytes = len(flight.row) + _ENTRY_OVERHEAD
        for o in row_outputs:
            nbytes += o.nbytes
        if nbytes <= self._store.maxsize:
            self._store[key] = _Entry(flight.identity, flight.row, row_outputs, nbytes, expires)
        for future in flight.waiters:
            if not future.done():
                future.set_result(row_outputs)

    def _land(
        self,
        mine: list[tuple[int, _Flight]],
        outputs: list[NDArray[np.generic]] | None,
        error: BaseException | None,
    ) -> None:
        """Store computed rows, hand them to whoever waits, and end their flights."""
        flights = self._flights
        expires = self._clock() + self.settings.ttl_s
        for j, (key, flight) in enumerate(mine):
            if flights.get(key) is flight:
                del flights[key]
            if outputs is None:
                # A model failure is the row's; anything else (a cancel, the owner's own
                # deadline or admission) is the owner's, and the waiters go on without it.
                failure = error if isinstance(error, RuntimeFailure) else _OwnerGone()
                for future in flight.waiters:
                    if not future.done():
                        future.set_exception(failure)
                continue
            # Each output's row, kept with its batch dimension: a one-row hit is served as is.
            self._land_row(key, flight, tuple([o[j : j + 1].copy() for o in outputs]), expires)


def _row_bytes(feeds: Feeds, rows: int) -> list[bytes]:
    """Each row's bytes over every input (in name order)."""
    if rows == 1:  # the online case: no matrix to build
        if len(feeds) == 1:
            return [next(iter(feeds.values())).tobytes()]
        return [b"".join(feeds[name].tobytes() for name in sorted(feeds))]
    views = [
        np.ascontiguousarray(feeds[name]).reshape(rows, -1).view(np.uint8) for name in sorted(feeds)
    ]
    matrix = views[0] if len(views) == 1 else np.hstack(views)
    return [row.tobytes() for row in matrix]


def _stitch(
    rows: int,
    found: dict[int, tuple[NDArray[np.generic], ...]],
    missing: list[int],
    computed: list[NDArray[np.generic]],
) -> list[NDArray[np.generic]]:
    """The response's outputs in row order: rows found (each kept as [1, ...]) and computed."""
    sample = next(iter(found.values())) if found else tuple(o[:1] for o in computed)
    outputs = []
    for k, first in enumerate(sample):
        out = np.empty((rows, *first.shape[1:]), dtype=first.dtype)
        for i, values in found.items():
            out[i] = values[k][0]
        if missing:
            out[missing] = computed[k]
        outputs.append(out)
    return outputs


# A shared row: its model identity, its bytes, then each output (dtype, shape, data).
_HEAD = struct.Struct("<HIB")
_PLAIN = "biufc"  # bool, integers, floats, complex: what tobytes/frombuffer carry whole
_ARRAY = struct.Struct("<BBQ")


def _pack(model: bytes, row: bytes, outputs: tuple[NDArray[np.generic], ...]) -> bytes:
    parts = [_HEAD.pack(len(model), len(row), len(outputs)), model, row]
    for output in outputs:
        dtype = output.dtype.str.encode()
        data = np.ascontiguousarray(output).tobytes()
        parts += [_ARRAY.pack(len(dtype), output.ndim, len(data)), dtype]
        parts += [struct.pack(f"<{output.ndim}q", *output.shape), data]
    return b"".join(parts)


def _unpack(blob: bytes, model: bytes, row: bytes) -> tuple[NDArray[np.generic], ...] | None:
    """The outputs of a shared row, if it is this model's and this row's (else None: a
    collision, or bytes that do not parse as plain numeric arrays of one row, are misses)."""
    try:
        model_len, row_len, count = _HEAD.unpack_from(blob)
        at = _HEAD.size
        if blob[at : at + model_len] != model:
            return None
        if blob[at + model_len : at + model_len + row_len] != row:
            return None
        at += model_len + row_len
        outputs = []
        for _ in range(count):
            dtype_len, ndim, size = _ARRAY.unpack_from(blob, at)
            at += _ARRAY.size
            dtype = np.dtype(blob[at : at + dtype_len].decode())
            at += dtype_len
            shape = struct.unpack_from(f"<{ndim}q", blob, at)
            at += 8 * ndim
            if (
                dtype.kind not in _PLAIN
                or dtype.itemsize == 0
                or dtype.fields is not None
                or not shape
                or shape[0] != 1
                or any(d < 0 for d in shape)
                or math.prod(shape) * dtype.itemsize != size
                or len(blob) < at + size
            ):
                return None
            array = np.frombuffer(blob, dtype, count=size // dtype.itemsize, offset=at)
            outputs.append(array.reshape(shape).copy())
            at += size
        return tuple(outputs)
    except Exception:  # any bytes at all: a miss, never an error
        return None
