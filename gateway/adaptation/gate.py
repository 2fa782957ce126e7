"""The validation gate: replay a labelled window through a new model version offline, as
serving would assemble it, and check explicit criteria before the version takes traffic.

Criteria, each pass / fail / not enough data with its numbers (``GateResult``):

* ``contract``: every raw feature the version's contract needs is in the data and in the
  serving version's contract (clients send that one), and the contract assembles the rows;
* ``outputs``: every output free of NaN and infinities, inside its declared range;
* ``auc``: the primary metric not worse than the serving version beyond ``auc_margin``, shown:
  the low end of the paired DeLong interval for candidate - serving lies above -margin (both
  score the same rows offline); without enough positives and negatives it fails;
* ``segment.<key>=<value>``: the same per segment with its own margin; a segment without
  enough labels says so and does not fail the gate;
* ``latency.batch_1`` / ``latency.batch_<max>``: p95 of timed runs within budget.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from numpy.typing import NDArray

from gateway.adaptation.gate_result import (
    MODEL_FILE,
    Criterion,
    GateResult,
    Number,
    Outcome,
    file_digest,
)
from gateway.errors import GatewayError, ModelLoadError, SettingsError
from gateway.evaluation.stats import auc_difference, delong
from gateway.features import Contract, assemble_columns, model_contracts
from gateway.runtime.session import OnnxRuntimeSession, SessionOptions
from gateway.settings import GateSettings, ModelConfig, RuntimeSettings, load_model_config
from gateway.types import ascii_int

__all__ = ["LabelledWindow", "read_window", "validate"]

SEGMENT_PREFIX = "segment."
MAX_SEGMENT_VALUES = 50  # per segment key, the most frequent: bounds the work and the report
_REPLAY_ROWS = 4096  # rows per offline run when the model has no max_batch_size


@dataclass(frozen=True)
class LabelledWindow:
    """Labelled rows (raw features, ``label``, optional ``segment.*``) and where from."""

    table: pa.Table
    labels: NDArray[np.bool_]
    source: str

    @property
    def rows(self) -> int:
        return int(self.table.num_rows)


def read_window(path: Path, source: str | None = None) -> LabelledWindow:
    """A labelled Parquet file (``gateway export MODEL --labelled``, or any table with raw
    feature columns and ``label``). Rows without a label are dropped; a row exported twice
    (a primary and its shadow share request id and row) counts once."""
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowInvalid) as err:
        raise SettingsError(f"--data: cannot read {path} as Parquet: {err}") from None
    return window_of(table, source or str(path))


def window_of(table: pa.Table, source: str) -> LabelledWindow:
    if "label" not in table.column_names:
        raise SettingsError(f"{source}: no 'label' column (export with --labelled)")
    if table.num_rows and {"request_id", "row"} <= set(table.column_names):
        first: dict[tuple[object, object], int] = {}
        ids, rows = table.column("request_id").to_pylist(), table.column("row").to_pylist()
        keys = zip(ids, rows, strict=True)
        for i, key in enumerate(keys):
            first.setdefault(key, i)
        table = table.take(sorted(first.values()))
    label = table.column("label").to_numpy(zero_copy_only=False).astype(np.float64)
    keep = ~np.isnan(label)
    if not keep.all():
        table = table.filter(pa.array(keep))
        label = label[keep]
    return LabelledWindow(table, label >= 0.5, source)


@dataclass(frozen=True)
class _Version:
    """One version as the gate replays it: its session, contract and outputs on the window."""

    number: int
    config: ModelConfig
    contract: Contract | None
    session: OnnxRuntimeSession
    matrix: NDArray[np.float32] | None = None
    outputs: Mapping[str, NDArray[np.float64]] | None = None
    error: str = ""
    oov: Mapping[str, int] | None = None  # out-of-vocabulary rows per sensitive feature

    @property
    def scores(self) -> NDArray[np.float64]:
        assert self.outputs is not None
        first = next(iter(self.outputs.values()))
        return first.reshape(len(first), -1)[:, 0]


def validate(
    repository: Path,
    model: str,
    version: int,
    window: LabelledWindow,
    settings: GateSettings,
    runtime: RuntimeSettings,
    against: int | None = None,
    digest: str = "",
) -> GateResult:
    """Judge ``model`` ``version`` on ``window`` against ``against`` (default: the highest
    version below it in the repository; none for a first version). ``digest``: the model
    file's SHA-256 where the caller took it already (taken here otherwise)."""
    model_dir = repository / model
    if against is None:
        against = _previous_version(model_dir, version)
    candidate = _replay(model_dir, version, window, runtime)
    serving = _replay(model_dir, against, window, runtime) if against is not None else None
    criteria = [_contract(candidate, serving, window)]
    if candidate.outputs is not None:
        criteria.append(_outputs(candidate, settings))
        criteria.append(_auc(candidate, serving, window.labels, settings))
        criteria += _segments(candidate, serving, window, settings)
        criteria += _latency(candidate, settings)
    return GateResult(
        model=model,
        version=version,
        against=against,
        model_digest=digest or file_digest(model_dir / str(version) / MODEL_FILE),
        contract=candidate.contract.version if candidate.contract is not None else None,
        data=window.source,
        rows=window.rows,
        criteria=tuple(criteria),
        checked_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )


