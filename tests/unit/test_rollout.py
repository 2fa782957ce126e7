"""The rollout controller on a real route table, with verdicts from a script and a clock of
the test's: steps walked on promote, rolled back on rollback, paused after a long hold, rolled
back after failed verdict calls, rolled back when the candidate breaks its SLO on the attempts
a real router counts, and resumed at its step by a fresh controller."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from gateway.adaptation import rollout as rollout_module
from gateway.adaptation._rollout_io import FileRollouts, MemoryRollouts, VerdictUnavailable
from gateway.adaptation._rollout_steps import step_spec
from gateway.adaptation.rollout import RolloutConflict, RolloutController, slo_breach
from gateway.auth import AuditLog
from gateway.errors import InvalidRequest, ModelNotReady, RuntimeFailure
from gateway.routing import Attempt, LocalRoutes, Router, RouteTable, VariantHealth
from gateway.settings import AuditSettings, RolloutSettings, RolloutSlo, RouteSpec
from gateway.telemetry import GatewayMetrics
from gateway.types import FREE, Answer, InferRequest, InferResponse
from tests.fakes import until

ROUTE = RouteSpec.model_validate(
    {"variants": [{"name": "live", "model": "fraud", "version": "2", "weight": 1}]}
)


class Verdicts:
    """Answers each call with the next scripted outcome (an exception is raised)."""

    def __init__(self, *outcomes: str | Exception) -> None:
        self.outcomes = list(outcomes)
        self.calls: list[tuple[str, str]] = []
        self.since: list[int] = []

    async def verdict(self, model: str, candidate: str, since_us: int = 0) -> dict[str, Any]:
        self.calls.append((model, candidate))
        self.since.append(since_us)
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return {"verdict": outcome, "reasons": [f"auc says {outcome}"], "criteria": []}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def controller(verdicts, records=None, table=None, clock=None, health=None, **settings):
    table = table or RouteTable({"fraud": ROUTE}, history=16)
    rollouts = RolloutController(
        RolloutSettings(poll_interval_s=3600, **settings),  # ticks are the test's
        table,
        LocalRoutes(table),
        records or MemoryRollouts(),
        verdicts,
        AuditLog(AuditSettings(path=None)),
        clock=clock or Clock(),
        health=health,
    )
    return rollouts, table


def weights(table: RouteTable) -> dict[str, float]:
    route = table.get("fraud")
    assert route is not None
    return {v.name: v.weight for v in route.spec.variants}


def test_steps_shadow_then_weights_then_the_candidate_alone():
    shadow = step_spec("fraud", ROUTE, "4", "shadow")
    assert [(v.name, v.weight) for v in shadow.variants] == [("live", 1), ("v4", 0)]
    assert [s.variant for s in shadow.shadows] == ["v4"]
    canary = step_spec("fraud", ROUTE, "4", "25")
    assert [(v.name, v.weight, v.arm) for v in canary.variants] == [
        ("live", 75, "primary"),
        ("v4", 25, "canary"),
    ]
    assert canary.shadows == ()
    full = step_spec("fraud", ROUTE, "4", "100")
    assert [(v.name, v.weight, v.arm) for v in full.variants] == [
        ("live", 0, "primary"),
        ("v4", 1, "primary"),
    ]
    with pytest.raises(InvalidRequest, match="is the stable one"):
        step_spec("fraud", ROUTE, "2", "5")


async def test_promote_walks_every_step_and_the_candidate_becomes_stable():
    rollouts, table = controller(Verdicts("promote", "promote", "promote"))
    rollout = await rollouts.begin("fraud", "4", ["shadow", "5", "50", "100"], "ops")
    assert rollout.state == "running" and weights(table) == {"live": 1, "v4": 0}
    await rollouts.tick("fraud")
    assert weights(table) == {"live": 95, "v4": 5}
    await rollouts.tick("fraud")
    await rollouts.tick("fraud")
    assert rollout.state == "succeeded" and weights(table) == {"live": 0, "v4": 1}
    assert [h["step"] for h in rollout.history] == ["shadow", "5", "50", "100"]
    assert "verdict promote at step 50: auc says promote" in rollout.history[-1]["reason"]
    with pytest.raises(RolloutConflict, match="has ended"):
        await rollouts.pause("fraud", "ops")
    await rollouts.close()


async def test_a_rollback_verdict_restores_the_route_from_before():
    rollouts, table = controller(Verdicts("rollback"))
    rollout = await rollouts.begin("fraud", "3", ["5", "100"], "ops")
    assert weights(table) == {"live": 95, "v3": 5}
    await rollouts.tick("fraud")
    assert rollout.state == "rolled_back"
    assert table.get("fraud").spec == ROUTE
    assert rollout.verdict["verdict"] == "rollback" and rollout.verdict["step"] == "5"
    await rollouts.close()


async def test_a_hold_waits_then_pauses_for_a_person_after_the_timeout():
    clock = Clock()
    rollouts, table = controller(
        Verdicts("hold", "hold", "promote"), clock=clock, hold_timeout_s=60
    )
    rollout = await rollouts.begin("fraud", "4", ["shadow", "100"], "ops")
    await rollouts.tick("fraud")
    assert rollout.state == "holding" and "auc says hold" in rollout.reason
    clock.now += 61
    await rollouts.tick("fraud")
    assert rollout.state == "paused" and "hold_timeout_s" in rollout.reason
    assert weights(table) == {"live": 1, "v4": 0}  # still at its step
    await rollouts.resume("fraud", "ops")
    await rollouts.tick("fraud")
    assert rollout.state == "succeeded"
    await rollouts.close()


class GatedSaves(MemoryRollouts):
    """Records whose saves wait while ``gate`` is shut."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.gate.set()

    async def save(self, route: str, record: dict[str, Any]) -> None:
        await self.gate.wait()
        await super().save(route, record)


