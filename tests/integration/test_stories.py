"""The failure stories run with one command each (`gateway story NAME`) through a real gateway
and sidecar, and show the signal they are about."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def story(name: str, work: Path) -> dict:
    command = [sys.executable, "-m", "gateway", "story", name, "--json", "--workdir", str(work)]
    out = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(out.stdout)


def test_new_vertical_fires_the_coverage_alert_in_its_segment_with_a_review(tmp_path: Path):
    signals = story("new-vertical", tmp_path / "work")
    fired = {(a["segment"], a["feature"]) for a in signals["alerts"]}
    assert ("region=south", "merchant_category") in fired
    assert not any(segment == "region=north" for segment, _ in fired)
    reviewed = {(r["segment"], r["feature"], r["status"]) for r in signals["reviews"]}
    assert ("region=south", "merchant_category", "open") in reviewed
    assert signals["report_url"].startswith("http://127.0.0.1:")


def test_skew_names_the_feature_the_offline_pipeline_computes_differently(tmp_path: Path):
    signals = story("skew", tmp_path / "work")
    assert not signals["ok"]
    assert signals["rebuilt"] and all(d["differing"] == 0 for d in signals["rebuilt"].values())
    differing = {name for name, d in signals["features"].items() if d["differing"]}
    assert differing == {"account_age_days"}
    moved = {name for name, d in signals["offline_matrix"].items() if d["differing"]}
    assert moved == {"input.account_age_days"}


def test_invisible_cost_shows_the_new_surface_in_the_ledger_and_degrades_it(tmp_path: Path):
    signals = story("invisible-cost", tmp_path / "work")
    checkout, search = signals["ledger"]["checkout"], signals["ledger"]["search"]
    assert checkout["premium.requests"] == checkout["requests"] == 20  # never degraded
    assert search["premium.requests"] > 0 and search["lite.requests"] > 0  # degraded past it
    assert search["requests"] == 40
    assert signals["budget"]["spent"] >= signals["budget"]["limit"]
    assert signals["budget"]["policy"] == "degrade"


def test_drift_that_matters_pages_only_when_the_metric_moves(tmp_path: Path):
    signals = story("drift-that-matters", tmp_path / "work")
    assert ("feature_drift", "hour") in {(a["rule"], a["feature"]) for a in signals["drift"]}
    assert signals["quiet"] == [] and signals["checked"]  # checked on enough labels: no page
    assert signals["auc_before"] > 0.7
    paged = {(a["rule"], a["action"]) for a in signals["paged"]}
    assert ("business_metric", "rollback") in paged
