"""Reports: per model version and segment over a window, drift against the reference profile,
coverage, output distribution, quality once labels have joined, and the alerts that fire."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from numpy.typing import NDArray

from gateway.evaluation.frames import EVENT_FRAME_COLUMNS, Frame, batch_frame, concat_frames
from gateway.evaluation.labels import RowLabels, label_quality, read_labels
from gateway.evaluation.profile import (
    REFERENCE_FILE,
    categorical_drift,
    load_reference,
    numeric_drift,
)
from gateway.evaluation.store import EventStore, window_filter

__all__ = ["build_report", "drift_timeline", "quality"]

ALL = "all"
_CHUNK_EVENTS = 16_384  # events a report turns into columns at a time


def build_report(
    store: EventStore,
    model: str,
    window_s: int,
    repository: Path | None,
    max_events: int,
    now_us: int | None = None,
    bounded: bool = False,
    threshold: float = 0.5,
) -> dict[str, Any]:
    """Metrics per version and segment for the events of the last ``window_s`` seconds.

    ``bounded`` leaves out events after ``now_us`` too (a slice of the past); otherwise an
    event stamped a little ahead by the gateway's clock still counts. The report says what it
    read: ``events`` of ``events_in_window`` (``truncated`` when ``max_events`` cut it, the
    events read then starting at ``read_start_us``), and how the rows are labelled.
    """
    now_us = now_us or time.time_ns() // 1000
    start_us = now_us - window_s * 1_000_000
    where, params = window_filter(model, "", start_us, now_us if bounded else 0, table="e")
    # NOTE: the window's latest max_events events are picked by rowid first (time ties broken
    # by rowid, so every query below reads the same events), then read in storage order: a
    # top-N sort over whole events held them all in DuckDB (~1 GB at 200,000 events).
    recent = (
        f"e.rowid IN (SELECT rowid FROM events e WHERE {where} "
        f"ORDER BY event_time DESC, rowid DESC LIMIT {int(max_events)})"
    )
    frame, events = _read_events(store, recent, params)
    in_window = store.query(f"SELECT count(*) FROM events e WHERE {where}", params)[0][0]
    labels = read_labels(store, recent, params)
    # Coverage is summed in DuckDB per version and segments: as Python objects it is one
    # dict per feature per event, gigabytes at max_report_events.
    coverage = _coverage(
        store.query(
            f"""
            SELECT version, segments, c.feature, coalesce(sum(c.present), 0),
                   coalesce(sum(c.defaulted), 0), coalesce(sum(c.out_of_range), 0),
                   coalesce(sum(c.oov), 0)
            FROM (SELECT version, segments, unnest(coverage) AS c FROM events e WHERE {recent})
            GROUP BY ALL
            """,
            params,
        )
    )
    reference = _reference(repository, model)
    report: dict[str, Any] = {
        "model": model,
        "window_s": window_s,
        "start_us": start_us,
        "end_us": now_us,
        "events": len(events.rowid),
        "events_in_window": int(in_window),
        "max_events": int(max_events),
        "truncated": len(events.rowid) < in_window,
        "read_start_us": int(events.time_us.min()) if len(events.rowid) else start_us,
        "reference": bool(reference),
        "versions": {},
    }
    if not len(events.rowid):
        return report
    label_of = _labels(frame, events.rowid, labels)
    report["labels"] = label_quality(label_of, np.ones(frame.rows, bool), frame.scores)
    for code, version in enumerate(events.versions):
        in_version = events.version == code
        groups = _segments(events.segments, in_version)
        out = report["versions"][version] = {}
        for segment, event_mask in groups.items():
            rows = event_mask[frame.event_index]
            out[segment] = _metrics(
                frame,
                rows=rows,
                coverage=coverage.get((version, segment), {}),
                label_of=label_of,
                reference=reference,
                version=version,
                hashed=events.hashed,
                threshold=threshold,
            )
    return report


def _reference(repository: Path | None, model: str) -> dict[str, Any]:
    if repository is None:
        return {}
    path = repository / model / REFERENCE_FILE
    return load_reference(path) if path.exists() else {}


@dataclass
class _Events:
    """What a report groups events by, per event (the frame holds their rows)."""

    rowid: NDArray[np.int64]
    time_us: NDArray[np.int64]  # event_time
    version: NDArray[np.int64]  # an index into ``versions``
    versions: list[str]  # sorted
    segments: list[list[tuple[str, str]]]
    hashed: set[str]  # feature names sent as hashes by any event


def _read_events(store: EventStore, recent: str, params: Sequence[object]) -> tuple[Frame, _Events]:
    """The events' rows as one frame, read from DuckDB a chunk at a time: only the columns
    built so far and one chunk of events are held (a report's memory is about 8 bytes per
    feature per row, not a Python object per value)."""
    parts: list[Frame] = []
    rowids: list[NDArray[np.int64]] = []
    times: list[NDArray[np.int64]] = []
    versions: list[pa.Array] = []
    segments: list[list[tuple[str, str]]] = []
    hashed: set[str] = set()
    for batch in store.batches(
        f"""
        SELECT e.rowid AS rowid, epoch_us(event_time) AS time_us, version, segments,
               hashed, {EVENT_FRAME_COLUMNS}
        FROM events e WHERE {recent}
        """,
        params,
        _CHUNK_EVENTS,
    ):
        column = batch.column
        parts.append(batch_frame(batch))
        rowids.append(column("rowid").to_numpy())
        times.append(column("time_us").to_numpy())
        versions.append(column("version"))
        segments += column("segments").to_pylist()
        hashed.update(pc.unique(pc.list_flatten(column("hashed"))).to_pylist())
    version = pa.chunked_array(versions, pa.string()).combine_chunks().dictionary_encode()
    names = version.dictionary.to_pylist()
    order = sorted(range(len(names)), key=names.__getitem__)
    recode = np.empty(len(names), dtype=np.int64)
    recode[order] = np.arange(len(names))
    return concat_frames(parts), _Events(
        rowid=np.concatenate(rowids) if rowids else np.empty(0, np.int64),
        time_us=np.concatenate(times) if times else np.empty(0, np.int64),
        version=recode[version.indices.to_numpy()] if names else np.empty(0, np.int64),
        versions=[names[i] for i in order],
        segments=segments,
        hashed={name for name in hashed if name},
    )


def _labels(frame: Frame, rowid: NDArray[np.int64], labels: pa.Table) -> RowLabels:
    """The label of every frame row (NaN where none joined), with its delay and copies."""
    out = RowLabels.unlabelled(frame.rows)
    if not labels.num_rows:
        return out
    order = np.argsort(rowid)
    event = labels.column("event").to_numpy()
    at = np.minimum(np.searchsorted(rowid, event, sorter=order), len(rowid) - 1)
    found: NDArray[np.bool_] = rowid[order[at]] == event
    i = order[at[found]]
    rows = frame.starts[i] + labels.column("row").to_numpy()[found]

    def column(name: str) -> NDArray[Any]:
        values: NDArray[Any] = labels.column(name).to_numpy(zero_copy_only=False)
        return values[found]

    out.value[rows] = column("label")
    out.delay_s[rows] = column("delay_us") / 1e6
    out.replaced[rows] = column("replaced")
    out.disagreeing[rows] = column("disagreeing")
    return out


def _segments(segments: Sequence[Any], in_version: NDArray[np.bool_]) -> dict[str, NDArray[Any]]:
    """Event masks: all of the version's traffic, and each ``name=value`` segment."""
    groups: dict[str, NDArray[np.bool_]] = {ALL: in_version}
    for i, entries in enumerate(segments):
        if not in_version[i] or not entries:
            continue
        for key, value in entries:
            name = f"{key}={value}"
            mask = groups.get(name)
            if mask is None:
                mask = groups[name] = np.zeros(len(segments), dtype=bool)
            mask[i] = True
    return groups


