"""The validation gate judges a version on a labelled window replayed offline: a copy of the
serving version passes; NaN outputs, a segment made worse, missing features and too few labels
each fail (or say not enough data) on the criterion at fault, with numbers; gate.json lets the
repository serve exactly the model file that passed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from onnx import helper, numpy_helper

from gateway import features
from gateway.adaptation.gate import read_window, validate, window_of
from gateway.adaptation.gate_result import GATE_FILE, format_result, refusal, write_result
from gateway.demo import synthetic_transactions, to_onnx
from gateway.settings import GateSettings, RuntimeSettings

NAN_VERSION, WORSE_WEB_VERSION, COPY_VERSION = 3, 4, 5
SETTINGS = GateSettings(output_ranges={"probability": {"min": 0.0, "max": 1.0}})
RUNTIME = RuntimeSettings(device="cpu")


def worse_on(params: dict[str, np.ndarray], contract: features.Contract, column: str):
    """The demo MLP with its logit negated on the rows where ``column`` (a one-hot column of
    the contract's matrix) is 1: as good as the original elsewhere, inverted on that segment."""
    model = to_onnx(params, contract.width, f"worse where {column}")
    j = contract.columns.index(column)
    graph = model.graph
    nodes = list(graph.node)
    sigmoid = nodes[-1]
    sigmoid.input[0] = "flipped_logit"
    graph.initializer.extend(
        numpy_helper.from_array(np.asarray(value, dtype=dtype), name=name)
        for name, value, dtype in (
            ("seg_start", [j], np.int64),
            ("seg_end", [j + 1], np.int64),
            ("seg_axes", [1], np.int64),
            ("minus_two", [-2.0], np.float32),
            ("one", [1.0], np.float32),
        )
    )
    flip = [
        helper.make_node("Slice", ["features", "seg_start", "seg_end", "seg_axes"], ["seg"]),
        helper.make_node("Mul", ["seg", "minus_two"], ["seg_x2"]),
        helper.make_node("Add", ["seg_x2", "one"], ["sign"]),
        helper.make_node("Mul", ["logit", "sign"], ["flipped_logit"]),
    ]
    del graph.node[:]
    graph.node.extend([*nodes[:-1], *flip, sigmoid])
    onnx.checker.check_model(model)
    return model


def add_gate_versions(repo: Path) -> None:
    """Beside the demo's versions 1 and 2: 3 (version 2 with NaN outputs), 4 (version 2 made
    worse on channel=web), 5 (a copy of version 2), all under contract v2."""
    model_dir = repo / "fraud"
    params = dict(np.load(model_dir / "2" / "params.npz"))
    contract = features.load_contract(model_dir, "v2")
    nan = {**params, "b2": np.full_like(params["b2"], np.nan)}
    models = {
        NAN_VERSION: to_onnx(nan, contract.width, "NaN outputs"),
        WORSE_WEB_VERSION: worse_on(params, contract, "channel=web"),
        COPY_VERSION: to_onnx(params, contract.width, "a copy of version 2"),
    }
    for version, model in models.items():
        (model_dir / str(version)).mkdir()
        (model_dir / str(version) / "model.onnx").write_bytes(model.SerializeToString())
    config = yaml.safe_load((model_dir / "config.yaml").read_text())
    config["contract"]["by_model_version"].update(dict.fromkeys(models, "v2"))
    (model_dir / "config.yaml").write_text(yaml.safe_dump(config))


def labelled_table(rows: int, seed: int = 99) -> pa.Table:
    """Labelled rows as `gateway export --labelled` holds them: raw features, label, segment."""
    columns, labels = synthetic_transactions(rows, seed)
    raw = {k: v.tolist() if v.dtype == object else v for k, v in columns.items()}
    return pa.table({**raw, "label": labels, "segment.channel": columns["channel"].tolist()})


@pytest.fixture
def repo(repo_copy: Path) -> Path:
    add_gate_versions(repo_copy)
    return repo_copy


@pytest.fixture(scope="module")
def window():
    return window_of(labelled_table(6000), "synthetic")


def by_name(result) -> dict:
    return {c.name: c for c in result.criteria}


def test_a_copy_of_the_serving_version_passes_every_criterion(repo: Path, window):
    result = validate(repo, "fraud", COPY_VERSION, window, SETTINGS, RUNTIME, against=2)
    assert result.passed, format_result(result)
    criteria = by_name(result)
    assert {"contract", "outputs", "auc", "latency.batch_1", "latency.batch_1024"} <= set(criteria)
    auc = criteria["auc"]
    assert auc.numbers["difference"] == 0.0 and auc.numbers["difference_low"] == 0.0
    assert auc.numbers["candidate_auc"] == auc.numbers["serving_auc"] > 0.7
    segments = [c for name, c in criteria.items() if name.startswith("segment.channel=")]
    assert len(segments) == 3 and all(c.outcome == "pass" for c in segments)
    assert result.rows == 6000 and result.contract == "v2"


def test_the_gate_refuses_a_version_with_nan_outputs(repo: Path, window):
    result = validate(repo, "fraud", NAN_VERSION, window, SETTINGS, RUNTIME, against=2)
    assert not result.passed
    outputs = by_name(result)["outputs"]
    assert outputs.outcome == "fail"
    assert outputs.numbers["probability.nan"] == 6000
    assert "probability has 6000 NaN" in outputs.reason
    assert by_name(result)["auc"].outcome == "fail"
    assert format_result(result).startswith("FAIL fraud version 3 against version 2")


def test_the_gate_refuses_a_version_worse_on_one_segment(repo: Path, window):
    result = validate(repo, "fraud", WORSE_WEB_VERSION, window, SETTINGS, RUNTIME, against=2)
    assert not result.passed
    criteria = by_name(result)
    web = criteria["segment.channel=web"]
    assert web.outcome == "fail", web.reason
    # inverted on that segment: its AUC is about 1 - the serving version's
    assert web.numbers["difference_high"] < -SETTINGS.segment_auc_margin
    assert abs(web.numbers["candidate_auc"] - (1 - web.numbers["serving_auc"])) < 1e-3
    for other in ("pos", "app"):
        same = criteria[f"segment.channel={other}"]
        assert same.outcome == "pass" and same.numbers["difference"] == 0.0
    assert criteria["outputs"].outcome == "pass"  # finite, in range: only quality tells


def test_a_segment_without_enough_labels_says_so_and_does_not_fail_the_gate(repo: Path):
    table = labelled_table(6000)
    segment = ["rare" if i < 40 else "common" for i in range(6000)]
    table = table.set_column(
        table.column_names.index("segment.channel"), "segment.channel", pa.array(segment)
    )
    settings = GateSettings(min_positives=30, min_negatives=30)
    result = validate(repo, "fraud", COPY_VERSION, window_of(table, "t"), settings, RUNTIME, 2)
    rare = by_name(result)["segment.channel=rare"]
    assert rare.outcome == "not_enough_data" and rare.reason.startswith("not enough data")
    assert result.passed


def test_the_primary_metric_without_enough_labels_fails_the_gate(repo: Path):
    small = window_of(labelled_table(100), "small")
    result = validate(repo, "fraud", COPY_VERSION, small, SETTINGS, RUNTIME, against=2)
    assert by_name(result)["auc"].outcome == "not_enough_data"
    assert not result.passed  # a gate passes on evidence, not on its absence


def test_a_feature_the_contract_needs_missing_from_the_data_fails_the_contract(repo: Path):
    table = labelled_table(2000).drop_columns(["hour"])
    result = validate(repo, "fraud", COPY_VERSION, window_of(table, "t"), SETTINGS, RUNTIME, 2)
    contract = by_name(result)["contract"]
    assert contract.outcome == "fail" and "the data lack hour" in contract.reason
    assert not result.passed


def test_a_hashed_sensitive_feature_is_said_and_replayed_alike_for_both_versions(repo: Path):
    table = labelled_table(6000)
    hashed = pa.array([f"{hash(v) & 0xFFFF:032x}" for v in table.column("country").to_pylist()])
    table = table.set_column(table.column_names.index("country"), "country", hashed)
    result = validate(repo, "fraud", COPY_VERSION, window_of(table, "t"), SETTINGS, RUNTIME, 2)
    contract = by_name(result)["contract"]
    assert contract.outcome == "pass" and contract.numbers["country.oov_rows"] == 6000
    assert "country mostly out of vocabulary (sensitive: hashed in an export)" in contract.reason
    assert result.passed


def test_the_serving_version_defaults_to_the_highest_below_the_candidate(repo: Path, window):
    result = validate(repo, "fraud", 2, window, SETTINGS, RUNTIME)
    assert result.against == 1


def test_gate_json_admits_the_model_file_that_passed_and_no_other(repo: Path, window):
    version_dir = repo / "fraud" / str(COPY_VERSION)
    assert "no gate.json" in (refusal(version_dir) or "")
    result = validate(repo, "fraud", COPY_VERSION, window, SETTINGS, RUNTIME, against=2)
    path = write_result(version_dir, result)
    assert path == version_dir / GATE_FILE
    body = json.loads(path.read_text())
    assert body["passed"] is True and body["against"] == 2
    assert {c["name"] for c in body["criteria"]} >= {"auc", "outputs", "contract"}
    assert refusal(version_dir) is None
    (version_dir / "model.onnx").write_bytes((repo / "fraud" / "1" / "model.onnx").read_bytes())
    assert "model.onnx changed since" in (refusal(version_dir) or "")

    failed_dir = repo / "fraud" / str(NAN_VERSION)
    write_result(failed_dir, validate(repo, "fraud", NAN_VERSION, window, SETTINGS, RUNTIME, 2))
    why = refusal(failed_dir) or ""
    assert why.startswith("the validation gate failed it: outputs: probability has 6000 NaN")


def test_a_labelled_export_counts_a_shadowed_row_once_and_drops_unlabelled_rows(tmp_path: Path):
    table = pa.table(
        {
            "request_id": ["a", "a", "a", "b"],
            "row": [0, 1, 0, 0],
            "amount": [1.0, 2.0, 1.0, 3.0],
            "label": [1.0, 0.0, 1.0, None],
        }
    )
    pq.write_table(table, tmp_path / "w.parquet")
    window = read_window(tmp_path / "w.parquet")
    assert window.rows == 2 and window.labels.tolist() == [True, False]


def test_a_labelled_export_without_rows_is_an_empty_window():
    """What the sidecar exports for a model without labelled rows: columns of type null."""
    empty = pa.table({name: pa.nulls(0) for name in ("request_id", "row", "label")})
    window = window_of(empty, "sidecar")
    assert window.rows == 0 and window.labels.shape == (0,)
