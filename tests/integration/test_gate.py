"""The validation gate end to end: `gateway validate` judges versions on a labelled window and
writes gate.json; a gateway with adaptation.gate.required serves only versions that passed,
answers UNAVAILABLE with the gate's reason for the others, and picks up a pass at the next
repository load."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import tritonclient.grpc as triton_grpc
import yaml
from tritonclient.utils import InferenceServerException

from tests.auth import ADMIN_ENV, ADMIN_HEADERS
from tests.conftest import demo_input
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