def _metrics(
    frame: Frame,
    rows: NDArray[np.bool_],
    coverage: dict[str, dict[str, float]],
    label_of: RowLabels,
    reference: dict[str, Any],
    version: str,
    hashed: set[str],
    threshold: float,
) -> dict[str, Any]:
    profiles = dict(reference.get("features", {}))
    versioned = reference.get("versions", {}).get(version, {})
    profiles.update(versioned.get("inputs", {}))
    features: dict[str, dict[str, float]] = {}
    for name, column in frame.numbers.items():
        profile = profiles.get(name)
        if profile is not None and profile.get("kind") == "numeric":
            features[name] = numeric_drift(profile, column[rows])
    for name, column_s in frame.strings.items():
        profile = profiles.get(name)
        if name in hashed or profile is None or profile.get("kind") != "categorical":
            continue  # a sensitive feature's hashes cannot be compared with clear values
        features[name] = categorical_drift(profile, column_s[rows].tolist())
    for name, shares in coverage.items():
        features.setdefault(name, {}).update(shares)
    result: dict[str, Any] = {"rows": int(rows.sum()), "features": features}
    outputs = versioned.get("outputs", {})
    if outputs:
        profile = next(iter(outputs.values()))
        result["output"] = numeric_drift(profile, frame.scores[rows])
    labelled = rows & ~np.isnan(label_of.value)
    result["quality"] = quality(label_of.value[labelled], frame.scores[labelled], threshold)
    result["labels"] = label_quality(label_of, rows, frame.scores)
    return result