def _previous_version(model_dir: Path, version: int) -> int | None:
    if not model_dir.is_dir():
        raise SettingsError(f"model directory {model_dir} does not exist")
    below = [
        n
        for child in model_dir.iterdir()
        if (n := ascii_int(child.name)) is not None
        and n < version
        and (child / MODEL_FILE).exists()
    ]
    return max(below) if below else None


def _replay(
    model_dir: Path, number: int, window: LabelledWindow, runtime: RuntimeSettings
) -> _Version:
    path = model_dir / str(number) / MODEL_FILE
    if not path.exists():
        raise SettingsError(f"{path} does not exist")
    config = load_model_config(model_dir / "config.yaml")
    found = model_contracts(model_dir)
    contract = None
    if found is not None:
        contracts = found[0]
        wanted = config.contract.for_version(number) or list(contracts)[-1]
        if wanted not in contracts:
            raise SettingsError(f"{model_dir}: contract '{wanted}' is not in features.yaml")
        contract = contracts[wanted]
    options = SessionOptions(
        device=config.device or runtime.device,
        # NOTE: as the repository sizes a served instance, so latency is measured as served.
        intra_op_threads=config.intra_op_threads
        or runtime.intra_op_threads
        or max(1, (os.cpu_count() or 1) // config.instances),
        inter_op_threads=runtime.inter_op_threads,
        graph_optimization=config.graph_optimization or runtime.graph_optimization,
    )
    try:
        session = OnnxRuntimeSession(path, options)
    except ModelLoadError as err:
        raise SettingsError(str(err)) from None
    version = _Version(number, config, contract, session)
    if contract is None:
        return _with(version, error="it has no feature contract: the gate replays raw features")
    columns = {
        name: window.table.column(name)
        for name in contract.feature_names
        if name in window.table.column_names
    }
    try:
        assembly = assemble_columns(contract, columns)
        matrix = assembly.matrix
        outputs = _run(session, contract, matrix, config.max_batch_size)
    except (GatewayError, ValueError, RuntimeError) as err:
        # ContractViolation names the feature and row; ORT's errors name the tensor.
        return _with(version, error=str(err))
    coverage = assembly.coverage()
    oov = {name: coverage[name]["oov"] for name in sorted(contract.sensitive)}
    return _with(version, matrix=matrix, outputs=outputs, oov=oov)


def _with(version: _Version, **changes: Any) -> _Version:
    return replace(version, **changes)


def _run(
    session: OnnxRuntimeSession, contract: Contract, matrix: NDArray[np.float32], max_batch: int
) -> dict[str, NDArray[np.float64]]:
    name = contract.input_name or session.inputs[0].name
    names = [spec.name for spec in session.outputs]
    step = max_batch or _REPLAY_ROWS
    parts: list[list[NDArray[Any]]] = []
    for start in range(0, max(len(matrix), 1), step):
        parts.append(session.run({name: matrix[start : start + step]}, names))
    return {
        out: np.concatenate([np.asarray(p[i], dtype=np.float64) for p in parts])
        for i, out in enumerate(names)
    }


# -- criteria --------------------------------------------------------------------------------


def _contract(candidate: _Version, serving: _Version | None, window: LabelledWindow) -> Criterion:
    if candidate.contract is None:
        return Criterion("contract", "fail", candidate.error)
    contract = candidate.contract
    present = set(window.table.column_names)
    missing = [f for f in contract.feature_names if f not in present]
    unsent: list[str] = []
    if serving is not None and serving.contract is not None:
        served = set(serving.contract.feature_names)
        unsent = [
            f.name for f in contract.features if f.name not in served and f.null_policy == "reject"
        ]
    numbers: dict[str, Number] = {
        "contract": contract.version,
        "features": len(contract.feature_names),
        "missing_in_data": ", ".join(missing) or None,
        "required_not_in_serving_contract": ", ".join(unsent) or None,
    }
    problems = []
    if missing:
        problems.append(f"the data lack {', '.join(missing)}")
    if unsent:
        problems.append(
            f"{', '.join(unsent)} must be sent (no null default) but version "
            f"{serving.number if serving else '?'}'s contract does not take them"
        )
    if candidate.error:
        problems.append(f"replay failed: {candidate.error}")
    if problems:
        return Criterion("contract", "fail", "; ".join(problems), numbers)
    # NOTE: a labelled export holds sensitive values hashed: replayed, they are out of
    # vocabulary for both versions alike. Said, not failed: the comparison stays paired.
    hashed = [f for f, n in (candidate.oov or {}).items() if window.rows and n > window.rows / 2]
    numbers.update({f"{f}.oov_rows": n for f, n in (candidate.oov or {}).items()})
    note = (
        f"; {', '.join(hashed)} mostly out of vocabulary (sensitive: hashed in an export), "
        "replayed as such for both versions"
        if hashed
        else ""
    )
    return Criterion(
        "contract",
        "pass",
        f"contract {contract.version}: all {len(contract.feature_names)} features present "
        f"and assembled for {window.rows} rows{note}",
        numbers,
    )


def _outputs(candidate: _Version, settings: GateSettings) -> Criterion:
    assert candidate.outputs is not None
    problems: list[str] = []
    numbers: dict[str, Number] = {}
    for name, values in candidate.outputs.items():
        nan = int(np.isnan(values).sum())
        inf = int(np.isinf(values).sum())
        finite = values[np.isfinite(values)]
        low = float(finite.min()) if finite.size else None
        high = float(finite.max()) if finite.size else None
        numbers.update({f"{name}.nan": nan, f"{name}.inf": inf, f"{name}.min": low})
        numbers[f"{name}.max"] = high
        if nan or inf:
            problems.append(f"{name} has {nan} NaN and {inf} infinite values of {values.size}")
        declared = settings.output_ranges.get(name)
        if declared is not None:
            outside = int(((finite < declared.min) | (finite > declared.max)).sum())
            numbers[f"{name}.outside_range"] = outside
            if outside:
                problems.append(
                    f"{name} has {outside} values outside [{declared.min}, {declared.max}] "
                    f"(min {low}, max {high})"
                )
    if problems:
        return Criterion("outputs", "fail", "; ".join(problems), numbers)
    names = ", ".join(candidate.outputs)
    return Criterion("outputs", "pass", f"{names}: finite and within declared ranges", numbers)


def _auc(
    candidate: _Version,
    serving: _Version | None,
    labels: NDArray[np.bool_],
    settings: GateSettings,
    name: str = "auc",
    mask: NDArray[np.bool_] | None = None,
    margin: float | None = None,
) -> Criterion:
    margin = settings.auc_margin if margin is None else margin
    y = labels if mask is None else labels[mask]
    positives, negatives = int(y.sum()), int((~y).sum())
    numbers: dict[str, Number] = {
        "rows": len(y),
        "positives": positives,
        "negatives": negatives,
        "margin": margin,
    }
    if positives < settings.min_positives or negatives < settings.min_negatives:
        return Criterion(
            name,
            "not_enough_data",
            f"not enough data: {positives} positives and {negatives} negatives "
            f"(needs {settings.min_positives} and {settings.min_negatives})",
            numbers,
        )
    new = candidate.scores if mask is None else candidate.scores[mask]
    bad = int(np.isnan(new).sum())
    if bad:
        return Criterion(name, "fail", f"the candidate's scores hold {bad} NaN values", numbers)
    auc_new = delong(y, new)[0]
    numbers["candidate_auc"] = round(auc_new, 6)
    if serving is None or serving.outputs is None:
        why = "no serving version to compare with" if serving is None else serving.error
        return Criterion(name, "pass", f"AUC {auc_new:.4f}; {why}", numbers)
    old = serving.scores if mask is None else serving.scores[mask]
    diff = auc_difference((y, old), (y, new), settings.confidence, paired=True)
    numbers.update(
        serving_auc=round(auc_new - diff.estimate, 6),
        difference=round(diff.estimate, 6),
        difference_low=round(diff.low, 6),
        difference_high=round(diff.high, 6),
        confidence=settings.confidence,
    )
    shown = (
        f"AUC {auc_new:.4f} vs {auc_new - diff.estimate:.4f} (version {serving.number}), "
        f"difference {diff.estimate:+.4f}, {settings.confidence:.0%} interval "
        f"[{diff.low:+.4f}, {diff.high:+.4f}], margin -{margin}"
    )
    outcome: Outcome = "pass" if diff.low > -margin else "fail"
    if outcome == "fail":
        shown += ": not shown to be within the margin"
    return Criterion(name, outcome, shown, numbers)


def _segments(
    candidate: _Version, serving: _Version | None, window: LabelledWindow, settings: GateSettings
) -> list[Criterion]:
    out = []
    for column in window.table.column_names:
        if not column.startswith(SEGMENT_PREFIX):
            continue
        values = np.asarray(window.table.column(column).to_pylist(), dtype=object)
        present = values[values != None]  # noqa: E711 (elementwise over objects)
        kinds, counts = np.unique(present.astype(str), return_counts=True)
        for value in kinds[np.argsort(-counts, kind="stable")][:MAX_SEGMENT_VALUES]:
            mask = values.astype(str) == value
            name = f"{column}={value}"
            out.append(
                _auc(
                    candidate,
                    serving,
                    window.labels,
                    settings,
                    name,
                    mask,
                    settings.segment_auc_margin,
                )
            )
    return out


def _latency(candidate: _Version, settings: GateSettings) -> list[Criterion]:
    assert candidate.matrix is not None and candidate.contract is not None
    sizes = [(1, settings.latency_budget_ms)]
    if candidate.config.max_batch_size > 1:
        sizes.append((candidate.config.max_batch_size, settings.max_batch_latency_budget_ms))
    name = candidate.contract.input_name or candidate.session.inputs[0].name
    outputs = [spec.name for spec in candidate.session.outputs]
    matrix = candidate.matrix if len(candidate.matrix) else np.zeros((1, candidate.contract.width))
    out = []
    for size, budget in sizes:
        rows = np.resize(matrix, (size, matrix.shape[1])).astype(np.float32)
        candidate.session.run({name: rows}, outputs)  # warm-up
        times = []
        for _ in range(settings.latency_runs):
            began = time.perf_counter()
            candidate.session.run({name: rows}, outputs)
            times.append((time.perf_counter() - began) * 1000)
        p50, p95 = (float(np.percentile(times, q)) for q in (50, 95))
        numbers: dict[str, Number] = {
            "batch": size,
            "runs": settings.latency_runs,
            "p50_ms": round(p50, 3),
            "p95_ms": round(p95, 3),
            "budget_ms": budget,
        }
        outcome: Outcome = "pass" if p95 <= budget else "fail"
        reason = f"p95 {p95:.2f} ms (p50 {p50:.2f}) at batch {size}, budget {budget} ms"
        out.append(Criterion(f"latency.batch_{size}", outcome, reason, numbers))
    return out
