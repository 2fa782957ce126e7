"""Rate limits and caps: a token bucket per tenant on an injected clock, and the route cap."""

from __future__ import annotations

import pytest

from gateway.errors import Overloaded, RateLimited
from gateway.routing import ConcurrencyCap, RateLimiter
from gateway.settings import RateLimit
from tests.fakes import FakeClock


def limiter(
    limits: dict[str, RateLimit],
    clock: FakeClock,
    max_tenants: int = 8,
    refused: list[int] | None = None,
) -> RateLimiter:
    on_limited = None if refused is None else (lambda: refused.append(1))
    return RateLimiter(limits, max_tenants, on_limited, clock=clock)


def test_a_new_tenant_may_spend_its_whole_burst_at_once_and_no_more():
    clock = FakeClock(100.0)
    refused: list[int] = []
    bucket = limiter({"a": RateLimit(rate=2.0, burst=3)}, clock, refused=refused)
    for _ in range(3):
        bucket.take("a")
    with pytest.raises(RateLimited, match=r"tenant 'a' is over its rate limit \(2 requests/s"):
        bucket.take("a")
    assert refused == [1]  # every refusal is told, to be counted


def test_the_retry_hint_is_exactly_when_the_next_token_is_there():
    clock = FakeClock()
    bucket = limiter({"a": RateLimit(rate=4.0, burst=1)}, clock)
    bucket.take("a")
    with pytest.raises(RateLimited) as info:
        bucket.take("a")
    assert info.value.retry_after_s == pytest.approx(0.25)
    assert "retry in 250 ms" in str(info.value)
    clock.advance(0.125)  # half a token: still refused, and the hint shrinks by what passed
    with pytest.raises(RateLimited) as again:
        bucket.take("a")
    assert again.value.retry_after_s == pytest.approx(0.125)
    clock.advance(again.value.retry_after_s)
    bucket.take("a")  # refilled as promised


def test_tokens_refill_at_the_rate_and_never_past_the_burst():
    clock = FakeClock()
    bucket = limiter({"a": RateLimit(rate=2.0, burst=3)}, clock)
    for _ in range(3):
        bucket.take("a")
    clock.advance(1.0)  # two tokens back
    bucket.take("a")
    bucket.take("a")
    with pytest.raises(RateLimited):
        bucket.take("a")
    clock.advance(3600.0)  # a long quiet spell refills to the burst, not beyond
    for _ in range(3):
        bucket.take("a")
    with pytest.raises(RateLimited):
        bucket.take("a")


def test_star_gives_each_unlisted_tenant_a_bucket_of_its_own():
    clock = FakeClock()
    bucket = limiter({"a": RateLimit(rate=1.0, burst=1), "*": RateLimit(rate=1.0, burst=1)}, clock)
    bucket.take("a")
    bucket.take("b")  # not "a"'s bucket, and not shared with "c"
    bucket.take("c")
    for tenant in ("a", "b", "c"):
        with pytest.raises(RateLimited):
            bucket.take(tenant)


def test_a_tenant_with_no_limit_and_no_star_is_not_limited():
    clock = FakeClock()
    bucket = limiter({"a": RateLimit(rate=1.0, burst=1)}, clock)
    for _ in range(100):
        bucket.take("b")
    unlimited = limiter({}, clock)
    assert not unlimited.enabled
    for _ in range(100):
        unlimited.take("a")


def test_past_max_tenants_the_least_recently_seen_bucket_is_dropped_and_starts_full():
    clock = FakeClock()
    bucket = limiter({"*": RateLimit(rate=1.0, burst=1)}, clock, max_tenants=2)
    bucket.take("a")
    bucket.take("b")
    bucket.take("c")  # "a" is dropped for room
    with pytest.raises(RateLimited):
        bucket.take("c")
    bucket.take("a")  # a fresh, full bucket


def test_a_cap_refuses_one_more_at_once_and_frees_its_place_on_exit():
    refused: list[int] = []
    cap = ConcurrencyCap(1, "route 'r'", lambda: refused.append(1))
    with cap:
        with pytest.raises(Overloaded, match="route 'r' has 1 requests in flight"), cap:
            pass
        assert cap.in_flight == 1
    assert cap.in_flight == 0 and refused == [1]
    with cap:  # free again
        pass
    uncapped = ConcurrencyCap(None, "route 'u'")
    with uncapped, uncapped, uncapped:
        assert uncapped.in_flight == 3
