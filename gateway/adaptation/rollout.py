"""Staged rollouts: a candidate version walks a route through a shadow step and canary weights
to 100%, advancing when the sidecar's verdict says ``promote``, rolled back at once on
``rollback``, waiting on ``hold`` (paused for a person after ``hold_timeout_s``). Between
verdicts the candidate's own attempts at its step are held to ``adaptation.rollout.slo`` (error
rate, latency), counted by the router: a breach rolls it back at once, whatever the verdict.

Every step is a route revision made through the route store (this process's table, or the
replicas' shared one), with its reason kept in the rollout's record and written to the audit
log (rpc ``RolloutStep``). Records persist (``_rollout_io``) at every change, so a gateway
restarted mid-rollout puts the route back at its step and goes on judging it. With several
replicas on one Redis, the replica holding the route's lease drives its rollout; the others
keep its record fresh for ``status``, pass commands to the driver, and take the rollout over
when its lease lapses (the driver died).

States::

    running ──hold──> holding ──hold_timeout_s──> paused ──resume──> running
       │  └─promote─> next step ... 100% ──> succeeded
       └─rollback verdict / SLO breach / max_failures ──> rolled_back  (abort ──> aborted)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Protocol

import grpc

from gateway.adaptation._rollout_io import (
    RolloutLeases,
    RolloutRecords,
    VerdictSource,
    VerdictUnavailable,
)
from gateway.adaptation._rollout_slo import slo_breach
from gateway.adaptation._rollout_steps import SHADOW, candidate_variant, step_spec
from gateway.auth import AuditLog
from gateway.errors import GatewayError, InvalidRequest, ModelNotFound, SharedStateDown
from gateway.routing import RouteStore, RouteTable, VariantHealth
from gateway.settings import RolloutSettings, RouteSpec, check_rollout_steps
from gateway.state import StateUnavailable

__all__ = [
    "ACTIVE",
    "HealthWatch",
    "Rollout",
    "RolloutConflict",
    "RolloutController",
    "slo_breach",
]

log = logging.getLogger(__name__)

ACTIVE = frozenset({"running", "holding", "paused"})
_ACTOR = "rollout-controller"  # the audit log's actor for the controller's own steps
_MAX_HISTORY = 64  # step changes kept per rollout record
_SLO_CHECK_S = 1.0  # how often the SLO (and, with leases, commands) is checked between verdicts
_RELAY_S = 10.0  # how long a command passed to the driving replica is waited for
_MAX_COMMANDS = 16  # relayed commands' outcomes kept per rollout record


class HealthWatch(Protocol):
    """Who counts a variant's attempts (the router)."""

    def watch(self, route: str, variant: str, slow_s: float | None = None) -> VariantHealth: ...

    def unwatch(self, route: str, variant: str) -> None: ...


class RolloutConflict(GatewayError):
    """The route's rollout is not in a state that allows this (FAILED_PRECONDITION)."""

    grpc_status: ClassVar[grpc.StatusCode] = grpc.StatusCode.FAILED_PRECONDITION


@dataclass
class Rollout:
    """One route's rollout, as persisted (``asdict``) and shown by ``gateway rollout status``."""

    route: str
    model: str
    candidate: str  # its version
    variant: str  # the variant serving it
    steps: list[str]
    original: dict[str, Any]  # the route's spec before the rollout: where a rollback goes
    step: int = 0
    state: str = "running"
    reason: str = ""
    started_at: float = 0.0
    step_started_at: float = 0.0
    hold_since: float | None = None
    failures: int = 0  # verdict calls failed in a row
    verdict: dict[str, Any] | None = None  # the last one: verdict, reasons, criteria, evidence
    health: dict[str, Any] | None = None  # the candidate's attempts at this step, vs the SLO
    commands: list[dict[str, Any]] = field(default_factory=list)  # relayed: id, action, outcome
    history: list[dict[str, Any]] = field(default_factory=list)  # each step change

    @property
    def current(self) -> str:
        return self.steps[self.step]

    def answered(self, ident: object, action: str, outcome: str) -> None:
        """A relayed command's outcome, kept for its caller (the latest ``_MAX_COMMANDS``)."""
        self.commands.append({"id": ident, "action": action, "outcome": outcome})
        del self.commands[:-_MAX_COMMANDS]

    def expected_spec(self) -> RouteSpec:
        """The route as this rollout's state says it is."""
        original = RouteSpec.model_validate(self.original)
        if self.state in ("rolled_back", "aborted"):
            return original
        return step_spec(self.route, original, self.candidate, self.current)