def _coverage(
    sums: Sequence[tuple[Any, ...]],
) -> dict[tuple[str, str], dict[str, dict[str, float]]]:
    """Per (version, segment) and feature, the share of values the contract defaulted (and
    found out of range or vocabulary), from sums per version, segments and feature."""
    totals: dict[tuple[str, str], dict[str, NDArray[np.int64]]] = {}
    for version, segments, feature, *counts in sums:
        names = [f"{key}={value}" for key, value in (segments or {}).items()]
        for segment in (ALL, *names):
            features = totals.setdefault((str(version), segment), {})
            features[feature] = features.get(feature, 0) + np.array(counts, dtype=np.int64)
    out: dict[tuple[str, str], dict[str, dict[str, float]]] = {}
    for group, features in totals.items():
        shares = out[group] = {}
        for name, (present, defaulted, out_of_range, oov) in features.items():
            total = present + defaulted
            if total:
                shares[name] = {
                    "defaulted": float(defaulted / total),
                    "contract_out_of_range": float(out_of_range / total),
                    "contract_oov": float(oov / total),
                }
    return out


def quality(
    labels: NDArray[np.float64], scores: NDArray[np.float64], threshold: float = 0.5
) -> dict[str, float]:
    """AUC, log loss, accuracy at ``threshold`` and calibration (ECE over 10 bins) of labelled
    rows."""
    n = int(labels.size)
    out: dict[str, float] = {"labelled": n}
    if n == 0:
        return out
    y = labels > 0.5
    p = np.clip(scores, 1e-7, 1 - 1e-7)
    out["positive_rate"] = float(y.mean())
    out["mean_score"] = float(scores.mean())
    out["log_loss"] = float(-np.mean(np.where(y, np.log(p), np.log(1 - p))))
    out["accuracy"] = float(np.mean((scores >= threshold) == y))
    out["threshold"] = threshold
    bins = np.minimum((scores * 10).astype(int), 9)
    ece = 0.0
    for b in range(10):
        in_bin = bins == b
        if in_bin.any():
            ece += in_bin.mean() * abs(scores[in_bin].mean() - y[in_bin].mean())
    out["ece"] = float(ece)
    positives, negatives = int(y.sum()), int(n - y.sum())
    if positives and negatives:
        out["auc"] = _auc(y, scores, positives, negatives)
    return out


def _auc(
    y: NDArray[np.bool_], scores: NDArray[np.float64], positives: int, negatives: int
) -> float:
    """Mann-Whitney U over ranks, ties given their average rank."""
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores))
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    average = first + (counts + 1) / 2  # 1-based average rank of each tie group
    ranks[order] = np.repeat(average, counts)
    return float((ranks[y].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def drift_timeline(
    store: EventStore,
    model: str,
    window_s: int,
    repository: Path | None,
    max_events: int,
    buckets: int = 12,
    top: int = 6,
    now_us: int | None = None,
) -> dict[str, Any]:
    """PSI per feature over ``buckets`` equal slices of the window, per version (all traffic);
    the ``top`` features by their largest PSI."""
    now_us = now_us or time.time_ns() // 1000
    step_s = max(1, window_s // buckets)
    labels = [
        f"-{(buckets - 1 - i) * step_s} s" if i < buckets - 1 else "now" for i in range(buckets)
    ]
    out: dict[str, Any] = {}
    for i in range(buckets):
        end_us = now_us - (buckets - 1 - i) * step_s * 1_000_000
        sliced = build_report(store, model, step_s, repository, max_events, end_us, bounded=True)
        for version, segments in sliced["versions"].items():
            series = out.setdefault(version, {"labels": labels, "features": {}})["features"]
            for name, metrics in segments[ALL]["features"].items():
                if "psi" in metrics:
                    series.setdefault(name, [None] * buckets)[i] = metrics["psi"]
    for entry in out.values():
        ranked = sorted(
            entry["features"].items(), key=lambda kv: -max(v for v in kv[1] if v is not None)
        )
        entry["features"] = dict(ranked[:top])
    return out
