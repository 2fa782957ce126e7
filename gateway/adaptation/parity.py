"""Training/serving parity: does an offline pipeline compute what serving computed?

Input: a labelled, training-ready export (``gateway export MODEL --labelled``): per prediction
row its raw features as served and the model input as served (``input.<column>``). Two checks:

- **The contract's own offline path.** ``features.assemble_columns`` on the exported raw
  features must rebuild every served matrix column bit for bit (sensitive features are exported
  hashed: their columns are not rebuilt, and are said to be skipped).
- **An offline pipeline** (``offline``: a table of the same rows, keyed by ``request_id`` and
  ``row``, with features as that pipeline computed them): each feature it has is compared with
  what serving received, and the matrix it would assemble with what the model ran on. A feature
  computed differently (a unit, a window, a default) shows up by name, with its differing rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from gateway.errors import SettingsError
from gateway.features import assemble_columns
from gateway.features.contract import Contract

__all__ = ["Difference", "ParityResult", "check_parity", "format_parity"]

_FIRST = 5  # differing rows named per feature or column
_INPUT = "input."
_KEY = ("request_id", "row")


@dataclass
class Difference:
    """How one feature or matrix column differs: rows compared, rows differing, the first of
    them (request id, row) and, for numbers, the largest absolute difference."""

    compared: int
    differing: int
    first: list[tuple[str, int]]
    max_abs_diff: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "compared": self.compared,
            "differing": self.differing,
            "first": [list(k) for k in self.first],
            "max_abs_diff": self.max_abs_diff,
        }


@dataclass
class ParityResult:
    contract: str
    rows: int
    # The contract's offline path on the exported raw features, against the served matrix.
    rebuilt: dict[str, Difference] = field(default_factory=dict)
    # The offline pipeline: its features against the served ones, and its matrix.
    offline_rows: int = 0
    offline_missing: int = 0  # export rows the offline table has no row for
    features: dict[str, Difference] = field(default_factory=dict)
    offline_matrix: dict[str, Difference] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # and why

    @property
    def ok(self) -> bool:
        parts = (self.rebuilt, self.features, self.offline_matrix)
        return not self.offline_missing and all(
            d.differing == 0 for part in parts for d in part.values()
        )

    def as_dict(self) -> dict[str, Any]:
        def part(found: Mapping[str, Difference]) -> dict[str, Any]:
            return {name: d.as_dict() for name, d in found.items()}

        return {
            "ok": self.ok,
            "contract": self.contract,
            "rows": self.rows,
            "rebuilt": part(self.rebuilt),
            "offline_rows": self.offline_rows,
            "offline_missing": self.offline_missing,
            "features": part(self.features),
            "offline_matrix": part(self.offline_matrix),
            "skipped": self.skipped,
        }


def check_parity(
    export: pa.Table, contract: Contract, offline: pa.Table | None = None
) -> ParityResult:
    """Compare, as the module says; ``export`` holds one model version's rows."""
    for name in _KEY:
        if name not in export.column_names:
            raise SettingsError(
                f"the export has no '{name}' column: write it with gateway export --labelled"
            )
    served_columns = [c for c in contract.columns if f"{_INPUT}{c}" in export.column_names]
    if not served_columns:
        raise SettingsError(
            f"the export has no input.<column> of contract {contract.version}: its events "
            "carried no model input (events.model_input off, or events older than it)"
        )
    # Rows that sent the model's own input carry no served matrix (NaN): not comparable.
    served = _matrix(export, served_columns)
    assembled = ~np.isnan(served).all(axis=1)
    export = export.filter(pa.array(assembled))
    served = served[assembled]
    keys = _keys(export)
    result = ParityResult(contract=contract.version, rows=export.num_rows)
    sensitive = sorted(contract.sensitive)
    if sensitive:
        result.skipped.append(
            f"{', '.join(sensitive)}: sensitive, exported hashed; their matrix columns are "
            "compared only where the export holds them as served"
        )
    public = [f.name for f in contract.features if f.name not in contract.sensitive]
    raw = {name: export.column(name) for name in public if name in export.column_names}
    rebuilt = assemble_columns(contract, raw).matrix
    position = {c: j for j, c in enumerate(contract.columns)}
    for j, column in enumerate(served_columns):
        if column.split("=")[0] in contract.sensitive:
            continue
        result.rebuilt[f"{_INPUT}{column}"] = _compare_floats(
            rebuilt[:, position[column]], served[:, j], keys, exact=True
        )
    if offline is not None:
        _offline(result, contract, export, served, served_columns, keys, offline)
    return result


