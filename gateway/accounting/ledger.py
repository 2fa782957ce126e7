"""Stage 8, accounting: what each request cost, a ledger over time windows, and budgets.

A request's cost is its rows' share of its batch's measured compute time at the variant's
price per compute-second, plus the variant's price per request. Rows answered from the cache
cost their lookup only (its measured time at the same price); a request answered wholly from
the cache pays no per-request price.

The ledger adds costs up by (window, tenant, route, variant, surface), in memory, bounded:
``retain_windows`` windows of ``max_keys`` rows each and ``max_lines`` rows in all (past
either, new keys add to the window's one ``(other)`` row, counted in
``gateway_ledger_folded_total``). Budgets cap the spend of one tenant or surface per window.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from gateway.errors import BudgetExceeded, SharedStateDown
from gateway.settings import Budget, CostSettings, OnError, Price
from gateway.state import SharedBudgets, SharedLedger, StateUnavailable
from gateway.telemetry import GatewayMetrics
from gateway.types import Charge, Outcome

__all__ = ["Ledger", "LedgerLine", "charge"]

log = logging.getLogger(__name__)

OTHER = "(other)"


def charge(price: Price, outcome: Outcome | None, lookup_ns: int) -> Charge:
    if outcome is None:
        return Charge(0.0, 0.0, 0.0, lookup_ns * 1e-9 * price.compute_second)
    compute_s = outcome.share_ns * 1e-9
    per_second = price.compute_second
    return Charge(compute_s, compute_s * per_second, price.request, lookup_ns * 1e-9 * per_second)


@dataclass(slots=True)
class LedgerLine:
    window_start: int
    tenant: str
    route: str
    variant: str
    surface: str
    requests: int = 0
    rows: int = 0
    cached_rows: int = 0
    compute_s: float = 0.0
    cost: float = 0.0
    # Changed since it was last told to the other replicas (state.backend: redis).
    dirty: bool = field(default=False, compare=False, repr=False)


@dataclass(slots=True)
class _BudgetState:
    budget: Budget
    window_start: int = 0
    window_end: float = 0.0
    spent: float = 0.0
    exceeded: bool = False
    mine: float = 0.0  # what this replica spent in the window (the replicas' total: spent)


class Ledger:
    """Create and use on the event loop (no locks: one thread adds and reads)."""

    def __init__(
        self,
        settings: CostSettings,
        metrics: GatewayMetrics,
        clock: Callable[[], float] = time.time,
        shared: SharedBudgets | None = None,
        on_error: OnError = "fail_closed",
        sync_interval_s: float = 0.25,
        shared_lines: SharedLedger | None = None,
    ) -> None:
        self.settings = settings
        self.shared = shared
        self.shared_lines = shared_lines
        self._dirty: list[LedgerLine] = []  # lines to tell the other replicas
        self._on_error = on_error
        self.sync_interval_s = sync_interval_s
        # Budgets judged on a view older than this are refused (on_error fail_closed).
        self._stale_s = 1.0 + sync_interval_s
        self._synced_at = -math.inf  # time.monotonic() of the last good sync
        self._clock = clock  # Unix seconds: windows start on whole multiples of their length
        self._metrics = metrics
        self._windows: OrderedDict[int, dict[tuple[str, str, str, str], LedgerLine]] = OrderedDict()
        self._lines: dict[tuple[str, str, str, str], LedgerLine] = {}  # the current window's
        self._line_count = 0  # in all the windows kept
        self._folded = metrics.ledger_folded
        self._window_end = 0.0
        self._budgets = [_BudgetState(b) for b in settings.budgets]
        self._configured = len(self._budgets)  # then the keys' (set_key_budgets)
        self._by_tenant = _index(self._budgets, "tenant")
        self._by_surface = _index(self._budgets, "surface")
        # Cost so far by (route, variant), read at scrape time (no metric lock per request).
        self._totals: dict[tuple[str, str], float] = {}
        metrics.counter_function(
            "gateway_cost",
            "Accounted cost of requests by route and variant, in the prices' unit.",
            ["route", "variant"],
            lambda: list(self._totals.items()),
        )
        for state in self._budgets:
            self._watch(state)

    def _watch(self, state: _BudgetState) -> None:
        self._metrics.budget_spent.labels(state.budget.name).set_function(
            functools.partial(self._spent, state)
        )

    def set_key_budgets(self, budgets: list[Budget]) -> None:
        """The budgets the auth keys file gives tenants, in place of those it gave before
        (the settings' budgets stay). A budget kept under the same name keeps its spend."""
        kept = {s.budget.name: s for s in self._budgets[self._configured :]}
        states = []
        for budget in budgets:
            state = kept.pop(budget.name, None)
            if state is None or state.budget.window_s != budget.window_s:
                state = _BudgetState(budget)
                self._watch(state)
            else:
                state.budget = budget
            states.append(state)
        for gone in kept.values():
            self._metrics.budget_spent.remove(gone.budget.name)
        self._budgets = self._budgets[: self._configured] + states
        self._by_tenant = _index(self._budgets, "tenant")

    # -- before serving ----------------------------------------------------------------------

    def check(self, tenant: str, surface: str) -> Budget | None:
        """Apply spent budgets: raise (reject), or return the budget that asks to degrade."""
        if not self._budgets or not self.settings.enabled:
            return None
        degrade = None
        subject = self._subject(tenant, surface)
        if (
            subject
            and self.shared is not None
            and self._on_error == "fail_closed"
            and time.monotonic() - self._synced_at > self._stale_s
        ):
            raise SharedStateDown(
                "budgets are kept in Redis, which has not answered for over "
                f"{self._stale_s:.2g} s; state.budgets_on_error is fail_closed: retry later"
            )
        for state in subject:
            if self._current(state).spent < state.budget.limit:
                continue
            budget = state.budget
            if not state.exceeded:
                state.exceeded = True
                self._metrics.budget_exceeded.labels(budget.name, budget.policy).set(1)
                log.warning(
                    "budget '%s' (%s) spent %.6g of %.6g in its %d s window: policy %s",
                    budget.name,
                    f"tenant {tenant}" if budget.tenant is not None else f"surface {surface}",
                    state.spent,
                    budget.limit,
                    budget.window_s,
                    budget.policy,
                )
            if budget.policy == "reject":
                self._metrics.limited.labels("budget").inc()
                left = state.window_start + budget.window_s - self._clock()
                raise BudgetExceeded(
                    f"budget '{budget.name}' is spent ({state.spent:.6g} of {budget.limit:.6g} "
                    f"in its {budget.window_s} s window); it renews in {max(left, 0):.0f} s"
                )
            if budget.policy == "degrade" and degrade is None:
                degrade = budget
        return degrade

    # -- after serving -----------------------------------------------------------------------

    def add(
        self,
        *,
        tenant: str,
        route: str,
        variant: str,
        surface: str,
        rows: int,
        cached_rows: int,
        cost: Charge,
        budgeted: bool = True,
    ) -> None:
        """Add one answered request; ``budgeted=False`` (a shadow copy): in the ledger, never
        on a budget, since the tenant did not ask for it."""
        if not self.settings.enabled:
            return
        now = self._clock()
        lines = self._lines
        if now >= self._window_end:
            window_s = self.settings.window_s
            start = int(now // window_s) * window_s
            self._window_end = start + window_s
            lines = self._lines = self._windows.setdefault(start, {})
            while len(self._windows) > self.settings.retain_windows:
                self._line_count -= len(self._windows.popitem(last=False)[1])
        key = (tenant, route, variant, surface)
        line = lines.get(key)
        if line is None:
            settings = self.settings
            if len(lines) >= settings.max_keys or self._line_count >= settings.max_lines:
                key = (OTHER, OTHER, OTHER, OTHER)
                line = lines.get(key)
                self._folded.inc()
            if line is None:
                start = int(self._window_end) - settings.window_s
                line = lines[key] = LedgerLine(start, *key)
                self._line_count += 1
        total = cost.total
        if self.shared_lines is not None and not line.dirty:
            line.dirty = True
            self._dirty.append(line)
        line.requests += 1
        line.rows += rows
        line.cached_rows += cached_rows
        line.compute_s += cost.compute_s
        line.cost += total
        totals = self._totals
        totals[(route, variant)] = totals.get((route, variant), 0.0) + total
        if self._budgets and budgeted:
            for state in self._subject(tenant, surface):
                state = self._current(state)
                state.spent += total
                state.mine += total

    # -- shared with other replicas (state.backend: redis) ------------------------------------

    async def sync(self) -> bool:
        """Tell the replicas what this one spent in each budget's current window and take
        their total as the spend; False (counted) when Redis does not answer (this replica's
        spend is told again at the next sync: it is set, never added, so nothing counts
        twice)."""
        if self.shared_lines is not None and self._dirty:
            await self._sync_lines()
        if self.shared is None or not self._budgets:
            return True
        states = [self._current(s) for s in self._budgets]
        sent = [(s, s.window_start, s.mine) for s in states]
        try:
            totals = await self.shared.sync(
                [(s.budget.name, start, mine, s.budget.window_s) for s, start, mine in sent]
            )
        except StateUnavailable:
            self._metrics.state_errors.labels("budgets").inc()
            return False
        self._synced_at = time.monotonic()
        for (state, start, mine), total in zip(sent, totals, strict=True):
            if state.window_start == start:  # not rolled over meanwhile
                state.spent = total + (state.mine - mine)  # and what came since it was sent
        return True

    async def _sync_lines(self) -> None:
        """Tell the replicas this one's totals of the lines changed since the last sync."""
        assert self.shared_lines is not None
        dirty, self._dirty = self._dirty, []
        for line in dirty:
            line.dirty = False
        lines = [
            (
                line.window_start,
                (line.tenant, line.route, line.variant, line.surface),
                [line.requests, line.rows, line.cached_rows, line.compute_s, line.cost],
            )
            for line in dirty
        ]
        keep_s = (self.settings.retain_windows + 1) * self.settings.window_s
        try:
            await self.shared_lines.write(lines, keep_s)
        except StateUnavailable:
            self._metrics.state_errors.labels("ledger").inc()
            for line in dirty:  # told at the next sync
                if not line.dirty:
                    line.dirty = True
                    self._dirty.append(line)

    async def all_lines(self, since: float = 0.0) -> list[LedgerLine]:
        """``lines``, of every replica where the ledger is shared (SharedStateDown when Redis
        does not answer)."""
        if self.shared_lines is None:
            return self.lines(since)
        window_s = self.settings.window_s
        now = self._clock()
        last = int(now // window_s) * window_s
        first = max(
            last - (self.settings.retain_windows - 1) * window_s, int(since // window_s) * window_s
        )
        try:
            read = await self.shared_lines.read(list(range(first, last + 1, window_s)))
        except StateUnavailable as err:
            self._metrics.state_errors.labels("ledger").inc()
            raise SharedStateDown(
                f"the replicas' cost ledger is kept in Redis, which does not answer ({err})"
            ) from None
        lines = [
            LedgerLine(start, *key, int(t[0]), int(t[1]), int(t[2]), t[3], t[4])
            for start, key, t in read
            if start + window_s > since
        ]
        return sorted(lines, key=lambda line: line.window_start)

    async def run_sync(self) -> None:
        """Sync every ``sync_interval_s`` until cancelled."""
        while True:
            if self._budgets or self.shared_lines is not None:
                try:
                    await self.sync()
                except Exception:  # a sync that dies would leave budgets stale for good
                    log.exception("budgets: sync with the shared state failed")
            await asyncio.sleep(self.sync_interval_s)

    def _subject(self, tenant: str, surface: str) -> list[_BudgetState]:
        """The budgets on this tenant or this surface (usually none)."""
        by_tenant = self._by_tenant.get(tenant)
        by_surface = self._by_surface.get(surface)
        if by_surface is None:
            return by_tenant or []
        return by_surface if by_tenant is None else by_tenant + by_surface

    def lines(self, since: float = 0.0) -> list[LedgerLine]:
        """Ledger rows of the windows that end after ``since`` (Unix seconds), oldest first."""
        window_s = self.settings.window_s
        return [
            line
            for start, lines in self._windows.items()
            if start + window_s > since
            for line in lines.values()
        ]

    def budgets(self) -> list[tuple[Budget, int, float]]:
        """Each budget with its current window's start and spend."""
        return [
            (s.budget, s.window_start, s.spent) for s in (self._current(b) for b in self._budgets)
        ]

    def _spent(self, state: _BudgetState) -> float:
        return self._current(state).spent

    def _current(self, state: _BudgetState) -> _BudgetState:
        now = self._clock()
        if now < state.window_end:
            return state
        window_s = state.budget.window_s
        start = int(now // window_s) * window_s
        if start != state.window_start:
            state.window_start, state.window_end, state.spent = start, start + window_s, 0.0
            state.mine = 0.0
            if state.exceeded:
                state.exceeded = False
                self._metrics.budget_exceeded.labels(state.budget.name, state.budget.policy).set(0)
        return state


def _index(states: list[_BudgetState], field: str) -> dict[str, list[_BudgetState]]:
    index: dict[str, list[_BudgetState]] = {}
    for state in states:
        subject = getattr(state.budget, field)
        if subject is not None:
            index.setdefault(subject, []).append(state)
    return index
