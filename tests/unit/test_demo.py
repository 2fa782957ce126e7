"""The demo repository: real models from code, deterministic given the seed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import yaml

from gateway import features
from gateway.demo import (
    CATEGORIES,
    NUMERIC,
    PERF_ANALYZER_DATA,
    build_demo_repository,
    predict,
    synthetic_transactions,
)
from gateway.features import ContractViolation


def test_same_seed_same_bytes(tmp_path: Path):
    a = build_demo_repository(tmp_path / "a", seed=3, rows=2000)
    b = build_demo_repository(tmp_path / "b", seed=3, rows=2000)
    assert (a / "features.yaml").read_bytes() == (b / "features.yaml").read_bytes()
    for version in ("1", "2"):
        assert (a / version / "model.onnx").read_bytes() == (
            b / version / "model.onnx"
        ).read_bytes()
    c = build_demo_repository(tmp_path / "c", seed=4, rows=2000)
    assert (a / "1" / "model.onnx").read_bytes() != (c / "1" / "model.onnx").read_bytes()


def test_two_versions_that_score_transactions(demo_repo: Path):
    """Each version scores the matrix of its own contract version, built by the offline API."""
    model_dir = demo_repo / "fraud"
    cols, labels = synthetic_transactions(3000, seed=99)
    info = yaml.safe_load((model_dir / "training.yaml").read_text())
    for version in (1, 2):
        contract = features.load_contract(model_dir, f"v{version}")
        assert info["versions"][version]["contract"] == contract.version
        x = features.assemble(contract, cols)
        assert x.shape == (3000, 22) and x.dtype == np.float32
        session = ort.InferenceSession(
            str(model_dir / str(version) / "model.onnx"), providers=["CPUExecutionProvider"]
        )
        scores = session.run(None, {"features": x})[0]
        params = dict(np.load(model_dir / str(version) / "params.npz"))
        np.testing.assert_allclose(scores, predict(params, x), rtol=1e-4, atol=1e-6)
        # A real scorer: frauds score higher than legitimate transactions on fresh data.
        assert scores[labels == 1].mean() > 2 * scores[labels == 0].mean()
        assert info["versions"][version]["held_out_auc"] > 0.7


def test_synthetic_data_has_numeric_and_categorical_features():
    cols, labels = synthetic_transactions(1000, seed=1)
    assert cols["amount"].dtype == np.float64
    assert cols["hour"].dtype.kind == "i"
    assert set(cols["channel"]) <= {"pos", "web", "app"}
    assert 0.01 < labels.mean() < 0.2


def test_the_perf_analyzer_data_holds_rows_valid_under_every_contract_version(demo_repo: Path):
    """``perf_analyzer --input-data`` rows: one row per request, each input a one-element
    ``content`` of shape [1] (BYTES as strings), all of them assembling under v1 and v2."""
    data = json.loads((demo_repo / PERF_ANALYZER_DATA).read_text())["data"]
    assert len(data) == 256
    names = [*NUMERIC, *CATEGORIES]
    for step in data:
        assert list(step) == names
        assert all(len(t["content"]) == 1 and t["shape"] == [1] for t in step.values())
    columns = {name: np.array([step[name]["content"][0] for step in data]) for name in names}
    assert columns["hour"].dtype.kind == "i" and columns["channel"].dtype.kind == "U"
    for version in ("v1", "v2"):
        contract = features.load_contract(demo_repo / "fraud", version)
        assert features.assemble(contract, columns).shape == (256, 22)
        with pytest.raises(ContractViolation, match="'hour'"):  # what random data trips on
            features.assemble(contract, {**columns, "hour": columns["hour"] - 10**6})
