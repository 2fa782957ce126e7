"""Staged rollouts through a real gateway and sidecar: the gateway's controller polls the
sidecar's Verdict RPC and walks the route. A copy of the stable version (4) walks shadow -> 5
-> 25 -> 50 -> 100 and becomes stable, resuming at its step after a SIGKILL; a worse one (3)
is rolled back at its first canary step with the evidence in its status; one breaking its
latency SLO is rolled back before any verdict; without labels the rollout holds, then
pauses for a person, and ``gateway rollback`` ends it. Two replicas on one Redis: one drives
the rollout, the other shows it and passes it commands, and takes it over when the driver
is SIGKILLed."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gateway.api.v1 import events_pb2 as ev
from gateway.demo import synthetic_transactions
from gateway.evaluation.client import send_labels
from tests.auth import ADMIN_ENV, ADMIN_TOKEN, wait_until
from tests.conftest import free_port
from tests.integration.test_canary import add_versions
from tests.integration.test_evaluation import raw_inputs
from tests.services import RedisServer

pytestmark = pytest.mark.integration

ROWS, REQUESTS = 20, 100  # ~3% positives: ~60 per version, as test_canary
ROUTE = {"variants": [{"name": "live", "model": "fraud", "version": "2", "weight": 1}]}
LOOSE = {"max_latency_regression": 100.0, "max_cost_regression": 100.0}  # see test_canary


def cli(gateway, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "gateway", *args, "--url", gateway.url]
    env = {**os.environ, "GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN}
    return subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)


def status(gateway) -> dict:
    out = cli(gateway, "rollout", "status", "scored", "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def at_step_is(gateway, step: str) -> bool:
    record = status(gateway)
    return bool(record["steps"][record["step"]] == step)


def weights(gateway) -> dict[str, float]:
    out = cli(gateway, "routes")
    assert out.returncode == 0, out.stderr
    routes = yaml.safe_load(out.stdout)
    return {v["name"]: v.get("weight", 0.0) for v in routes["scored"]["variants"]}


@pytest.fixture
def setup(repo_copy: Path, start_gateway, start_sidecar, tmp_path: Path):
    """A sidecar judging versions 3 and 4 against 2, and a way to start gateways serving
    route ``scored`` (version 2) that stream events to it."""
    add_versions(repo_copy)
    canaries = [
        {"model": "fraud", "stable": "2", "candidate": "3"},
        {"model": "fraud", "stable": "2", "candidate": "4", **LOOSE},
    ]
    config = tmp_path / "sidecar.yaml"
    config.write_text(yaml.safe_dump({"evaluation": {"canaries": canaries}}))
    sidecar = start_sidecar(tmp_path / "store", free_port(), "--config", str(config))

    def gateway(name: str = "gateway", state: dict | None = None, **rollout):
        settings: dict = {
            "routing": {"routes": {"scored": ROUTE}},
            "adaptation": {
                "rollout": {
                    "poll_interval_s": 0.2,
                    "state_file": str(tmp_path / "rollouts.json"),
                    **rollout,
                }
            },
        }
        if state is not None:
            settings["state"] = state
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(settings))
        # NOTE: one event log for gateways started one after another (a restart), one each
        # for replicas running side by side
        log = tmp_path / ("events" if state is None else f"events-{name}")
        events = ["--sidecar", sidecar.address, "--events-dir", str(log)]
        return start_gateway(repo_copy, "--config", str(path), *events, env=ADMIN_ENV)

    return sidecar, gateway


def traffic(gateway, sidecar, model: str, version: str = "", events_per_request: int = 1) -> None:
    """REQUESTS requests, then their labels once the sidecar holds their events."""
    client = gateway.client()
    labels = []
    acked = gateway.metric("gateway_events_total", outcome="acked")
    for i in range(REQUESTS):
        columns, y = synthetic_transactions(ROWS, seed=300 + i)
        request_id = f"{model}-{version}-{i}"
        client.infer(model, raw_inputs(columns), model_version=version, request_id=request_id)
        labels += [ev.Label(request_id=request_id, row=r, value=float(v)) for r, v in enumerate(y)]
    client.close()
    wanted = acked + events_per_request * REQUESTS
    wait_until(
        lambda: gateway.metric("gateway_events_total", outcome="acked") >= wanted,
        "the sidecar to acknowledge the events",
    )
    assert send_labels(sidecar.address, labels) == (len(labels), 0)


def test_a_copy_walks_every_step_and_resumes_at_its_step_after_a_sigkill(setup):
    sidecar, start = setup
    # NOTE: an hour between verdicts: this gateway judges only when `resume` wakes it, so the
    # test stops the rollout at the step it chooses before killing the gateway.
    first = start("first", poll_interval_s=3600, evidence="window")  # steps use shadow's
    out = cli(first, "rollout", "start", "scored", "--candidate", "4")  # shadow,5,25,50,100
    assert out.returncode == 0, out.stderr
    assert "scored: version 4 (v4) RUNNING" in out.stdout and "[shadow]" in out.stdout
    assert weights(first) == {"live": 1, "v4": 0}
    # every request is scored by the shadow copy too, under the primary's request id
    traffic(first, sidecar, "scored", events_per_request=2)
    for step in ("5", "25"):
        assert cli(first, "rollout", "pause", "scored").returncode == 0
        assert cli(first, "rollout", "resume", "scored").returncode == 0  # judges at once
        wait_until(functools.partial(at_step_is, first, step), f"step {step}")
    assert weights(first) == {"live": 75, "v4": 25}
    record = status(first)
    assert record["verdict"]["verdict"] == "promote" and record["verdict"]["step"] == "5"
    first.kill_all()  # SIGKILL: no chance to write anything more

    second = start("second", evidence="window")  # the settings' routes and the record on disk
    wait_until(lambda: status(second)["state"] == "succeeded", "the rollout to finish")
    record = status(second)
    steps = [(h["step"], h["reason"].split(":")[0]) for h in record["history"]]
    assert steps[2:4] == [("25", "verdict promote at step 5"), ("25", "resumed after a restart")]
    assert [s for s, _ in steps[4:]] == ["50", "100"]
    assert "version 4 is the stable one" in record["reason"]
    assert weights(second) == {"live": 0, "v4": 1}
    # each step a revision, on the audit log with its reason
    audit_log = (second.workdir / ".gateway-audit.jsonl").read_text().splitlines()
    audited = [json.loads(line) for line in audit_log]
    audited = [a for a in audited if a["rpc"] == "RolloutStep"]
    assert [a["detail"].split(":")[0] for a in audited] == [
        "resumed after a restart",
        "verdict promote at step 25",
        "verdict promote at step 50",
    ]
    assert all(a["after"]["scored"] > a["before"]["scored"] for a in audited)


def test_a_worse_candidate_is_rolled_back_at_its_first_canary_step(setup):
    sidecar, start = setup
    gateway = start()
    out = cli(gateway, "rollout", "start", "scored", "--candidate", "3", "--steps", "5,50,100")
    assert out.returncode == 0, out.stderr
    assert weights(gateway) == {"live": 95, "v3": 5}
    assert gateway.metric("gateway_rollout_traffic", route="scored", step="5") == 0.05
    # The verdict judges versions, whichever route served them: the candidate's direct calls
    # stand in for its 5% of a larger traffic.
    traffic(gateway, sidecar, "scored")
    traffic(gateway, sidecar, "fraud", version="3")
    wait_until(lambda: status(gateway)["state"] == "rolled_back", "the rollback")
    record = status(gateway)
    assert record["steps"][record["step"]] == "5"
    assert record["reason"].startswith("verdict rollback at step 5: auc ")
    auc = record["verdict"]["criteria"][0]
    assert auc["name"] == "auc" and auc["outcome"] == "fail" and auc["regression_low"] > 0.02
    assert weights(gateway) == {"live": 1}  # the route from before the rollout
    traffic_samples = {
        dict(labels)["state"]: value
        for (name, labels), value in gateway.metrics().items()
        if name == "gateway_rollout_traffic"
    }
    assert traffic_samples == {"rolled_back": 0.0}
    text = cli(gateway, "rollout", "status", "scored").stdout
    assert "ROLLED_BACK" in text and "auc" in text and "fail" in text


def test_a_candidate_breaking_its_slo_is_rolled_back_before_any_verdict(setup):
    _, start = setup
    # No verdict is asked for an hour; every answer slower than 1 us breaks this latency SLO
    # (the router times the candidate's attempts on real traffic).
    slo = {"max_latency_ms": 0.001, "latency_quantile": 0.9, "min_requests": 10}
    gateway = start(poll_interval_s=3600, slo=slo)
    out = cli(gateway, "rollout", "start", "scored", "--candidate", "4", "--steps", "50,100")
    assert out.returncode == 0, out.stderr
    client = gateway.client()
    columns, _ = synthetic_transactions(2, seed=7)
    for i in range(40):
        client.infer("scored", raw_inputs(columns), request_id=f"slo-{i}")
    client.close()
    wait_until(lambda: status(gateway)["state"] == "rolled_back", "the SLO rollback")
    record = status(gateway)
    assert record["reason"].startswith("SLO breach at step 50: ")
    assert "answers slower than 0.001 ms" in record["reason"] and record["verdict"] is None
    assert record["health"]["slow"] == record["health"]["attempts"] >= 10
    assert weights(gateway) == {"live": 1}
    text = cli(gateway, "rollout", "status", "scored").stdout
    assert "candidate at this step:" in text and "slow" in text


def test_without_labels_the_rollout_holds_then_pauses_and_rollback_ends_it(setup):
    _, start = setup
    gateway = start(hold_timeout_s=1)
    out = cli(gateway, "rollout", "start", "scored", "--candidate", "4", "--steps", "25,100")
    assert out.returncode == 0, out.stderr
    wait_until(lambda: status(gateway)["state"] == "paused", "the rollout to pause")
    record = status(gateway)
    assert "hold_timeout_s" in record["reason"] and "0 labelled rows" in record["reason"]
    assert weights(gateway) == {"live": 75, "v4": 25}  # paused at its step, not rolled back
    out = cli(gateway, "rollback", "scored")
    assert out.returncode == 0, out.stderr
    assert weights(gateway) == {"live": 1}  # the stable at 100% in one command
    record = status(gateway)
    assert record["state"] == "rolled_back" and "gateway rollback" in record["reason"]
    again = cli(gateway, "rollout", "resume", "scored")
    assert again.returncode == 1 and "has ended (rolled_back)" in again.stderr


def test_a_step_is_judged_on_the_traffic_since_it_began(setup):
    """Evidence from before the rollout does not promote it (evidence: step, the default):
    the shadow step holds on 0 labelled rows until its own paired traffic arrives."""
    sidecar, start = setup
    gateway = start()
    traffic(gateway, sidecar, "fraud", version="4")  # before the rollout: not the step's
    traffic(gateway, sidecar, "fraud", version="2")
    out = cli(gateway, "rollout", "start", "scored", "--candidate", "4", "--steps", "shadow,100")
    assert out.returncode == 0, out.stderr

    def holding_on_nothing() -> bool:
        record = status(gateway)
        return record["state"] == "holding" and "0 labelled rows" in record["reason"]

    wait_until(holding_on_nothing, "the shadow step holding on its own (no) evidence")
    traffic(gateway, sidecar, "scored", events_per_request=2)  # the step's own, paired
    wait_until(lambda: status(gateway)["state"] == "succeeded", "the rollout to finish")
    assert weights(gateway) == {"live": 0, "v4": 1}


def test_one_replica_drives_a_rollout_and_another_takes_it_over_when_it_dies(setup, tmp_path):
    _, start = setup
    redis = RedisServer(tmp_path / "redis")
    try:
        state = {"backend": "redis", "redis_url": redis.url}
        # NOTE: a lease renewed every second, lapsing after 4: a driver stalled for a second
        # or two on a loaded machine keeps it (one takeover, after the SIGKILL)
        first = start("first", state=state, lease_s=4)
        second = start("second", state=state, lease_s=4)
        out = cli(first, "rollout", "start", "scored", "--candidate", "4", "--steps", "25,100")
        assert out.returncode == 0, out.stderr
        # no labels: it holds at 25%, driven by the first; the second shows it as it is
        wait_until(lambda: status(second)["state"] == "holding", "the second to see it hold")
        assert weights(second) == {"live": 75, "v4": 25}
        # a command on the replica that does not drive it is carried out by the one that does
        out = cli(second, "rollout", "pause", "scored")
        assert out.returncode == 0, out.stderr
        assert "PAUSED" in out.stdout
        assert status(first)["state"] == "paused" and "paused by" in status(first)["reason"]
        first.kill_all()  # SIGKILL: its lease lapses (lease_s) and the second takes over

        def taken_over() -> bool:
            return any("driven by replica" in h["reason"] for h in status(second)["history"])

        wait_until(taken_over, "the second replica to take the rollout over")
        out = cli(second, "rollout", "resume", "scored")
        assert out.returncode == 0, out.stderr
        out = cli(second, "rollback", "scored")
        assert out.returncode == 0, out.stderr
        record = status(second)
        assert record["state"] == "rolled_back" and weights(second) == {"live": 1}
        reasons = [h["reason"] for h in record["history"]]
        assert sum("driven by replica" in r for r in reasons) == 1  # one driver at a time
    finally:
        redis.stop(signal.SIGKILL)
