"""Alert rules end to end: real gateway and sidecar processes, the demo's traffic through the
gateway, the sidecar's report read after each step (its Report RPC runs every rule then, so
no test waits for the watch's interval).

- a full shift of one feature at steady traffic fires within a bounded number of rows, the
  same after 10x the traffic before the shift;
- a new issuing country (a sensitive feature: the sidecar only sees its hashes) fires the
  OOV rule for its segment only, from the gateway's contract counts;
- rules that lack data say so.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gateway.demo import synthetic_transactions
from gateway.evaluation.client import fetch_report
from tests.conftest import GatewayProcess, SidecarProcess, free_port
from tests.integration.test_evaluation import raw_inputs

pytestmark = pytest.mark.integration

ROWS_PER_REQUEST = 50
Change = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


@dataclass
class Loop:
    gateway: GatewayProcess
    sidecar: SidecarProcess
    sent: int = 0
    seed: int = 0

    def send(self, segment: str, rows: int, change: Change = lambda c: c) -> None:
        """``rows`` rows of the demo's traffic (changed) in ``segment``, once all stored."""
        key, value = segment.split("=")
        client = self.gateway.client()
        try:
            for _ in range(rows // ROWS_PER_REQUEST):
                self.seed += 1
                columns, _ = synthetic_transactions(ROWS_PER_REQUEST, seed=5000 + self.seed)
                client.infer(
                    "fraud",
                    raw_inputs(change(columns)),
                    model_version="2",
                    request_id=f"{segment}-{self.seed}",
                    parameters={f"segment.{key}": value},
                )
                self.sent += 1
        finally:
            client.close()
        deadline = time.monotonic() + 60
        while self.gateway.metric("gateway_events_total", outcome="acked") < self.sent:
            assert time.monotonic() < deadline, "events never all reached the sidecar"
            time.sleep(0.02)

    def report(self) -> dict[str, Any]:
        return fetch_report(self.sidecar.address, "fraud")


@pytest.fixture(scope="module")
def loop(demo_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Loop]:
    work = tmp_path_factory.mktemp("alerts")
    port = free_port()
    sidecar = SidecarProcess(
        work / "store",
        port,
        work / "logs",
        "--repository",
        str(demo_repo),
        env={"GATEWAY_EVALUATION__EVALUATE_EVERY_S": "3600"},  # reports run the rules
    )
    events = ["--sidecar", f"127.0.0.1:{port}", "--events-dir", str(work / "events")]
    gateway = GatewayProcess(demo_repo, work / "gateway", *events)
    try:
        yield Loop(gateway, sidecar)
    finally:
        gateway.stop()
        sidecar.stop()


def amount_x8(columns: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {**columns, "amount": columns["amount"] * 8}


def firing(report: dict[str, Any], rule: str) -> set[tuple[str, str]]:
    return {(a["segment"], a["feature"]) for a in report["alerts"] if a["rule"] == rule}


def rows_to_alert(loop: Loop, segment: str, before: int) -> int:
    loop.send(segment, before)
    assert (segment, "amount") not in firing(loop.report(), "feature_drift")
    shifted = 0
    while shifted < 1000:
        loop.send(segment, ROWS_PER_REQUEST, amount_x8)
        shifted += ROWS_PER_REQUEST
        if (segment, "amount") in firing(loop.report(), "feature_drift"):
            return shifted
    raise AssertionError(f"no drift alert for {segment} after {shifted} shifted rows")


def test_a_full_shift_fires_within_rows_that_do_not_grow_with_the_traffic_before(loop: Loop):
    """Before recent windows, the rule read the whole hour: it fired once shifted rows were
    ~48% of it (950 after 1,000 reference rows, ~9,500 after 10,000)."""
    short = rows_to_alert(loop, "run=short", 1000)
    long = rows_to_alert(loop, "run=long", 10_000)
    assert short <= 200 and long <= 200
    assert long <= short + ROWS_PER_REQUEST
    alert = next(
        a
        for a in loop.report()["alerts"]
        if a["rule"] == "feature_drift" and a["segment"] == "run=long"
    )
    assert alert["window_rows"] == 2000 and alert["samples"] <= 2000 + ROWS_PER_REQUEST


def new_country(columns: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Three rows in ten from an issuing country the contract's vocabulary lacks."""
    rows = np.arange(len(columns["country"]))
    country = np.where(rows % 10 < 3, "ZZ", columns["country"]).astype(object)
    return {**columns, "country": country}


def test_a_sensitive_features_new_category_fires_for_its_segment_only(loop: Loop):
    loop.send("geo=ZZ-issuers", 400, new_country)
    loop.send("geo=plain", 400)
    report = loop.report()
    fired = firing(report, "new_categories")
    assert ("geo=ZZ-issuers", "country") in fired
    assert not {s for s, _ in fired if s.startswith("geo=") and s != "geo=ZZ-issuers"}
    assert not {s for s, _ in fired if s.startswith("run=")}
    alert = next(
        a
        for a in report["alerts"]
        if a["rule"] == "new_categories" and a["segment"] == "geo=ZZ-issuers"
    )
    assert alert["source"] == "contract" and alert["value"] == pytest.approx(0.3)
    assert alert["samples"] == 400
    segment = report["versions"]["2"]["geo=ZZ-issuers"]["features"]["country"]
    assert segment["contract_oov"] == pytest.approx(0.3)  # what the report has always said


def test_rules_without_enough_data_say_so(loop: Loop):
    report = loop.report()
    unlabelled = [
        e
        for e in report["not_enough_data"]
        if e["rule"] == "quality_drop" and e["segment"] == "all"
    ]
    assert unlabelled and unlabelled[0]["labelled"] == 0
    assert unlabelled[0]["needed"] == {"labelled": 200, "positives": 20, "negatives": 20}


def test_the_watch_exports_the_checks_that_lacked_data(
    demo_repo: Path, start_gateway, start_sidecar, tmp_path: Path
):
    """The sidecar's own rounds (not a report) set sidecar_alert_not_enough_data for a quality
    rule with no labels: not firing is visibly not passing."""
    env = {"GATEWAY_EVALUATION__EVALUATE_EVERY_S": "0.2", "GATEWAY_EVALUATION__METRICS_PORT": "0"}
    sidecar = start_sidecar(
        tmp_path / "store", free_port(), "--repository", str(demo_repo), env=env
    )
    events = ["--sidecar", sidecar.address, "--events-dir", str(tmp_path / "events")]
    gateway = start_gateway(demo_repo, *events)
    with gateway.client() as client:
        columns, _ = synthetic_transactions(ROWS_PER_REQUEST, seed=77)
        client.infer("fraud", raw_inputs(columns), model_version="2")
    deadline = time.monotonic() + 60
    while (
        sidecar.metric(
            "sidecar_alert_not_enough_data", rule="quality_drop", segment="all", version="2"
        )
        != 1
    ):
        assert time.monotonic() < deadline, "no round said the quality rule lacked labels"
        time.sleep(0.05)