def waited_on(lock: asyncio.Lock) -> bool:
    # NOTE: asyncio.Lock keeps no public count of its waiters; the deque is read, never touched
    return bool(lock._waiters)


async def test_a_resume_asks_for_a_verdict_whatever_the_driving_loop_is_doing(monkeypatch):
    # The loop checks the step at every turn (the SLO check) and asks for verdicts only when
    # woken (an hour between polls): a resume arriving while the loop waits for the route's
    # lock behind the resume's own save must still wake it.
    monkeypatch.setattr(rollout_module, "_SLO_CHECK_S", 0.0)
    records = GatedSaves()
    verdicts = Verdicts("promote")
    rollouts, table = controller(verdicts, records=records)
    rollout = await rollouts.begin("fraud", "4", ["shadow", "100"], "ops")
    await rollouts.pause("fraud", "ops")
    records.gate.clear()
    resuming = asyncio.create_task(rollouts.resume("fraud", "ops"))  # saves under the lock
    lock = rollouts._lock("fraud")
    await until(lambda: waited_on(lock), "the loop's check waiting on the lock")
    records.gate.set()
    await resuming
    await until(lambda: rollout.state == "succeeded", "the verdict the resume asks for")
    assert verdicts.calls == [("fraud", "4")] and weights(table) == {"live": 0, "v4": 1}
    await rollouts.close()


async def a_round(rollouts: RolloutController) -> None:
    """Let the driving loop come round to its step check once more: hold the route's lock
    until the loop waits on it."""
    lock = rollouts._lock("fraud")
    async with lock:
        await until(lambda: waited_on(lock), "the loop's check waiting on the lock")


async def test_a_rollout_ending_in_its_loop_leaves_the_next_one_no_wake_up(monkeypatch):
    monkeypatch.setattr(rollout_module, "_SLO_CHECK_S", 0.0)  # the loop checks at every turn
    verdicts = Verdicts("rollback", "promote")
    rollouts, table = controller(verdicts)
    first = await rollouts.begin("fraud", "3", ["5", "100"], "ops")
    await rollouts.pause("fraud", "ops")
    await rollouts.resume("fraud", "ops")  # the loop asks, and ends the rollout itself
    await until(lambda: first.state == "rolled_back", "the rollback")
    await until(lambda: rollouts._tasks["fraud"].done(), "the loop to stop")
    second = await rollouts.begin("fraud", "4", ["5", "100"], "ops")
    await a_round(rollouts)
    await a_round(rollouts)  # a verdict asked in the first round has been sent by now
    assert len(verdicts.calls) == 1 and second.state == "running"  # the next poll: an hour
    assert weights(table) == {"live": 95, "v4": 5}
    await rollouts.close()


