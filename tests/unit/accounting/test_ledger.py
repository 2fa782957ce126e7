"""The ledger on an injected Unix clock: costs, windows, bounds, and budgets and their renewal."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.accounting import Ledger, charge
from gateway.errors import BudgetExceeded
from gateway.settings import CostSettings, Price
from gateway.telemetry import GatewayMetrics
from gateway.types import Charge, Outcome
from tests.fakes import FakeClock

# A Unix time on a whole hour (and so on a whole minute): windows start exactly here.
T0 = 1_800_000_000.0
ONE = Charge(compute_s=0.5, compute=0.0, request=1.0, lookup=0.0)  # costs 1.0


def ledger(clock: FakeClock, **settings: Any) -> tuple[Ledger, GatewayMetrics]:
    metrics = GatewayMetrics()
    return Ledger(CostSettings(**settings), metrics, clock=clock), metrics


def add(
    book: Ledger, tenant: str = "t", variant: str = "v", surface: str = "app", **kw: Any
) -> None:
    fields: dict[str, Any] = {"route": "r", "rows": 1, "cached_rows": 0, "cost": ONE, **kw}
    book.add(tenant=tenant, variant=variant, surface=surface, **fields)


def spent(book: Ledger, name: str) -> float:
    return next(s for b, _, s in book.budgets() if b.name == name)


def test_cost_is_the_rows_share_of_the_batch_plus_the_request_price():
    price = Price(compute_second=2.0, request=0.01)
    outcome = Outcome([], 0, compute_ns=4_000_000, batch_rows=8, share_ns=1_000_000)
    cost = charge(price, outcome, lookup_ns=0)
    assert cost.compute_s == pytest.approx(0.001)
    assert cost.total == pytest.approx(0.001 * 2.0 + 0.01)
    hit = charge(price, None, lookup_ns=5_000)  # wholly from the cache: the lookup only
    assert hit.request == 0 and hit.total == pytest.approx(5e-6 * 2.0)


def test_lines_add_up_by_tenant_route_variant_and_surface():
    book, _ = ledger(FakeClock(T0))
    add(book, rows=2)
    add(book, rows=3, cached_rows=1)
    add(book, tenant="u")
    lines = {(ln.tenant, ln.variant): ln for ln in book.lines()}
    assert set(lines) == {("t", "v"), ("u", "v")}
    mine = lines[("t", "v")]
    assert (mine.requests, mine.rows, mine.cached_rows) == (2, 5, 1)
    assert mine.cost == pytest.approx(2.0) and mine.compute_s == pytest.approx(1.0)
    assert mine.window_start == int(T0)


def test_windows_roll_over_on_whole_multiples_of_their_length():
    clock = FakeClock(T0 + 59.0)
    book, _ = ledger(clock, window_s=60)
    add(book)
    clock.advance(1.0)  # T0 + 60: the next window
    add(book)
    add(book)
    lines = book.lines()
    assert [(ln.window_start, ln.requests) for ln in lines] == [(int(T0), 1), (int(T0) + 60, 2)]
    assert [ln.window_start for ln in book.lines(since=T0 + 60)] == [int(T0) + 60]
    assert book.lines(since=T0 + 120) == []


def test_only_retain_windows_windows_are_kept():
    clock = FakeClock(T0)
    book, _ = ledger(clock, window_s=60, retain_windows=2)
    for _ in range(4):
        add(book)
        clock.advance(60.0)
    assert [ln.window_start for ln in book.lines()] == [int(T0) + 120, int(T0) + 180]


def test_past_max_keys_new_keys_add_to_one_other_line_per_window():
    clock = FakeClock(T0)
    book, _ = ledger(clock, max_keys=2)
    add(book, tenant="a")
    add(book, tenant="b")
    add(book, tenant="c")
    add(book, tenant="d")
    add(book, tenant="a")  # a key already there keeps its line
    lines = {ln.tenant: ln for ln in book.lines()}
    assert set(lines) == {"a", "b", "(other)"}
    assert lines["a"].requests == 2 and lines["(other)"].requests == 2
    other = lines["(other)"]
    assert (other.route, other.variant, other.surface) == ("(other)", "(other)", "(other)")
    assert sum(ln.cost for ln in lines.values()) == pytest.approx(5.0)  # nothing is lost
    clock.advance(60.0)
    add(book, tenant="c")  # a new window has room again
    assert {ln.tenant for ln in book.lines(since=T0 + 60)} == {"c"}


def test_a_reject_budget_refuses_once_spent_and_renews_at_its_next_window():
    clock = FakeClock(T0)
    budget = {"name": "r", "tenant": "t", "limit": 2.0, "window_s": 3600, "policy": "reject"}
    book, metrics = ledger(clock, budgets=[budget])
    add(book)
    assert book.check("t", "app") is None
    add(book)  # 2.0 of 2.0: spent
    clock.advance(600.0)
    with pytest.raises(BudgetExceeded, match=r"budget 'r' is spent \(2 of 2.*renews in 3000 s"):
        book.check("t", "app")
    assert book.check("someone-else", "app") is None  # a tenant's budget is the tenant's
    assert metrics.registry.get_sample_value("gateway_budget_spent", {"budget": "r"}) == 2.0
    exceeded = {"budget": "r", "policy": "reject"}
    assert metrics.registry.get_sample_value("gateway_budget_exceeded", exceeded) == 1
    assert metrics.registry.get_sample_value("gateway_limited_total", {"reason": "budget"}) == 1
    clock.advance(3000.0)  # T0 + 3600: the next window
    assert book.check("t", "app") is None
    assert book.budgets()[0][1:] == (int(T0) + 3600, 0.0)
    assert metrics.registry.get_sample_value("gateway_budget_exceeded", exceeded) == 0


def test_a_degrade_budget_names_its_variant_until_the_next_window():
    clock = FakeClock(T0)
    budget = {
        "name": "d",
        "surface": "web",
        "limit": 1.0,
        "window_s": 60,
        "policy": "degrade",
        "degrade_to": "cheap",
    }
    book, _ = ledger(clock, budgets=[budget])
    assert book.check("t", "web") is None
    add(book, surface="web")
    degrade = book.check("anyone", "web")
    assert degrade is not None and degrade.degrade_to == "cheap"
    assert book.check("anyone", "app") is None  # another surface
    clock.advance(60.0)
    assert book.check("anyone", "web") is None
    assert spent(book, "d") == 0.0


def test_an_alert_budget_only_reports():
    clock = FakeClock(T0)
    budget = {"name": "a", "tenant": "t", "limit": 0.5, "policy": "alert"}
    book, metrics = ledger(clock, budgets=[budget])
    add(book)
    assert book.check("t", "app") is None
    exceeded = {"budget": "a", "policy": "alert"}
    assert metrics.registry.get_sample_value("gateway_budget_exceeded", exceeded) == 1


def test_an_unbudgeted_add_is_in_the_ledger_but_on_no_budget():
    clock = FakeClock(T0)
    budget = {"name": "r", "tenant": "t", "limit": 1.5, "policy": "reject"}
    book, _ = ledger(clock, budgets=[budget])
    add(book, variant="shadow", budgeted=False)
    add(book, variant="shadow", budgeted=False)
    assert spent(book, "r") == 0.0
    assert book.check("t", "app") is None
    (line,) = book.lines()
    assert line.variant == "shadow" and line.requests == 2 and line.cost == pytest.approx(2.0)


def test_a_disabled_ledger_keeps_nothing_and_applies_no_budget():
    clock = FakeClock(T0)
    budget = {"name": "r", "tenant": "t", "limit": 0.5, "policy": "reject"}
    book, _ = ledger(clock, enabled=False, budgets=[budget])
    add(book)
    add(book)
    assert book.lines() == []
    assert book.check("t", "app") is None


def test_past_max_lines_in_all_windows_new_keys_add_to_other_and_are_counted():
    """Keys are client text: however many distinct tenants arrive, the rows kept across every
    retained window stay within max_lines (plus one (other) row per window)."""
    clock = FakeClock(T0)
    book, metrics = ledger(clock, window_s=60, retain_windows=3, max_keys=100, max_lines=5)
    for window in range(3):
        for i in range(4):
            add(book, tenant=f"w{window}-t{i}")
        clock.advance(60.0)
    lines = book.lines()
    named = [ln for ln in lines if ln.tenant != "(other)"]
    assert len(named) == 5  # four in the first window, one in the second, then none
    assert sum(ln.requests for ln in lines) == 12  # nothing is lost
    assert sum(ln.cost for ln in lines) == pytest.approx(12.0)
    assert metrics.ledger_folded._value.get() == 7
    # A window that ages out gives its rows back: the first one's four.
    add(book, tenant="fresh")
    assert "w0-t0" not in {ln.tenant for ln in book.lines()}
    assert "fresh" in {ln.tenant for ln in book.lines()}
