"""State on Redis: one client (a connection pool) per process, and what each concern keeps
there. Every call is bounded by ``state.timeout_ms``; a call that fails or takes longer raises
StateUnavailable, and the caller applies its concern's on_error. The client reconnects by
itself: a Redis that comes back is used again without a restart."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Coroutine
from typing import Any
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway.settings import StateSettings

__all__ = [
    "PastDeadline",
    "RedisState",
    "SharedBudgets",
    "SharedLedger",
    "SharedLimits",
    "SharedRoutes",
    "SharedRows",
    "StateUnavailable",
]

log = logging.getLogger(__name__)

# GCRA (a token bucket kept as one timestamp: the "theoretical arrival time" of the next
# request) evaluated atomically in Redis, on Redis' clock, so every replica spends from one
# bucket: ``rate`` per second on average, ``burst`` at once. Times are whole microseconds
# (exact in Lua's doubles: no rounding that drifts the rate). Returns {1, 0} when admitted,
# {0, us} with the wait before a request would be. The key expires once the bucket is full
# again, so an idle tenant costs nothing.
_GCRA = """
local now_s = redis.call('TIME')
local now = tonumber(now_s[1]) * 1000000 + tonumber(now_s[2])
local interval = tonumber(ARGV[1])
local tolerance = interval * tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
local next_tat = tat + interval
local allowed_at = next_tat - tolerance
if now < allowed_at then
  return {0, allowed_at - now}
