"""Stage 2, limits: a token bucket per tenant, and a cap on a route's requests in flight."""

from __future__ import annotations

import time
from collections.abc import Callable

from cachetools import LRUCache

from gateway.errors import DeadlineExceeded, Overloaded, RateLimited, SharedStateDown
from gateway.settings import OnError, RateLimit
from gateway.state import PastDeadline, SharedLimits, StateUnavailable

__all__ = ["ConcurrencyCap", "RateLimiter"]

_ANY = "*"


class _Bucket:
    __slots__ = ("level", "stamp")

    def __init__(self, level: float, stamp: float) -> None:
        self.level = level
        self.stamp = stamp


class RateLimiter:
    """Token buckets by tenant: ``limits[tenant]``, else ``limits["*"]`` (a bucket each).

    A tenant with neither is not limited. Buckets are kept for at most ``max_tenants``
    tenants, least recently seen dropped first (a dropped tenant starts again full).

    With ``shared`` (state.backend: redis) the buckets live in Redis, spent by every replica
    (``take_shared``); when Redis does not answer, ``on_error`` says whether the request goes
    unlimited (fail_open) or is refused (fail_closed), ``on_state_error`` counts it.
    """

    def __init__(
        self,
        limits: dict[str, RateLimit],
        max_tenants: int,
        on_limited: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        shared: SharedLimits | None = None,
        on_error: OnError = "fail_open",
        on_state_error: Callable[[], None] | None = None,
    ) -> None:
        self.shared = shared
        self._on_error = on_error
        self._on_state_error = on_state_error
        self._configured = dict(limits)
        self._limits = limits
        self._buckets: LRUCache[str, _Bucket] = LRUCache(maxsize=max_tenants)
        self._on_limited = on_limited  # told of every refusal, to count it
        self._clock = clock  # seconds
        self.enabled = bool(limits)

    def set_key_limits(self, limits: dict[str, RateLimit]) -> None:
        """Tenants' limits from the auth keys file, over the settings' (replacing the keys'
        limits set before); a tenant's bucket keeps its level."""
        self._limits = {**self._configured, **limits}
        self.enabled = bool(self._limits)

    async def take_shared(self, tenant: str, deadline: float | None = None) -> None:
        """``take`` on the replicas' shared buckets (one Redis round trip, bounded by the
        request's ``deadline`` too: DEADLINE_EXCEEDED when that comes first)."""
        if not self.enabled:
            return
        limit = self._limits.get(tenant) or self._limits.get(_ANY)
        if limit is None:
            return
        assert self.shared is not None
        try:
            wait_s = await self.shared.take(tenant, limit.rate, limit.burst, deadline)
        except PastDeadline:
            raise DeadlineExceeded(
                "the request's deadline passed while its rate limit was checked in Redis"
            ) from None
        except StateUnavailable as err:
            if self._on_state_error is not None:
                self._on_state_error()
            if self._on_error == "fail_closed":
                raise SharedStateDown(
                    f"rate limits are kept in Redis, which does not answer ({err}); "
                    "state.limits_on_error is fail_closed: retry later"
                ) from None
            return
        if wait_s is not None:
            self._refuse(tenant, limit, wait_s)

    def _refuse(self, tenant: str, limit: RateLimit, retry_s: float) -> None:
        if self._on_limited is not None:
            self._on_limited()
        raise RateLimited(
            f"tenant '{tenant}' is over its rate limit ({limit.rate:g} requests/s, burst "
            f"{limit.burst}); retry in {retry_s * 1000:.0f} ms",
            retry_s,
        )

    def take(self, tenant: str) -> None:
        """Spend one token of ``tenant``'s bucket, or raise RateLimited with when to retry."""
        if not self.enabled:
            return
        limit = self._limits.get(tenant) or self._limits.get(_ANY)
        if limit is None:
            return
        now = self._clock()
        bucket = self._buckets.get(tenant)
        if bucket is None:
            bucket = self._buckets[tenant] = _Bucket(float(limit.burst), now)
        else:
            bucket.level = min(limit.burst, bucket.level + (now - bucket.stamp) * limit.rate)
            bucket.stamp = now
        if bucket.level >= 1.0:
            bucket.level -= 1.0
            return
        self._refuse(tenant, limit, (1.0 - bucket.level) / limit.rate)


class ConcurrencyCap:
    """At most ``limit`` requests at once; one more is refused at once, never queued
    (``on_refused`` is told, to count it)."""

    __slots__ = ("in_flight", "limit", "on_refused", "what")

    def __init__(
        self, limit: int | None, what: str, on_refused: Callable[[], None] | None = None
    ) -> None:
        self.limit = limit
        self.what = what
        self.on_refused = on_refused
        self.in_flight = 0

    def try_acquire(self) -> bool:
        """Take a place if there is one (``release`` gives it back)."""
        if self.limit is not None and self.in_flight >= self.limit:
            return False
        self.in_flight += 1
        return True

    def release(self) -> None:
        self.in_flight -= 1

    def __enter__(self) -> ConcurrencyCap:
        if not self.try_acquire():
            if self.on_refused is not None:
                self.on_refused()
            raise Overloaded(
                f"{self.what} has {self.in_flight} requests in flight, its max_concurrency; "
                "retry later"
            )
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