def _offline(
    result: ParityResult,
    contract: Contract,
    export: pa.Table,
    served: np.ndarray,
    served_columns: Sequence[str],
    keys: list[tuple[str, int]],
    offline: pa.Table,
) -> None:
    for name in _KEY:
        if name not in offline.column_names:
            raise SettingsError(f"the offline table has no '{name}' column (rows are joined on it)")
    where = {k: i for i, k in enumerate(_keys(offline))}
    picked = [where.get(k) for k in keys]
    result.offline_rows = sum(p is not None for p in picked)
    result.offline_missing = len(picked) - result.offline_rows
    present = np.array([p is not None for p in picked], dtype=bool)
    rows = pa.array([p for p in picked if p is not None], pa.int64())
    mine = offline.take(rows)
    export = export.filter(pa.array(present))
    served = served[present]
    keys = [k for k, p in zip(keys, present, strict=True) if p]
    names = [f.name for f in contract.features if f.name in mine.column_names]
    for name in names:
        if name in contract.sensitive:
            result.skipped.append(f"{name}: sensitive, the export holds its hash, not its value")
            continue
        if name not in export.column_names:
            continue
        result.features[name] = _compare_values(mine.column(name), export.column(name), keys)
    if not names:
        result.skipped.append("the offline table names no feature of the contract")
        return
    matrix = assemble_columns(contract, {n: mine.column(n) for n in names}).matrix
    position = {c: j for j, c in enumerate(contract.columns)}
    for j, column in enumerate(served_columns):
        result.offline_matrix[f"{_INPUT}{column}"] = _compare_floats(
            matrix[:, position[column]], served[:, j], keys, exact=True
        )


def _matrix(table: pa.Table, columns: Sequence[str]) -> np.ndarray:
    return np.stack(
        [
            table.column(f"{_INPUT}{c}").to_numpy(zero_copy_only=False).astype(np.float32)
            for c in columns
        ],
        axis=1,
    )


def _keys(table: pa.Table) -> list[tuple[str, int]]:
    ids = table.column("request_id").to_pylist()
    rows = table.column("row").to_pylist()
    return [(str(i), int(r)) for i, r in zip(ids, rows, strict=True)]


def _compare_floats(
    mine: np.ndarray, theirs: np.ndarray, keys: list[tuple[str, int]], *, exact: bool
) -> Difference:
    """Bit for bit when ``exact`` (float32 bytes, NaN equal to NaN)."""
    a = np.ascontiguousarray(mine, np.float32)
    b = np.ascontiguousarray(theirs, np.float32)
    same = (a.view(np.uint32) == b.view(np.uint32)) if exact else np.isclose(a, b, equal_nan=True)
    same |= np.isnan(a) & np.isnan(b)
    return _difference(same, keys, np.abs(a.astype(np.float64) - b.astype(np.float64)))


def _compare_values(mine: pa.ChunkedArray, theirs: pa.ChunkedArray, keys: list[Any]) -> Difference:
    """A feature as the offline pipeline computed it against what serving received."""
    if (
        pa.types.is_integer(theirs.type)
        or pa.types.is_floating(theirs.type)
        or (pa.types.is_boolean(theirs.type))
    ):
        a = pc.cast(mine, pa.float64()).to_numpy(zero_copy_only=False)
        b = pc.cast(theirs, pa.float64()).to_numpy(zero_copy_only=False)
        same = (a == b) | (np.isnan(a) & np.isnan(b))
        return _difference(same, keys, np.abs(a - b))
    a_text = [None if v is None else str(v) for v in mine.to_pylist()]
    b_text = [None if v is None else str(v) for v in theirs.to_pylist()]
    same = np.array([x == y for x, y in zip(a_text, b_text, strict=True)], dtype=bool)
    return _difference(same, keys, None)


def _difference(
    same: np.ndarray, keys: Sequence[tuple[str, int]], gaps: np.ndarray | None
) -> Difference:
    differing = np.flatnonzero(~same)
    largest = None
    if gaps is not None and differing.size:
        finite = gaps[differing][np.isfinite(gaps[differing])]
        largest = float(finite.max()) if finite.size else float("nan")
    return Difference(
        compared=int(same.size),
        differing=int(differing.size),
        first=[keys[i] for i in differing[:_FIRST]],
        max_abs_diff=largest,
    )


def format_parity(result: ParityResult) -> str:
    lines = [
        f"parity {'OK' if result.ok else 'DIFFERS'}: contract {result.contract}, "
        f"{result.rows} served rows assembled under it"
    ]

    def part(title: str, found: Mapping[str, Difference]) -> None:
        bad = {name: d for name, d in found.items() if d.differing}
        lines.append(
            f"{title}: {len(found) - len(bad)} of {len(found)} match"
            + ("" if bad else " (bit for bit)" if found else "")
        )
        for name, d in bad.items():
            gap = f", largest difference {d.max_abs_diff:.6g}" if d.max_abs_diff else ""
            first = ", ".join(f"{rid}#{row}" for rid, row in d.first)
            lines.append(f"  {name}: {d.differing} of {d.compared} rows differ{gap} ({first})")

    part("contract's offline path, matrix columns", result.rebuilt)
    if result.offline_rows or result.offline_missing:
        lines.append(
            f"offline table: {result.offline_rows} rows joined"
            + (f", {result.offline_missing} served rows missing" if result.offline_missing else "")
        )
        part("offline features against served", result.features)
        part("offline matrix columns against served", result.offline_matrix)
    lines += [f"skipped: {why}" for why in result.skipped]
    return "\n".join(lines)
