"""Two rollout controllers of two replicas sharing a real Redis, in one process with verdicts
from a script: one drives the rollout (its lease), the other passes it commands and hears what
became of each, a resume asking for one verdict; a slow verdict does not let the driver's
lease lapse; a command left for an earlier rollout of the route is not applied to the next;
records written the old way (one document) are moved, so a rollout under way at an upgrade
goes on."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.adaptation._rollout_io import RedisRollouts, RolloutLeases
from gateway.adaptation.rollout import RolloutConflict, RolloutController
from gateway.auth import AuditLog
from gateway.routing import LocalRoutes, RouteTable
from gateway.settings import AuditSettings, RolloutSettings, RouteSpec, StateSettings
from gateway.state import RedisState
from tests.services import RedisServer

pytestmark = pytest.mark.integration

ROUTE = RouteSpec.model_validate(
    {"variants": [{"name": "live", "model": "fraud", "version": "2", "weight": 1}]}
)
LEASE_S = 3.0


class Verdicts:
    """``hold`` at once, or, while ``gate`` is clear, an answer only once it is set."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.gate.set()
        self.asked = 0

    async def verdict(self, model: str, candidate: str, since_us: int = 0) -> dict[str, Any]:
        self.asked += 1
        await self.gate.wait()
        return {"verdict": "hold", "reasons": ["0 labelled rows"], "criteria": []}


class Replica:
    def __init__(
        self, redis: RedisServer, verdicts: Verdicts, poll_interval_s: float = 0.2
    ) -> None:
        self.state = RedisState(StateSettings(backend="redis", redis_url=redis.url))
        self.table = RouteTable({"fraud": ROUTE}, history=16)
        self.leases = RolloutLeases(self.state, LEASE_S)
        self.rollouts = RolloutController(
            RolloutSettings(poll_interval_s=poll_interval_s, lease_s=LEASE_S),
            self.table,
            LocalRoutes(self.table),
            RedisRollouts(self.state),
            verdicts,
            AuditLog(AuditSettings(path=None)),
            leases=self.leases,
        )

    async def close(self) -> None:
        await self.rollouts.close()
        await self.state.close()


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    yield server
    server.stop(signal.SIGKILL)


@pytest.fixture
async def replicas(redis: RedisServer) -> AsyncIterator[tuple[Replica, Replica, Verdicts]]:
    verdicts = Verdicts()
    first, second = Replica(redis, verdicts), Replica(redis, verdicts)
    await first.rollouts.start()
    await second.rollouts.start()
    yield first, second, verdicts
    verdicts.gate.set()
    await first.close()
    await second.close()


async def until(check: Any, what: str, timeout_s: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not await check():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def test_a_command_given_to_the_other_replica_is_applied_once_by_the_driver(replicas):
    first, second, _ = replicas
    await first.rollouts.begin("fraud", "4", ["25", "100"], "ops")

    async def holding() -> bool:
        return (await second.rollouts.status("fraud")).state == "holding"

    await until(holding, "the second replica to see the rollout hold")
    paused = await second.rollouts.pause("fraud", "ops")  # passed to the first, which drives
    assert paused.state == "paused" and "paused by ops" in paused.reason
    assert first.rollouts.get("fraud").state == "paused"
    [done] = paused.commands
    assert done["action"] == "pause" and done["outcome"] == "ok"
    resumed = await second.rollouts.resume("fraud", "ops")
    assert resumed.state in ("running", "holding")
    with pytest.raises(RolloutConflict, match="not paused"):  # refused where it was given
        await second.rollouts.resume("fraud", "ops")
    assert [c["action"] for c in first.rollouts.get("fraud").commands] == ["pause", "resume"]
    ended = await second.rollouts.abort("fraud", "ops")
    assert ended.state == "aborted" and first.rollouts.get("fraud").state == "aborted"
    reasons = [h["reason"] for h in ended.history]
    assert not any("driven by replica" in r for r in reasons)  # the first drove it throughout


async def test_a_slow_verdict_does_not_let_the_drivers_lease_lapse(replicas):
    first, second, verdicts = replicas
    verdicts.gate.clear()  # every verdict waits
    await first.rollouts.begin("fraud", "4", ["25", "100"], "ops")

    async def asked() -> bool:
        return verdicts.asked > 0

    await until(asked, "the first verdict to be asked")
    await asyncio.sleep(LEASE_S + 1.5)  # past the lease's time to live, the verdict pending
    assert await first.leases.hold("fraud")  # still the first's: renewed meanwhile
    assert not await second.leases.hold("fraud")
    record = await second.rollouts.status("fraud")
    assert not any("driven by replica" in h["reason"] for h in record.history)
    verdicts.gate.set()

    async def judged() -> bool:
        return first.rollouts.get("fraud").state == "holding"

    await until(judged, "the first replica to act on the late verdict")


async def test_a_resume_given_to_the_other_replica_asks_for_one_verdict(redis):
    """The driver asks for a verdict once per resume, relayed or not: a second ask would cancel
    the first while it is answered. An hour between polls: only the resume asks."""
    verdicts = Verdicts()
    first, second = (Replica(redis, verdicts, poll_interval_s=3600) for _ in range(2))
    await first.rollouts.start()
    await second.rollouts.start()
    try:
        await first.rollouts.begin("fraud", "4", ["25", "100"], "ops")
        await second.rollouts.pause("fraud", "ops")
        verdicts.gate.clear()  # the verdict the resume asks for stays unanswered meanwhile
        await second.rollouts.resume("fraud", "ops")  # passed to the first, which drives

        async def asked() -> bool:
            return verdicts.asked > 0

        await until(asked, "the resume to ask for a verdict")
        verdicts.gate.set()

        async def judged() -> bool:
            return first.rollouts.get("fraud").state == "holding"

        await until(judged, "the driver to act on the verdict")
        assert verdicts.asked == 1
    finally:
        verdicts.gate.set()
        await first.close()
        await second.close()


async def test_a_command_left_for_an_earlier_rollout_is_not_applied_to_the_next(replicas):
    first, _, _ = replicas
    await first.rollouts.begin("fraud", "4", ["25", "100"], "ops")
    await first.rollouts.abort("fraud", "ops")
    await first.leases.post("fraud", {"action": "abort", "actor": "late", "expires": 1e12})
    rollout = await first.rollouts.begin("fraud", "4", ["25", "100"], "ops")  # clears it
    stale = {"action": "abort", "actor": "stale", "rollout": 1.0, "id": "x", "expires": 1e12}
    await first.leases.post("fraud", stale)  # for an earlier rollout: ignored

    async def taken() -> bool:
        return not await first.leases.take("fraud") and rollout.state == "holding"

    await until(taken, "the driver to take what was left")
    assert rollout.state == "holding" and rollout.commands == []


async def test_records_written_as_one_document_are_moved_and_go_on(redis):
    state = RedisState(StateSettings(backend="redis", redis_url=redis.url))
    try:
        old = {"fraud": {"route": "fraud", "state": "running", "step": 1}}
        await state.client.set("gateway:rollouts", json.dumps(old))
        records = RedisRollouts(state)
        assert await records.load() == old
        assert await state.client.get("gateway:rollouts") is None
        assert await records.load() == old  # from the hash now
    finally:
        await state.close()