end
local ttl_ms = math.ceil((next_tat - now) / 1000) + 1
redis.call('SET', KEYS[1], string.format('%d', next_tat), 'PX', ttl_ms)
return {1, 0}
"""


_BREAK_S = 1.0  # after a failed call, calls fail at once this long


class StateUnavailable(Exception):
    """Redis did not answer (unreachable, refused, or slower than ``state.timeout_ms``)."""


class PastDeadline(StateUnavailable):
    """The request's deadline, sooner than ``state.timeout_ms``, ended the wait for Redis: the
    request is out of time, Redis is not known to be down (no breaker)."""


class RedisState:
    def __init__(self, settings: StateSettings) -> None:
        self.settings = settings
        timeout_s = settings.timeout_ms / 1000
        self._timeout_s = timeout_s
        self._broken_until = 0.0  # time.monotonic() until which calls fail at once
        self.replica = uuid.uuid4().hex  # this process, among the replicas
        self.client = aioredis.from_url(
            settings.redis_url.get_secret_value(),
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry_on_timeout=False,
        )
        self.limits = SharedLimits(self)
        self.budgets = SharedBudgets(self)
        self.routes = SharedRoutes(self)
        self.ledger = SharedLedger(self)
        # The cache's rows on a Redis of their own (bounded by its eviction), with its own
        # client and breaker: a cache Redis away costs limits and budgets nothing.
        self._rows_state: RedisState | None = None
        if settings.cache_redis_url is not None:
            rows_settings = settings.model_copy(
                update={"redis_url": settings.cache_redis_url, "cache_redis_url": None}
            )
            self._rows_state = RedisState(rows_settings)
        self.rows = SharedRows(self._rows_state or self)

    def where(self) -> str:
        """host:port/db, for logs (never the URL: it may hold a password)."""
        parts = urlsplit(self.settings.redis_url.get_secret_value())
        return f"{parts.hostname}:{parts.port or 6379}{parts.path or '/0'}"

    async def start(self) -> None:
        """Say whether Redis answers; a Redis down at start is not fatal (on_error applies
        until it answers)."""
        try:
            await self.call(self.client.ping())
            log.info("state: redis at %s", self.where())
        except StateUnavailable as err:
            log.warning(
                "state: redis at %s does not answer (%s); on_error applies", self.where(), err
            )
        if self._rows_state is not None:
            await self._rows_state.start()

    async def call(self, command: Awaitable[Any], deadline: float | None = None) -> object:
        """Await a client command within ``state.timeout_ms``, and within ``deadline`` (the
        request's, on the loop clock) when that comes first; StateUnavailable otherwise
        (PastDeadline when the request's deadline ended the wait).

        After a failure, calls fail at once for ``_BREAK_S`` (then one gets through to see
        whether Redis is back): a Redis that hangs rather than refuses costs each request
        nothing, not a timeout each."""
        now = time.monotonic()
        timeout_s = self._timeout_s
        by_request = False
        if deadline is not None:
            left = deadline - asyncio.get_running_loop().time()
            by_request = left < timeout_s
            timeout_s = max(0.0, min(timeout_s, left))
        if now < self._broken_until or timeout_s <= 0:
            if isinstance(command, Coroutine):  # never awaited: no "was never awaited" warning
                command.close()
            if timeout_s <= 0:
                raise PastDeadline("the request's deadline had passed")
            raise StateUnavailable(f"Redis failed less than {_BREAK_S:g} s ago")
        if by_request:
            return await self._within_deadline(command, timeout_s)
        try:
            return await asyncio.wait_for(command, timeout_s)
        except (RedisError, OSError, TimeoutError) as err:
            self._broken_until = time.monotonic() + _BREAK_S
            raise StateUnavailable(type(err).__name__) from None

    async def _within_deadline(self, command: Awaitable[Any], timeout_s: float) -> object:
        """The request stops waiting at its deadline; the call itself runs on (shielded) to
        ``state.timeout_ms``, and trips the breaker if it fails there. Without that, a hung
        Redis would cost every short-deadline request its whole deadline, for ever."""
        call = asyncio.ensure_future(asyncio.wait_for(command, self._timeout_s))
        try:
            return await asyncio.wait_for(asyncio.shield(call), timeout_s)
        except TimeoutError:
            call.add_done_callback(self._judge_abandoned)
            raise PastDeadline("the request's deadline passed waiting for Redis") from None
        except (RedisError, OSError) as err:
            self._broken_until = time.monotonic() + _BREAK_S
            raise StateUnavailable(type(err).__name__) from None

    def _judge_abandoned(self, call: asyncio.Future[Any]) -> None:
        """A call its request stopped waiting for ended: a failure still says Redis is down."""
        if call.cancelled():
            return
        if isinstance(call.exception(), RedisError | OSError | TimeoutError):
            self._broken_until = time.monotonic() + _BREAK_S

    async def close(self) -> None:
        await self.client.aclose()
        if self._rows_state is not None:
            await self._rows_state.close()


class SharedLimits:
    """Rate-limit buckets in Redis, one per tenant, spent by every replica."""

    def __init__(self, state: RedisState) -> None:
        self._state = state
        self._script = state.client.register_script(_GCRA)
        self._prefix = f"{state.settings.key_prefix}rl:"

    async def take(
        self, tenant: str, rate: float, burst: int, deadline: float | None = None
    ) -> float | None:
        """Spend one request of ``tenant``'s bucket: None when admitted, else the seconds to
        wait; StateUnavailable when Redis does not answer. (The key holds the tenant's hash:
        a tenant is client text, up to 1,024 characters with auth.mode none.)"""
        interval_us = max(1, round(1_000_000 / rate))
        key = self._prefix + hashlib.sha256(tenant.encode()).hexdigest()[:32]
        reply = await self._state.call(
            self._script(keys=[key], args=[interval_us, burst]), deadline
        )
        if not isinstance(reply, list) or len(reply) != 2:
            raise StateUnavailable("unexpected reply")
        admitted, wait_us = int(reply[0]), int(reply[1])
        return None if admitted else wait_us / 1_000_000


# Each replica's own spend in a budget's window is one field of the window's hash, set (not
# added): a write Redis made but whose answer came too late is made again harmlessly. The
# total is the sum of the fields.
_SPEND = """
local totals = {}
for i, key in ipairs(KEYS) do
  redis.call('HSET', key, ARGV[1], ARGV[2 * i])
  redis.call('EXPIRE', key, ARGV[2 * i + 1])
  local sum = 0
  for _, value in ipairs(redis.call('HVALS', key)) do sum = sum + tonumber(value) end
  totals[i] = string.format('%.17g', sum)
end
return totals
"""


class SharedBudgets:
    """Budgets' spend per window in Redis: each replica sets its own spend in each window (a
    field of one hash per budget window) and reads every replica's total back, in one round
    trip."""

    def __init__(self, state: RedisState) -> None:
        self._state = state
        self._prefix = f"{state.settings.key_prefix}budget:"
        self._script = state.client.register_script(_SPEND)
        self._replica = state.replica

    async def sync(self, spends: list[tuple[str, int, float, int]]) -> list[float]:
        """Set this replica's spend for each (budget name, window start, spend in the window,
        window length) and return each window's total over every replica; StateUnavailable
        when Redis does not answer (the spend is set again at the next sync)."""
        if not spends:
            return []
        keys = [f"{self._prefix}{name}:{start}" for name, start, _, _ in spends]
        args: list[str | int] = [self._replica]
        for _, _, spent, window_s in spends:
            args += [repr(spent), 2 * window_s]
        replies = await self._state.call(self._script(keys=keys, args=args))
        if not isinstance(replies, list) or len(replies) != len(spends):
            raise StateUnavailable("unexpected reply")
        return [float(total) for total in replies]


LineKey = tuple[str, str, str, str]  # tenant, route, variant, surface


class SharedLedger:
    """The cost ledger's lines per window, every replica's: one hash per window, a field per
    (replica, line) holding that replica's totals for the line (set, never added: a write
    Redis made but answered late is harmless when made again)."""

    def __init__(self, state: RedisState) -> None:
        self._state = state
        self._prefix = f"{state.settings.key_prefix}ledger:"

    async def write(self, lines: list[tuple[int, LineKey, list[float]]], keep_s: int) -> None:
        """Set this replica's totals of each (window start, line, [requests, rows, cached
        rows, compute seconds, cost]); kept ``keep_s``."""
        pipe = self._state.client.pipeline(transaction=False)
        starts = set()
        for start, key, totals in lines:
            field = json.dumps([self._state.replica, *key])
            _ = pipe.hset(f"{self._prefix}{start}", field, json.dumps(totals))  # queued
            starts.add(start)
        for start in starts:
            _ = pipe.expire(f"{self._prefix}{start}", keep_s)
        await self._state.call(pipe.execute())

    async def read(self, starts: list[int]) -> list[tuple[int, LineKey, list[float]]]:
        """Every replica's lines of the windows starting at ``starts``, summed per line."""
        pipe = self._state.client.pipeline(transaction=False)
        for start in starts:
            _ = pipe.hgetall(f"{self._prefix}{start}")
        replies = await self._state.call(pipe.execute())
        if not isinstance(replies, list):
            raise StateUnavailable("unexpected reply")
        summed: dict[tuple[int, LineKey], list[float]] = {}
        for start, fields in zip(starts, replies, strict=True):
            for field, value in fields.items():
                _replica, *key = json.loads(field)
                line = summed.setdefault((start, tuple(key)), [0.0] * 5)
                for i, number in enumerate(json.loads(value)):
                    line[i] += number
        return [(start, key, totals) for (start, key), totals in summed.items()]