async def test_failed_verdict_calls_roll_back_at_the_limit():
    down = VerdictUnavailable("UNAVAILABLE")
    rollouts, table = controller(Verdicts(down, down), max_failures=2)
    rollout = await rollouts.begin("fraud", "4", ["25", "100"], "ops")
    await rollouts.tick("fraud")
    assert rollout.state == "running" and rollout.failures == 1
    await rollouts.tick("fraud")
    assert rollout.state == "rolled_back" and "no verdict 2 times" in rollout.reason
    assert table.get("fraud").spec == ROUTE
    await rollouts.close()


async def test_a_restarted_controller_puts_the_route_back_at_its_step(tmp_path: Path):
    records = FileRollouts(tmp_path / "rollouts.json")
    first, _ = controller(Verdicts("promote"), records=records)
    await first.begin("fraud", "4", ["shadow", "25", "100"], "ops")
    await first.tick("fraud")
    await first.close()
    # a new process: the settings' routes, and the record on disk
    second, table = controller(Verdicts(), records=FileRollouts(tmp_path / "rollouts.json"))
    await second.start()
    assert second.get("fraud").current == "25"
    assert weights(table) == {"live": 75, "v4": 25}
    await second.close()


async def test_a_second_rollout_on_a_route_and_bad_steps_are_refused():
    rollouts, _ = controller(Verdicts())
    with pytest.raises(InvalidRequest, match="last step must be 100"):
        await rollouts.begin("fraud", "4", ["shadow", "50"], "ops")
    await rollouts.begin("fraud", "4", ["shadow", "100"], "ops")
    with pytest.raises(RolloutConflict, match="already has a rollout"):
        await rollouts.begin("fraud", "3", [], "ops")
    await rollouts.abort("fraud", "ops")
    await rollouts.close()


async def test_each_step_is_judged_on_its_own_traffic_unless_told_the_window():
    clock = Clock()
    verdicts = Verdicts("promote", "promote")
    rollouts, _ = controller(verdicts, clock=clock, min_step_s=0)  # evidence: step (default)
    await rollouts.begin("fraud", "4", ["5", "50", "100"], "ops")  # step 5 begins at 1000 s
    clock.now = 1050.0
    await rollouts.tick("fraud")  # step 5 judged on its traffic since 1000 s; 50 begins now
    clock.now = 1100.0
    await rollouts.tick("fraud")  # step 50 judged on its traffic since 1050 s
    assert verdicts.since == [1_000_000_000, 1_050_000_000]
    await rollouts.close()
    window = Verdicts("promote")
    rollouts, _ = controller(window, evidence="window")
    await rollouts.begin("fraud", "4", ["5", "100"], "ops")
    await rollouts.tick("fraud")
    assert window.since == [0]  # the canary policy's whole window
    await rollouts.close()


async def test_a_rollout_past_max_duration_is_rolled_back():
    clock = Clock()
    rollouts, table = controller(Verdicts("hold", "hold"), clock=clock, max_duration_s=100)
    rollout = await rollouts.begin("fraud", "4", ["5", "100"], "ops")  # at 1000 s
    clock.now = 1050.0
    await rollouts.tick("fraud")
    assert rollout.state == "holding" and weights(table) == {"live": 95, "v4": 5}
    clock.now = 1100.0
    await rollouts.tick("fraud")
    assert rollout.state == "rolled_back" and "max_duration_s 100" in rollout.reason
    assert weights(table) == {"live": 1}  # the route from before the rollout
    await rollouts.close()


class Versions:
    """The serving stage behind a real router: version 4 fails (or is slow), others answer."""

    def __init__(self, failing: Exception | None = None, slow_s: float = 0.0) -> None:
        self.failing, self.slow_s = failing, slow_s
        self.seen: list[str] = []

    async def __call__(self, request: InferRequest, attempt: Attempt) -> Answer:
        self.seen.append(attempt.version)
        if attempt.version == "4":
            if self.failing is not None:
                raise self.failing
            await asyncio.sleep(self.slow_s)
        return Answer(InferResponse("fraud", attempt.version, request.id, []), FREE)


def router_for(table: RouteTable, versions: Versions) -> Router:
    return Router(table, GatewayMetrics(), versions, lambda *_: None, lambda *_: {})


async def send(router: Router, n: int) -> int:
    """``n`` requests on the route; how many were answered."""
    answered = 0
    for i in range(n):
        try:
            await router.answer(InferRequest("fraud", id=str(i)), None, None)
            answered += 1
        except RuntimeFailure:
            pass
    return answered


