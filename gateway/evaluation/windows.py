"""Recent events as columns for the alert rules: rows, event times, versions, segments, the
gateway's contract counts and joined labels, oldest first."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from numpy.typing import NDArray

from gateway.evaluation.frames import EVENT_FRAME_COLUMNS, Frame, batch_frame, concat_frames
from gateway.evaluation.store import EventStore, joined_sql, window_filter

__all__ = ["ALL", "Window", "build_window", "read_window"]

ALL = "all"  # a version's whole traffic, beside its ``name=value`` segments
_CHUNK_EVENTS = 16_384


@dataclass
class Window:
    """Events, oldest first, and their rows. Transport-free: the store reads one
    (``read_window``); tests and benchmarks build one from arrays."""

    frame: Frame
    time_us: NDArray[np.int64]  # per event
    version: NDArray[np.object_]  # per event
    segments: list[dict[str, str]]  # per event
    hashed: set[str] = field(default_factory=set)  # features sent as keyed hashes
    # per feature, per event: present, defaulted, out of range, out of vocabulary (as the
    # gateway counted them against the contract, before hashing)
    coverage: dict[str, NDArray[np.int64]] = field(default_factory=dict)
    labels: NDArray[np.float64] = field(default_factory=lambda: np.empty(0))  # per row; NaN

    def __post_init__(self) -> None:
        if self.labels.size != self.frame.rows:
            self.labels = np.full(self.frame.rows, np.nan)

    @cached_property
    def rows_per_event(self) -> NDArray[np.int64]:
        return np.diff(self.frame.starts).astype(np.int64)

    @cached_property
    def labelled_per_event(self) -> NDArray[np.int64]:
        labelled = ~np.isnan(self.labels)
        events = len(self.time_us)
        return np.bincount(self.frame.event_index[labelled], minlength=events).astype(np.int64)

    def row_mask(self, events: NDArray[np.int64]) -> NDArray[np.bool_]:
        picked = np.zeros(len(self.time_us), dtype=bool)
        picked[events] = True
        return picked[self.frame.event_index]

    def groups(self) -> dict[tuple[str, str], NDArray[np.bool_]]:
        """Event masks per (version, segment): each version's whole traffic (``all``) and each
        of its ``name=value`` segments."""
        out: dict[tuple[str, str], NDArray[np.bool_]] = {}
        count = len(self.time_us)
        for version in sorted(set(self.version.tolist())):
            in_version = self.version == version
            out[(version, ALL)] = in_version
            for i in np.flatnonzero(in_version):
                for key, value in self.segments[i].items():
                    mask = out.setdefault((version, f"{key}={value}"), np.zeros(count, bool))
                    mask[i] = True
        return out


def build_window(
    columns: Mapping[str, NDArray[Any]],
    scores: NDArray[np.float64],
    event_rows: NDArray[np.int64],
    time_us: NDArray[np.int64],
    version: Sequence[str],
    segments: Sequence[Mapping[str, str]],
    hashed: Iterable[str] = (),
    coverage: Mapping[str, NDArray[np.int64]] | None = None,
    labels: NDArray[np.float64] | None = None,
) -> Window:
    """A window from arrays: per row ``columns`` (numbers or strings), ``scores`` and
    ``labels``; per event its rows, time, version, segments and contract counts."""
    starts = np.concatenate([[0], np.cumsum(event_rows)]).astype(np.int64)
    frame = Frame(
        rows=int(starts[-1]),
        numbers={k: np.asarray(v, np.float64) for k, v in columns.items() if v.dtype != object},
        strings={k: v for k, v in columns.items() if v.dtype == object},
        scores=np.asarray(scores, np.float64),
        event_index=np.repeat(np.arange(len(event_rows)), event_rows),
        starts=starts,
    )
    return Window(
        frame=frame,
        time_us=np.asarray(time_us, np.int64),
        version=np.array(list(version), dtype=object),
        segments=[dict(s) for s in segments],
        hashed=set(hashed),
        coverage=dict(coverage or {}),
        labels=np.full(frame.rows, np.nan) if labels is None else labels,
    )


def read_window(
    store: EventStore,
    model: str,
    window_s: int,
    max_events: int,
    now_us: int,
    labelled: bool = True,
) -> Window:
    """``model``'s latest ``max_events`` events of the last ``window_s`` seconds (an event
    stamped a little ahead by the gateway's clock counts too), with their labels."""
    where, params = window_filter(model, "", now_us - window_s * 1_000_000, 0, table="e")
    recent = (
        f"e.rowid IN (SELECT rowid FROM events e WHERE {where} "
        f"ORDER BY event_time DESC, rowid DESC LIMIT {int(max_events)})"
    )
    parts: list[Frame] = []
    times, versions, rowids, coverage = [], [], [], []
    segments: list[dict[str, str]] = []
    hashed: set[str] = set()
    for batch in store.batches(
        f"""
        SELECT e.rowid AS rowid, epoch_us(event_time) AS time_us, version, segments,
               hashed, {EVENT_FRAME_COLUMNS}, coverage
        FROM events e WHERE {recent} ORDER BY event_time, e.rowid
        """,
        params,
        _CHUNK_EVENTS,
    ):
        column = batch.column
        parts.append(batch_frame(batch))
        times.append(column("time_us").to_numpy())
        rowids.append(column("rowid").to_numpy())
        versions += column("version").to_pylist()
        segments += [dict(m or ()) for m in column("segments").to_pylist()]
        hashed.update(pc.unique(pc.list_flatten(column("hashed"))).to_pylist())
        coverage.append(column("coverage"))
    frame = concat_frames(parts)
    rowid = np.concatenate(rowids) if rowids else np.empty(0, np.int64)
    window = Window(
        frame=frame,
        time_us=np.concatenate(times).astype(np.int64) if times else np.empty(0, np.int64),
        version=np.array(versions, dtype=object),
        segments=segments,
        hashed={name for name in hashed if name},
        coverage=_coverage(coverage, len(rowid)),
    )
    if labelled and len(rowid):
        table = store.arrow(
            f'SELECT e.rowid AS event, j."row", j.label FROM ({joined_sql()}) j '
            f"JOIN events e USING (event_id) WHERE {recent}",
            params,
        )
        window.labels = _labels(frame, rowid, table)
    return window