# The route table as one document beside its generation, replaced only by a writer that
# read the generation it replaces (compare-and-set), and announced to every replica.
_CAS = """
local current = tonumber(redis.call('HGET', KEYS[1], 'generation') or '0')
if current ~= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'generation', ARGV[2], 'document', ARGV[3])
redis.call('PUBLISH', KEYS[2], ARGV[2])
return 1
"""


class SharedRoutes:
    """The replicas' route table: a document with its generation, changed by compare-and-set
    and announced on a channel every replica listens to."""

    def __init__(self, state: RedisState) -> None:
        self._state = state
        self._key = f"{state.settings.key_prefix}routes"
        self._channel = f"{state.settings.key_prefix}routes:changed"
        self._cas = state.client.register_script(_CAS)

    async def read(self) -> dict[str, Any] | None:
        """The shared table's document; None when no replica has written one."""
        raw = await self._state.call(self._state.client.hget(self._key, "document"))
        return None if raw is None else json.loads(raw)  # type: ignore[arg-type]

    async def write(self, base: int, document: dict[str, Any]) -> bool:
        """Replace the table at generation ``base`` (0: none yet) with ``document``; False
        when another replica changed it first."""
        generation = int(document["generation"])
        reply = await self._state.call(
            self._cas(
                keys=[self._key, self._channel], args=[base, generation, json.dumps(document)]
            )
        )
        return bool(reply)

    async def changes(self, backstop_s: float) -> AsyncIterator[None]:
        """Yields when a replica announces a change, and at least every ``backstop_s`` (a
        missed announcement is caught by the re-read). Raises StateUnavailable when Redis
        goes away (the caller waits and listens again)."""
        pubsub = self._state.client.pubsub()
        try:
            await self._state.call(pubsub.subscribe(self._channel))
            while True:
                try:
                    await pubsub.get_message(ignore_subscribe_messages=True, timeout=backstop_s)
                except (RedisError, OSError) as err:
                    raise StateUnavailable(type(err).__name__) from None
                yield None
        finally:
            with contextlib.suppress(RedisError, OSError):
                await pubsub.aclose()  # type: ignore[no-untyped-call]


class SharedRows:
    """Response rows other replicas computed: one key per row (its model identity and the
    hash of its bytes), expiring after ``cache.ttl_s``. On ``state.cache_redis_url``, that
    Redis' own eviction (``maxmemory`` with ``allkeys-lru``) bounds their bytes; on the state's
    Redis (which must not evict) the TTL and Redis' ``maxmemory`` do."""

    def __init__(self, state: RedisState) -> None:
        self._state = state
        self._prefix = f"{state.settings.key_prefix}rows:".encode()

    def key(self, model: bytes, row_hash: int) -> bytes:
        return self._prefix + model + b":" + row_hash.to_bytes(16, "little").hex().encode()

    async def get(self, keys: list[bytes], deadline: float | None = None) -> list[bytes | None]:
        """The stored values of ``keys`` (None: not there); StateUnavailable when Redis does
        not answer (within the request's ``deadline`` too)."""
        reply = await self._state.call(self._state.client.mget(keys), deadline)
        if not isinstance(reply, list):
            raise StateUnavailable("unexpected reply")
        return reply

    async def put(self, items: list[tuple[bytes, bytes]], ttl_s: float) -> None:
        """Store each (key, value) for ``ttl_s``, in one round trip."""
        pipe = self._state.client.pipeline(transaction=False)
        ttl_ms = max(1, int(ttl_s * 1000))
        for key, value in items:
            _ = pipe.set(key, value, px=ttl_ms)  # queued: the pipeline returns itself
        await self._state.call(pipe.execute())
