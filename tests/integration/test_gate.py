"""The validation gate end to end: `gateway validate` judges versions on a labelled window and
writes gate.json; a gateway with adaptation.gate.required serves only versions that passed,
answers UNAVAILABLE with the gate's reason for the others, and picks up a pass at the next
repository load. With adaptation.gate.auto the gateway judges a new version by itself, on the
labelled traffic its sidecar holds, and serves it once it passed."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import tritonclient.grpc as triton_grpc
import yaml
from tritonclient.utils import InferenceServerException

from gateway.api.v1 import events_pb2 as ev
from gateway.demo import synthetic_transactions
from gateway.evaluation.client import send_labels
from tests.auth import ADMIN_ENV, ADMIN_HEADERS, wait_until
from tests.conftest import demo_input, free_port
from tests.integration.test_evaluation import raw_inputs
from tests.unit.test_auto_gate import accept_as_is
from tests.unit.test_gate import (
    COPY_VERSION,
    NAN_VERSION,
    WORSE_WEB_VERSION,
    add_gate_versions,
    labelled_table,
)

pytestmark = pytest.mark.integration


def validate(repo: Path, data: Path, version: int, against: int, *flags: str):
    command = [sys.executable, "-m", "gateway", "validate", "fraud", str(version)]
    command += ["--against", str(against), "--data", str(data), "--repository", str(repo)]
    return subprocess.run([*command, *flags], capture_output=True, text=True, timeout=120)


def test_a_version_that_failed_the_gate_stays_out_of_traffic(
    repo_copy: Path, start_gateway, tmp_path: Path
):
    add_gate_versions(repo_copy)
    data = tmp_path / "window.parquet"
    pq.write_table(labelled_table(6000), data)

    # The serving version is accepted against itself (the baseline before the gate is
    # required); a copy of it passes; NaN outputs and a segment made worse fail.
    for version in (2, COPY_VERSION):
        done = validate(repo_copy, data, version, 2)
        assert done.returncode == 0, done.stdout + done.stderr
        assert done.stdout.startswith(f"PASS fraud version {version} against version 2")
    nan = validate(repo_copy, data, NAN_VERSION, 2)
    assert nan.returncode == 3 and nan.stdout.startswith("FAIL")
    assert "FAIL  outputs: probability has 6000 NaN" in nan.stdout
    worse = validate(repo_copy, data, WORSE_WEB_VERSION, 2, "--json")
    assert worse.returncode == 3
    body = json.loads(worse.stdout)
    outcomes = {c["name"]: c["outcome"] for c in body["criteria"]}
    assert body["passed"] is False and outcomes["segment.channel=web"] == "fail"
    assert outcomes["segment.channel=pos"] == outcomes["outputs"] == "pass"
    stored = json.loads((repo_copy / "fraud" / str(WORSE_WEB_VERSION) / "gate.json").read_text())
    assert stored == body

    settings = tmp_path / "gateway.yaml"
    settings.write_text(yaml.safe_dump({"adaptation": {"gate": {"required": True}}}))
    gateway = start_gateway(repo_copy, "--config", str(settings), env=ADMIN_ENV)
    client: triton_grpc.InferenceServerClient = gateway.client()
    try:
        assert client.is_model_ready("fraud", "2") and client.is_model_ready("fraud", "5")
        for version in (1, NAN_VERSION, WORSE_WEB_VERSION):
            assert not client.is_model_ready("fraud", str(version))
        with pytest.raises(InferenceServerException) as refused:
            client.infer("fraud", [demo_input()], model_version=str(NAN_VERSION))
        assert refused.value.status() == "StatusCode.UNAVAILABLE"
        assert "the validation gate failed it: outputs: probability has" in str(refused.value)
        # the newest ready version serves requests that name none
        reply = client.infer("fraud", [demo_input()])
        assert reply.get_response().model_version == str(COPY_VERSION)

        index = {e["version"]: e for e in client.get_model_repository_index(as_json=True)["models"]}
        assert index[str(WORSE_WEB_VERSION)]["state"] == "UNAVAILABLE"
        assert "segment.channel=web" in index[str(WORSE_WEB_VERSION)]["reason"]
        assert "no gate.json" in index["1"]["reason"]

        # a pass written by `gateway validate` lets the next repository load serve it
        done = validate(repo_copy, data, 1, 1)
        assert done.returncode == 0, done.stdout + done.stderr
        client.load_model("fraud", headers=ADMIN_HEADERS)
        assert client.is_model_ready("fraud", "1")
    finally:
        client.close()


def test_a_new_version_is_judged_by_itself_and_serves_once_it_passed(
    repo_copy: Path, start_gateway, start_sidecar, tmp_path: Path
):
    """adaptation.gate.auto: a version loaded by RepositoryModelLoad is replayed on the
    labelled traffic the sidecar holds; a copy of the serving version serves once it passed,
    one with NaN outputs stays UNAVAILABLE with the criterion at fault."""
    add_gate_versions(repo_copy)
    for version in (1, 2):
        accept_as_is(repo_copy, version)
    staged = tmp_path / "staged"
    staged.mkdir()
    for version in (NAN_VERSION, WORSE_WEB_VERSION, COPY_VERSION):
        shutil.move(repo_copy / "fraud" / str(version), staged / str(version))
    sidecar = start_sidecar(tmp_path / "store", free_port())
    gate = {
        "required": True,
        "auto": True,
        "min_positives": 10,
        "min_negatives": 10,
        # this test is about the gate running by itself, not about this host's speed
        "latency_runs": 5,
        "latency_budget_ms": 10_000,
        "max_batch_latency_budget_ms": 10_000,
    }
    settings = tmp_path / "gateway.yaml"
    settings.write_text(yaml.safe_dump({"adaptation": {"gate": gate}}))
    events = ["--sidecar", sidecar.address, "--events-dir", str(tmp_path / "events")]
    gateway = start_gateway(repo_copy, "--config", str(settings), *events, env=ADMIN_ENV)
    client: triton_grpc.InferenceServerClient = gateway.client()
    try:
        # Labelled traffic on the serving version (2): the window the gate replays.
        labels = []
        for i in range(8):
            columns, y = synthetic_transactions(100, seed=700 + i)
            client.infer("fraud", raw_inputs(columns), request_id=f"r{i}")
            labels += [ev.Label(request_id=f"r{i}", row=r, value=float(v)) for r, v in enumerate(y)]
        wait_until(
            lambda: gateway.metric("gateway_events_total", outcome="acked") >= 8,
            "the sidecar to acknowledge the events",
        )
        assert send_labels(sidecar.address, labels) == (800, 0)

        # A copy of version 2 appears and is loaded: judged, then served, nobody typing more.
        shutil.move(staged / str(COPY_VERSION), repo_copy / "fraud" / str(COPY_VERSION))
        client.load_model("fraud", headers=ADMIN_HEADERS)
        wait_until(lambda: client.is_model_ready("fraud", str(COPY_VERSION)), "the copy to serve")
        body = json.loads((repo_copy / "fraud" / str(COPY_VERSION) / "gate.json").read_text())
        assert body["passed"] is True and body["against"] == 2 and body["rows"] == 800
        assert body["data"] == f"sidecar {sidecar.address}, last 7 days"
        assert gateway.metric("gateway_gate_runs_total", model="fraud", outcome="pass") == 1

        # One with NaN outputs: judged, failed, kept out with the criterion at fault.
        shutil.move(staged / str(NAN_VERSION), repo_copy / "fraud" / str(NAN_VERSION))
        client.load_model("fraud", headers=ADMIN_HEADERS)

        def held_reason() -> str:
            index = client.get_model_repository_index(as_json=True)["models"]
            return next(e.get("reason", "") for e in index if e["version"] == str(NAN_VERSION))

        wait_until(lambda: "failed it" in held_reason(), "the gate to fail the NaN version")
        assert "the validation gate failed it: outputs: probability has 800 NaN" in held_reason()
        assert not client.is_model_ready("fraud", str(NAN_VERSION))
        with pytest.raises(InferenceServerException) as refused:
            client.infer("fraud", [demo_input()], model_version=str(NAN_VERSION))
        assert refused.value.status() == "StatusCode.UNAVAILABLE"
        assert "outputs: probability has 800 NaN" in str(refused.value)
        assert gateway.metric("gateway_gate_runs_total", model="fraud", outcome="fail") == 1
        held = {"model": "fraud", "version": str(NAN_VERSION), "state": "failed"}
        assert gateway.metric("gateway_gate_held", **held) == 1
        # the newest passing version serves requests that name none
        assert client.infer("fraud", [demo_input()]).get_response().model_version == str(
            COPY_VERSION
        )
    finally:
        client.close()
    assert gateway.stop() == 0, gateway.stderr()  # the gate's worker stops with it