def _coverage(columns: list[pa.Array], events: int) -> dict[str, NDArray[np.int64]]:
    """Per feature, each event's contract counts (zeros where it has none)."""
    out: dict[str, NDArray[np.int64]] = {}
    offset = 0
    for column in columns:
        parents = pc.list_parent_indices(column).to_numpy() + offset
        entries = pc.list_flatten(column)
        offset += len(column)
        if not len(entries):
            continue
        names = entries.field("feature").dictionary_encode()
        code = names.indices.to_numpy()
        counts = np.column_stack(
            [
                entries.field(f).fill_null(0).to_numpy()
                for f in ("present", "defaulted", "out_of_range", "oov")
            ]
        ).astype(np.int64)
        for c, name in enumerate(names.dictionary.to_pylist()):
            table = out.get(name)
            if table is None:
                table = out[name] = np.zeros((events, 4), dtype=np.int64)
            mine = code == c
            np.add.at(table, parents[mine], counts[mine])
    return out


def _labels(frame: Frame, rowid: NDArray[np.int64], labels: pa.Table) -> NDArray[np.float64]:
    """The label of every frame row (NaN where none joined)."""
    out = np.full(frame.rows, np.nan)
    if not labels.num_rows:
        return out
    order = np.argsort(rowid)
    event = labels.column("event").to_numpy()
    at = np.minimum(np.searchsorted(rowid, event, sorter=order), len(rowid) - 1)
    found = rowid[order[at]] == event
    i = order[at[found]]
    rows = labels.column("row").to_numpy()[found]
    out[frame.starts[i] + rows] = labels.column("label").to_numpy()[found]
    return out