async def test_a_candidate_failing_its_attempts_is_rolled_back_on_its_error_rate():
    # The route falls back to the stable variant: clients see no failure, the SLO does.
    spec = ROUTE.model_copy(update={"fallbacks": ("live",)})
    table = RouteTable({"fraud": RouteSpec.model_validate(spec.model_dump())}, history=16)
    versions = Versions(failing=ModelNotReady("version 4 is not ready"))
    router = router_for(table, versions)
    slo = {"max_error_rate": 0.05, "min_requests": 10}
    rollouts, _ = controller(Verdicts(), table=table, health=router, slo=slo)
    rollout = await rollouts.begin("fraud", "4", ["50", "100"], "ops")
    assert await send(router, 40) == 40
    assert "4" in versions.seen
    await rollouts.tick("fraud", ask=False)  # between verdicts: the SLO alone
    assert rollout.state == "rolled_back", rollout.reason
    failed = rollout.health["failed"]
    assert failed == rollout.health["attempts"] >= 10
    assert f"SLO breach at step 50: {failed} of {failed} attempts failed" in rollout.reason
    assert "at max_error_rate 5.0%" in rollout.reason
    assert weights(table) == {"live": 1}
    # the candidate is no longer watched: its counts stop
    versions.seen.clear()
    await send(router, 5)
    assert rollout.health["attempts"] == failed and versions.seen == ["2"] * 5
    await rollouts.close()


async def test_a_healthy_candidate_keeps_its_step_and_a_new_step_counts_afresh():
    table = RouteTable({"fraud": ROUTE}, history=16)
    router = router_for(table, Versions())
    rollouts, _ = controller(Verdicts("promote"), table=table, health=router)
    rollout = await rollouts.begin("fraud", "4", ["shadow", "50", "100"], "ops")
    for _ in range(20):  # at shadow the candidate scores a copy of each request, once the
        await send(router, 1)  # primary answered (past the shadow cap a copy is skipped)
        for _ in range(5):
            await asyncio.sleep(0)
    await rollouts.tick("fraud", ask=False)
    assert rollout.health == {"attempts": 20, "failed": 0, "slow": 0}
    assert rollout.state == "running"
    await rollouts.tick("fraud")  # promote: step 50, counted afresh
    assert rollout.current == "50" and rollout.health is None
    await router.close()
    await rollouts.close()


async def test_a_slow_candidate_breaks_its_latency_slo():
    table = RouteTable({"fraud": ROUTE}, history=16)
    router = router_for(table, Versions(slow_s=0.02))
    slo = {"max_latency_ms": 5, "latency_quantile": 0.9, "min_requests": 10}
    rollouts, _ = controller(Verdicts(), table=table, health=router, slo=slo)
    rollout = await rollouts.begin("fraud", "4", ["50", "100"], "ops")
    await send(router, 60)
    await rollouts.tick("fraud", ask=False)
    assert rollout.state == "rolled_back", rollout.reason
    assert "answers slower than 5 ms" in rollout.reason
    assert "latency_quantile 0.9 allows 10.0%" in rollout.reason
    await rollouts.close()


def test_one_early_failure_is_no_breach_and_a_handful_of_failures_is():
    slo = RolloutSlo(max_error_rate=0.01, min_requests=10)  # confidence 0.999: below 0.0005
    assert slo_breach(slo, VariantHealth(answered=9, failed=1)) == ""  # 1 in 10: 9.6% at 1%
    assert slo_breach(slo, VariantHealth(answered=98, failed=2)) == ""  # 2 in 100: 26% at 1%
    assert slo_breach(slo, VariantHealth(answered=95, failed=5)) == ""  # 0.34% at 1%
    assert "a chance of 7.1e-05" in slo_breach(slo, VariantHealth(answered=93, failed=7))
    assert "a chance of 1e-20" in slo_breach(slo, VariantHealth(failed=10))  # all fail
    assert slo_breach(slo, VariantHealth(answered=2, failed=5)) == ""  # under min_requests
    looser = RolloutSlo(max_error_rate=0.01, min_requests=10, confidence=0.95)
    assert "a chance of 0.0034" in slo_breach(looser, VariantHealth(answered=95, failed=5))
    assert slo_breach(RolloutSlo(max_error_rate=None), VariantHealth(failed=50)) == ""