class RolloutController:
    """Drives every active rollout of this gateway, one task each."""

    def __init__(
        self,
        settings: RolloutSettings,
        table: RouteTable,
        store: RouteStore,
        records: RolloutRecords,
        verdicts: VerdictSource | None,
        audit: AuditLog,
        clock: Callable[[], float] = time.time,
        health: HealthWatch | None = None,
        leases: RolloutLeases | None = None,
    ) -> None:
        self.settings = settings
        self._table = table  # read: the routes in force
        self._store = store  # changed: through it, so the replicas follow
        self._records_store = records
        self._verdicts = verdicts
        self._audit = audit
        self._clock = clock
        self._watch = health
        self._leases = leases  # None: this gateway alone drives its rollouts
        self._follower: asyncio.Task[None] | None = None
        self._health: dict[str, VariantHealth] = {}  # route -> its candidate's, this step
        self._rollouts: dict[str, Rollout] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._wake: dict[str, asyncio.Event] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._unsaved: set[str] = set()  # routes whose record failed to save: saved again
        self._stuck: dict[str, str] = {}  # route -> why it could not be resumed (said once)

    def samples(self) -> list[tuple[tuple[str, str, str, str], float]]:
        """``gateway_rollout_traffic``: per rollout (route, candidate, step, state), the share
        of the route's traffic its candidate answers now (0 at shadow, 1 once stable); read at
        scrape time."""
        out = []
        for route, r in list(self._rollouts.items()):
            share = 0.0 if r.current == "shadow" else float(r.current) / 100
            if r.state == "rolled_back":
                share = 0.0
            out.append(((route, r.candidate, r.current, r.state), share))
        return out

    # -- life cycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the persisted rollouts; each active one's route is put back at its step (a
        restarted gateway with state.backend memory starts from the settings' routes). With
        leases, the follower does that for each rollout no replica drives."""
        try:
            stored = await self._records_store.load()
        except (OSError, ValueError, StateUnavailable) as err:
            stored = {}
            log.error("rollouts: cannot read %s (%s): none resumed", self._records_store.where, err)
        for route, raw in stored.items():
            self._rollouts[route] = Rollout(**raw)
        log.info("rollouts: kept in %s", self._records_store.where)
        if self._leases is not None:
            self._follower = asyncio.create_task(self._follow(), name="rollouts: follow")
            return
        for rollout in list(self._rollouts.values()):
            if rollout.state in ACTIVE:
                await self._resume_here(rollout, "resumed after a restart")

    async def _resume_here(self, rollout: Rollout, reason: str) -> bool:
        """Drive ``rollout`` from this process: its route at its step, its candidate watched.
        A rollout whose route is gone ends (aborted); False when it is not driven here."""
        route = rollout.route
        try:
            await self._apply(rollout, rollout.expected_spec(), reason)
        except ModelNotFound as err:
            rollout.state, rollout.reason = "aborted", f"cannot resume: {err}"
            await self._save(rollout)
            log.error("rollout %s: %s", route, rollout.reason)
            return False
        except (GatewayError, StateUnavailable) as err:
            if self._stuck.get(route) != str(err):  # said once, not every second
                self._stuck[route] = str(err)
                log.error("rollout %s: cannot resume at its step: %s", route, err)
            return False
        self._stuck.pop(route, None)
        self._watch_step(rollout)
        log.info("rollout %s: %s at step %s (%s)", route, reason, rollout.current, rollout.state)
        self._spawn(route)
        return True

    async def _follow(self) -> None:
        """With leases, every ``_SLO_CHECK_S``: the records as stored (what ``status`` shows
        of rollouts another replica drives), and any active one nobody drives taken over."""
        while True:
            try:
                await self._adopt()
            except StateUnavailable as err:
                log.debug("rollouts: cannot read %s (%s)", self._records_store.where, err)
            except Exception:  # following must go on
                log.exception("rollouts: following the shared records failed")
            await asyncio.sleep(_SLO_CHECK_S)

    async def _adopt(self, only: str | None = None) -> None:
        """Read the shared records; take over each active rollout no replica drives (with
        ``only``, that route's alone). StateUnavailable when Redis does not answer."""
        assert self._leases is not None
        if only is None:
            stored = await self._records_store.load()
        else:
            one = await self._records_store.load_one(only)
            stored = {} if one is None else {only: one}
        for route, raw in stored.items():
            if self._driving(route) or self._lock(route).locked():
                continue  # driven here, or being started or changed here now
            self._rollouts[route] = rollout = Rollout(**raw)
            if rollout.state not in ACTIVE or not await self._leases.hold(route):
                continue  # ended, or another replica drives it
            async with self._lock(route):
                # NOTE: read again under the lease: the last driver may have written after
                # the read above, before its lease lapsed.
                fresh = await self._records_store.load_one(route)
                if fresh is not None:
                    self._rollouts[route] = rollout = Rollout(**fresh)
                resumed = False
                if rollout.state in ACTIVE:
                    reason = f"driven by replica {self._leases.owner[:8]} (no replica held it)"
                    resumed = await self._resume_here(rollout, reason)
                if not resumed:
                    await self._leases.release(route)

    async def _still_driving(self, route: str) -> bool:
        if self._leases is None:
            return True
        try:
            return await self._leases.hold(route)
        except StateUnavailable:
            return False

    def _driving(self, route: str) -> bool:
        task = self._tasks.get(route)
        return task is not None and not task.done()

    async def close(self) -> None:
        driven = [route for route in self._tasks if self._driving(route)]
        tasks = list(self._tasks.values())
        if self._follower is not None:
            tasks.append(self._follower)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        if self._leases is not None:  # let another replica take them over at once
            for route in driven:
                with contextlib.suppress(StateUnavailable):
                    await self._leases.release(route)
        close = getattr(self._verdicts, "close", None)
        if close is not None:
            await close()

    # -- what the admin service calls ------------------------------------------------------

    def get(self, route: str) -> Rollout:
        rollout = self._rollouts.get(route)
        if rollout is None:
            raise ModelNotFound(f"route '{route}' has no rollout")
        return rollout

    def is_active(self, route: str) -> bool:
        rollout = self._rollouts.get(route)
        return rollout is not None and rollout.state in ACTIVE

    async def status(self, route: str) -> Rollout:
        """The route's rollout as it is now (read from the shared records when another
        replica drives it)."""
        await self._refresh(route)
        return self.get(route)

    async def active(self, route: str) -> bool:
        await self._refresh(route)
        return self.is_active(route)

    async def _refresh(self, route: str) -> None:
        if self._leases is not None and not self._driving(route):
            with _shared():
                await self._adopt(route)

    async def begin(self, route: str, candidate: str, steps: list[str], actor: str) -> Rollout:
        """Start walking ``candidate`` through ``steps`` on ``route``: its first step now."""
        if self._verdicts is None:
            raise RolloutConflict(
                "no sidecar to judge a rollout: set adaptation.rollout.sidecar or events.sidecar"
            )
        try:
            check_rollout_steps(tuple(steps or self.settings.steps))
        except ValueError as err:
            raise InvalidRequest(f"steps: {err}") from None
        await self._refresh(route)
        async with self._lock(route):
            if self.is_active(route):
                raise RolloutConflict(
                    f"route '{route}' already has a rollout ({self.get(route).state} at step "
                    f"{self.get(route).current}): abort it first"
                )
            if self._leases is not None:
                with _shared():
                    if not await self._leases.hold(route):
                        raise RolloutConflict(
                            f"route '{route}': another replica is starting a rollout"
                        )
                    await self._leases.clear(route)  # commands left for an earlier rollout
            try:
                rollout = await self._begin(route, candidate, steps, actor)
            except BaseException:
                if self._leases is not None:
                    with contextlib.suppress(StateUnavailable):
                        await self._leases.release(route)
                raise
        self._spawn(route)
        return rollout

    async def _begin(self, route: str, candidate: str, steps: list[str], actor: str) -> Rollout:
        """The rollout's record and its first step (under the route's lock): nothing of it
        kept when the step cannot be taken."""
        current = self._table.get(route)
        if current is None:
            raise ModelNotFound(f"no route named '{route}'")
        variant = candidate_variant(route, current.spec, candidate)
        now = self._clock()
        rollout = Rollout(
            route=route,
            model=variant.model or "",
            candidate=candidate,
            variant=variant.name,
            steps=list(steps or self.settings.steps),
            original=current.spec.model_dump(mode="json"),
            started_at=now,
            step_started_at=now,
        )
        step_spec(route, current.spec, candidate, rollout.current)  # refuses a bad route
        before = self._rollouts.get(route)
        self._rollouts[route] = rollout
        reason = f"rollout of version {candidate} started by {actor}: step {rollout.current}"
        try:
            await self._step_to(rollout, 0, reason, actor)
        except BaseException:
            if before is None:
                self._rollouts.pop(route, None)
            else:
                self._rollouts[route] = before
            raise
        return rollout

    async def pause(self, route: str, actor: str) -> Rollout:
        return await self._act(route, {"action": "pause", "actor": actor})

    async def resume(self, route: str, actor: str) -> Rollout:
        return await self._act(route, {"action": "resume", "actor": actor})

    async def abort(
        self, route: str, actor: str, reason: str = "", state: str = "aborted"
    ) -> Rollout:
        """End the rollout; the route goes back to its spec from before it."""
        command = {"action": "abort", "actor": actor, "reason": reason, "state": state}
        return await self._act(route, command)

    async def _act(self, route: str, command: dict[str, Any]) -> Rollout:
        """Carry out ``command`` here when this replica drives the rollout (or can take it
        over), else leave it for the one that does and wait until it says it applied it."""
        if self._leases is None:
            return await self._do(route, command)
        with _shared():
            if not self._driving(route):
                await self._adopt(route)
            if self._driving(route) and await self._leases.hold(route):
                return await self._do(route, command)
            return await self._relay(route, command)

    async def _do(self, route: str, command: dict[str, Any]) -> Rollout:
        """Pause, resume or abort here (this replica drives it). A relayed command's outcome
        goes into the record with the change it makes, for the replica waiting on it."""
        action, actor = command["action"], command["actor"]
        async with self._lock(route):
            rollout = self._active(route)
            _check(rollout, action)
            if "id" in command:
                rollout.answered(command["id"], action, "ok")
            before = (rollout.state, rollout.reason, rollout.hold_since)
            try:
                if action == "pause":
                    rollout.state = "paused"
                    rollout.reason = f"paused by {actor} at step {rollout.current}"
                    await self._save(rollout, strict=True)
                elif action == "resume":
                    rollout.state, rollout.hold_since = "running", None
                    rollout.reason = f"resumed by {actor} at step {rollout.current}"
                    await self._save(rollout, strict=True)
                else:
                    reason = command.get("reason") or f"aborted by {actor}"
                    await self._end(rollout, command.get("state") or "aborted", reason, actor)
            except BaseException:
                rollout.state, rollout.reason, rollout.hold_since = before
                if "id" in command:
                    rollout.commands.pop()
                raise
        if action == "resume":
            self._wake[route].set()
        return rollout

    async def _relay(self, route: str, command: dict[str, Any]) -> Rollout:
        """Leave ``command`` for the driving replica, and wait for the record to say what
        became of it (applied, refused, or the rollout ended first)."""
        assert self._leases is not None
        rollout = self._active(route)
        _check(rollout, command["action"])
        loop = asyncio.get_running_loop()
        ident = uuid.uuid4().hex
        until = loop.time() + _RELAY_S
        # NOTE: the driver drops a command past its deadline (on its own wall clock): one the
        # caller stopped waiting for is not applied later behind its back.
        expires = self._clock() + _RELAY_S
        await self._leases.post(
            route, {**command, "id": ident, "rollout": rollout.started_at, "expires": expires}
        )
        while loop.time() < until:
            await asyncio.sleep(0.1)
            stored = await self._records_store.load_one(route)
            if stored is None:
                continue
            now = self._rollouts[route] = Rollout(**stored)
            done = next((c for c in now.commands if c.get("id") == ident), None)
            if done is not None:
                if done["outcome"] != "ok":
                    raise RolloutConflict(f"route '{route}': {done['outcome']}")
                return now
            if now.started_at != rollout.started_at or now.state not in ACTIVE:
                raise RolloutConflict(
                    f"route '{route}': the rollout ended ({now.state}: {now.reason}) before "
                    f"the replica driving it took '{command['action']}'"
                )
        raise RolloutConflict(
            f"route '{route}': the replica driving its rollout did not take "
            f"'{command['action']}' within {_RELAY_S:g} s; it is dropped (see `gateway rollout "
            "status`)"
        )

    async def _take_commands(self, route: str, rollout: Rollout) -> None:
        """Carry out the commands other replicas left for this rollout (``_do`` records each
        one's outcome, and a resume wakes the loop; a refused or late one is recorded
        here)."""
        assert self._leases is not None
        for command in await self._leases.take(route):
            if command.get("rollout") != rollout.started_at:
                continue  # for an earlier rollout of the route: it ended, its caller knows
            outcome = ""
            if self._clock() > float(command.get("expires", 0)):
                outcome = "expired: the replica driving it took it too late"
            else:
                try:
                    await self._do(route, command)
                except GatewayError as err:
                    outcome = str(err)
            if outcome:
                rollout.answered(command.get("id"), command["action"], outcome)
                await self._save(rollout)

    # -- the controller's loop --------------------------------------------------------------

    def _spawn(self, route: str) -> None:
        task = self._tasks.get(route)
        if task is None or task.done():
            # NOTE: a wake-up of its own: the route's last rollout set the old one as it ended
            # (``_end``), and reusing it would ask this one's first verdict at once.
            self._wake[route] = asyncio.Event()
            self._tasks[route] = asyncio.create_task(self._drive(route), name=f"rollout {route}")

    async def _drive(self, route: str) -> None:
        """Every ``_SLO_CHECK_S``: renew the lease and take commands (with leases), check the
        candidate's SLO (at any step, paused too); every poll interval (or when woken:
        resumed) ask for a verdict, in a task of its own so that a slow sidecar holds none of
        that up, and act on it once it answers."""
        wake = self._wake[route]
        loop = asyncio.get_running_loop()
        poll = self.settings.poll_interval_s
        ask_at = loop.time() + poll
        asking: asyncio.Task[tuple[int, dict[str, Any] | None, str]] | None = None
        wanted = False  # a verdict asked for at once (resumed), not asked yet
        try:
            while (rollout := self._rollouts.get(route)) is not None and rollout.state in ACTIVE:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), min(poll, _SLO_CHECK_S))
                # NOTE: cleared here only, with no await since the wait: a resume waking the
                # loop anywhere further on in this round (its save and ours share a lock) stays
                # set for the next round's wait, instead of being cleared unseen.
                if wake.is_set():
                    wake.clear()
                    wanted = True
                try:
                    if self._leases is not None:
                        if not await self._leases.hold(route):
                            log.warning("rollout %s: another replica holds its lease now", route)
                            self._unwatch(rollout)
                            return
                        await self._take_commands(route, rollout)
                    if route in self._unsaved:
                        await self._save(rollout)
                    await self.tick(route, ask=False)
                except StateUnavailable:
                    continue  # whether this replica still drives it is not known: wait
                except Exception:  # the rollout must go on being judged
                    log.exception("rollout %s: checking the step failed", route)
                if rollout.state not in ("running", "holding"):
                    continue
                if wanted and asking is not None:
                    asking.cancel()  # asked before the resume: the resume asks afresh
                    asking = None
                if asking is not None and asking.done():
                    at, verdict, failure = asking.result()
                    asking = None
                    try:
                        await self._judge(route, at, verdict, failure)
                    except Exception:
                        log.exception("rollout %s: judging the step failed", route)
                elif asking is None and (wanted or loop.time() >= ask_at):
                    wanted = False
                    ask_at = loop.time() + poll
                    asking = asyncio.create_task(self._ask(rollout), name=f"verdict {route}")
        finally:
            if asking is not None:
                asking.cancel()
        if self._leases is not None:  # ended here: nothing left to drive
            with contextlib.suppress(StateUnavailable):
                await self._leases.release(route)

    async def tick(self, route: str, ask: bool = True) -> None:
        """Check the candidate's SLO; with ``ask``, ask for the verdict and act on it:
        advance, roll back, or wait."""
        rollout = self._rollouts[route]
        if not ask:
            async with self._lock(route):
                if rollout.state in ACTIVE:
                    await self._check_slo(rollout)
            return
        at, verdict, failure = await self._ask(rollout)
        await self._judge(route, at, verdict, failure)

    async def _ask(self, rollout: Rollout) -> tuple[int, dict[str, Any] | None, str]:
        """The sidecar's verdict on the rollout's step (or None and why not), with the step
        it was asked at."""
        assert self._verdicts is not None
        at = rollout.step
        # Each step is judged on its own traffic (adaptation.rollout.evidence: step), or on the
        # canary policy's whole window (window).
        since_us = 0
        if self.settings.evidence == "step":
            since_us = int(rollout.step_started_at * 1_000_000)
        try:
            verdict = await self._verdicts.verdict(rollout.model, rollout.candidate, since_us)
        except VerdictUnavailable as err:
            return at, None, str(err)
        except Exception as err:  # a failed call like any other, not the end of the loop
            log.exception("rollout %s: asking for the verdict failed", rollout.route)
            return at, None, f"{type(err).__name__}: {err}"
        return at, verdict, ""

    async def _judge(
        self, route: str, at: int, verdict: dict[str, Any] | None, failure: str
    ) -> None:
        """Act on the verdict asked at step ``at``: advance, roll back, or wait."""
        rollout = self._rollouts[route]
        step = rollout.steps[at]
        async with self._lock(route):
            if rollout.state not in ("running", "holding") or rollout.step != at:
                return  # paused, aborted or moved on while the sidecar was asked
            if not await self._still_driving(route):
                return  # the lease lapsed while the sidecar was asked: another drives it
            if await self._check_slo(rollout):
                return
            now = self._clock()
            limit_s = self.settings.max_duration_s
            if limit_s is not None and now - rollout.started_at >= limit_s:
                reason = (
                    f"not finished {now - rollout.started_at:.0f} s after it started "
                    f"(max_duration_s {limit_s:g}), at step {step}"
                )
                await self._end(rollout, "rolled_back", reason, _ACTOR)
                return
            if verdict is None:
                rollout.failures += 1
                limit = self.settings.max_failures
                if rollout.failures >= limit:
                    reason = f"no verdict {limit} times in a row at step {step}: {failure}"
                    await self._end(rollout, "rolled_back", reason, _ACTOR)
                else:
                    rollout.reason = f"no verdict ({rollout.failures} of {limit}): {failure}"
                    await self._save(rollout)
                return
            rollout.failures = 0
            rollout.verdict = {"at": now, "step": step, **_summary(verdict)}
            outcome = verdict.get("verdict")
            why = "; ".join(verdict.get("reasons", []))
            if outcome == "rollback":
                await self._end(
                    rollout, "rolled_back", f"verdict rollback at step {step}: {why}", _ACTOR
                )
            elif outcome == "promote":
                if now - rollout.step_started_at < self.settings.min_step_s:
                    rollout.reason = f"verdict promote at step {step}; the step lasts min_step_s"
                    await self._save(rollout)
                    return
                reason = f"verdict promote at step {step}: {why}"
                await self._step_to(rollout, rollout.step + 1, reason, _ACTOR)
            else:
                if rollout.hold_since is None:
                    rollout.hold_since = now
                rollout.state = "holding"
                rollout.reason = f"verdict hold at step {step}: {why}"
                if now - rollout.hold_since >= self.settings.hold_timeout_s:
                    rollout.state = "paused"
                    rollout.reason = (
                        f"paused: the verdict held for {now - rollout.hold_since:.0f} s "
                        f"(hold_timeout_s) at step {step}: {why}"
                    )
                    self._audit.record(_ACTOR, "RolloutStep", "OK", route, detail=rollout.reason)
                await self._save(rollout)

    async def _check_slo(self, rollout: Rollout) -> bool:
        """Roll back on a breach of adaptation.rollout.slo by the candidate at this step;
        True when it did."""
        health = self._health.get(rollout.route)
        if health is None:
            return False
        rollout.health = {
            "attempts": health.attempts,
            "failed": health.failed,
            "slow": health.slow,
        }
        breach = slo_breach(self.settings.slo, health)
        if breach:
            reason = f"SLO breach at step {rollout.current}: {breach}"
            await self._end(rollout, "rolled_back", reason, _ACTOR)
        return bool(breach)

    def _watch_step(self, rollout: Rollout) -> None:
        """Count the candidate's attempts afresh for this step (none once it ended)."""
        if self._watch is None:
            return
        if rollout.state not in ACTIVE:
            self._unwatch(rollout)
            return
        slow_ms = self.settings.slo.max_latency_ms
        slow_s = None if slow_ms is None else slow_ms / 1000
        self._health[rollout.route] = self._watch.watch(rollout.route, rollout.variant, slow_s)
        rollout.health = None

    def _unwatch(self, rollout: Rollout) -> None:
        if self._watch is not None:
            self._watch.unwatch(rollout.route, rollout.variant)
        self._health.pop(rollout.route, None)

    # -- changes ------------------------------------------------------------------------------

    async def _step_to(self, rollout: Rollout, index: int, reason: str, actor: str) -> None:
        """Move to step ``index``: the record changes only once the route did."""
        before = (rollout.step, rollout.step_started_at, rollout.hold_since, rollout.state)
        rollout.step = index
        rollout.step_started_at = self._clock()
        rollout.hold_since = None
        final = rollout.current != SHADOW and float(rollout.current) >= 100
        rollout.state = "succeeded" if final else "running"
        if final:
            reason += f"; version {rollout.candidate} is the stable one"
        try:
            await self._apply(rollout, rollout.expected_spec(), reason, actor)
        except BaseException:
            rollout.step, rollout.step_started_at, rollout.hold_since, rollout.state = before
            raise
        self._watch_step(rollout)

    async def _end(self, rollout: Rollout, state: str, reason: str, actor: str) -> None:
        """End the rollout (the route back as before it, or the candidate stable): the record
        changes only once the route did, so a failure leaves it to be tried again."""
        before = rollout.state
        rollout.state = state
        try:
            await self._apply(rollout, rollout.expected_spec(), reason, actor)
        except BaseException:
            rollout.state = before
            raise
        self._watch_step(rollout)
        log.warning("rollout %s: %s", rollout.route, reason)
        self._wake.setdefault(rollout.route, asyncio.Event()).set()

    async def _apply(
        self, rollout: Rollout, spec: RouteSpec, reason: str, actor: str = _ACTOR
    ) -> None:
        """``spec`` in force on the route (a revision, unless it is so already), the record
        saved with the change and its reason, and a line on the audit log."""
        route = rollout.route
        before = self._table.get(route)

        def mutate(table: RouteTable) -> int:
            if table.get(route) is None:
                raise ModelNotFound(f"route '{route}' is gone")
            # The decision threshold is the route's own, whatever step: one set or raised
            # during the rollout stays.
            return table.serve(route, spec).revision

        revision = await self._store.change(mutate, 0)
        rollout.reason = reason
        rollout.history.append(
            {
                "at": self._clock(),
                "step": rollout.current,
                "state": rollout.state,
                "revision": revision,
                "reason": reason,
            }
        )
        del rollout.history[:-_MAX_HISTORY]
        await self._save(rollout)
        self._audit.record(
            actor,
            "RolloutStep",
            "OK",
            route,
            {route: before.revision if before is not None else None},
            {route: revision},
            detail=reason,
        )
        log.info("rollout %s: revision %d: %s", route, revision, reason)

    async def _save(self, rollout: Rollout, strict: bool = False) -> None:
        """Persist the record. A failure is SharedStateDown with ``strict`` (the caller undoes
        its change); else logged, and the driving loop saves it again."""
        try:
            await self._records_store.save(rollout.route, asdict(rollout))
        except (OSError, StateUnavailable) as err:
            if strict:
                raise SharedStateDown(
                    f"rollouts: cannot write {self._records_store.where}: {err}"
                ) from None
            self._unsaved.add(rollout.route)
            log.error("rollouts: cannot write %s (%s)", self._records_store.where, err)
        else:
            self._unsaved.discard(rollout.route)

    def _active(self, route: str) -> Rollout:
        rollout = self.get(route)
        if rollout.state not in ACTIVE:
            raise RolloutConflict(f"route '{route}': its rollout has ended ({rollout.state})")
        return rollout

    def _lock(self, route: str) -> asyncio.Lock:
        return self._locks.setdefault(route, asyncio.Lock())


@contextlib.contextmanager
def _shared() -> Iterator[None]:
    """Redis not answering, for an admin call: UNAVAILABLE naming it."""
    try:
        yield
    except StateUnavailable as err:
        raise SharedStateDown(f"rollouts: the shared state does not answer: {err}") from None


def _check(rollout: Rollout, action: str) -> None:
    if action == "resume" and rollout.state != "paused":
        raise RolloutConflict(
            f"route '{rollout.route}': the rollout is {rollout.state}, not paused"
        )


def _summary(verdict: dict[str, Any]) -> dict[str, Any]:
    """What a status shows of a verdict: the outcome, its reasons, its criteria's intervals,
    each version's evidence."""
    keep = ("verdict", "stable", "candidate", "reasons", "criteria", "evidence", "truncated")
    return {k: verdict[k] for k in keep if k in verdict}
