"""Events as columns: the packed feature, model input and output blocks of many events -> one
numpy array per feature or input column (every row of every event), for metrics and for the
training-set export."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
from numpy.typing import NDArray

__all__ = [
    "EVENT_FRAME_COLUMNS",
    "NAMES_SEPARATOR",
    "Frame",
    "batch_frame",
    "build_frame",
    "concat_frames",
]

_F64 = np.dtype("<f8")
_F32 = np.dtype("<f4")
NAMES_SEPARATOR = "\x1f"  # ASCII unit separator: never in a feature name


@dataclass
class Frame:
    """Rows of many events. ``event_index[i]`` is the event row ``i`` came from; event ``k``'s
    rows start at ``starts[k]`` (``starts[-1]`` is ``rows``). ``inputs`` are the model input's
    columns as served (float32), for the events that carry one."""

    rows: int = 0
    numbers: dict[str, NDArray[np.float64]] = field(default_factory=dict)
    strings: dict[str, NDArray[np.object_]] = field(default_factory=dict)
    inputs: dict[str, NDArray[np.float32]] = field(default_factory=dict)
    scores: NDArray[np.float64] = field(default_factory=lambda: np.empty(0))
    event_index: NDArray[np.int64] = field(default_factory=lambda: np.empty(0, np.int64))
    starts: NDArray[np.int64] = field(default_factory=lambda: np.zeros(1, np.int64))


def build_frame(
    row_counts: Sequence[int],
    numeric_names: Sequence[Sequence[str] | str | None],
    numeric: Sequence[bytes | None],
    strings: pa.Array | pa.ChunkedArray,
    outputs: Sequence[bytes | None],
    output_widths: Sequence[Sequence[int] | None],
    input_columns: Sequence[Sequence[str] | None] = (),
    model_input: Sequence[bytes | None] = (),
) -> Frame:
    """Concatenate events' rows. A feature an event lacks is NaN (numbers) or None (strings)
    for its rows; ``scores`` is the first output's first column (NaN where absent).
    ``strings`` is the events' ``strings`` column as Arrow (map<string, list<string>>).
    With ``input_columns`` and ``model_input`` (each event's), ``inputs`` holds the model
    input's columns, NaN where an event carries none."""
    total = int(sum(row_counts))
    frame = Frame(rows=total)
    frame.event_index = np.repeat(np.arange(len(row_counts)), row_counts)
    frame.scores = np.full(total, np.nan)
    starts = frame.starts = np.concatenate([[0], np.cumsum(row_counts)]).astype(np.int64)
    _blocks(frame.numbers, _F64, row_counts, starts, numeric_names, numeric)
    if model_input:
        _blocks(frame.inputs, _F32, row_counts, starts, input_columns, model_input)
    _strings(frame, strings, np.asarray(row_counts, dtype=np.int64))
    _scores(frame, row_counts, starts, outputs, output_widths)
    return frame


def _blocks(
    columns: dict[str, NDArray[Any]],
    dtype: np.dtype[Any],
    row_counts: Sequence[int],
    starts: NDArray[np.int64],
    layouts: Sequence[Sequence[str] | str | None],
    blobs_of: Sequence[bytes | None],
) -> None:
    """Each event's rows x len(names) block of ``dtype`` into one column per name.

    Runs of events with the same columns (the usual case: one contract or one input shape per
    version) are decoded at once: one join, one frombuffer, one copy per column."""
    rows = int(starts[-1])
    size = dtype.itemsize
    i = 0
    while i < len(row_counts):
        layout = layouts[i]
        j = i + 1
        while j < len(row_counts) and layouts[j] == layout:
            j += 1
        names = _names(layout)
        blobs = [blobs_of[k] or b"" for k in range(i, j)]
        whole = [
            len(b) == size * len(names) * row_counts[k]
            for k, b in zip(range(i, j), blobs, strict=True)
        ]
        if names and all(whole):
            _put(columns, dtype, rows, names, b"".join(blobs), int(starts[i]), int(starts[j]))
        elif names:  # a malformed event is left out, not its neighbours
            for k, ok in zip(range(i, j), whole, strict=True):
                if ok:
                    start, end = int(starts[k]), int(starts[k + 1])
                    _put(columns, dtype, rows, names, blobs[k - i], start, end)
        i = j


# What a query selects for ``batch_frame`` (numeric_names joined by NAMES_SEPARATOR).
EVENT_FRAME_COLUMNS = (
    f"array_to_string(numeric_names, chr({ord(NAMES_SEPARATOR)})) AS numeric_names, "
    "numeric, strings, outputs, output_widths, rows"
)


def batch_frame(batch: Any) -> Frame:
    """The frame of one Arrow record batch of events selected with EVENT_FRAME_COLUMNS."""
    column = batch.column
    return build_frame(
        row_counts=column("rows").to_pylist(),
        numeric_names=column("numeric_names").to_pylist(),
        numeric=column("numeric").to_pylist(),
        strings=column("strings"),
        outputs=column("outputs").to_pylist(),
        output_widths=column("output_widths").to_pylist(),
    )


def concat_frames(parts: Sequence[Frame]) -> Frame:
    """One frame of the rows of several, in order: a feature a part lacks is NaN (numbers) or
    None (strings) in that part's rows. The parts give up their columns (memory)."""
    if len(parts) == 1:
        return parts[0]
    frame = Frame(rows=sum(p.rows for p in parts))
    row_at = np.cumsum([0, *(p.rows for p in parts)])
    event_at = np.cumsum([0, *(len(p.starts) - 1 for p in parts)])
    if parts:
        frame.scores = np.concatenate([p.scores for p in parts])
        frame.event_index = np.concatenate(
            [p.event_index + event_at[i] for i, p in enumerate(parts)]
        )
        frame.starts = np.concatenate(
            [[0], *(p.starts[1:] + row_at[i] for i, p in enumerate(parts))]
        )
    frame.numbers = _stacked([p.numbers for p in parts], row_at, np.nan, np.float64)
    frame.strings = _stacked([p.strings for p in parts], row_at, None, object)
    frame.inputs = _stacked([p.inputs for p in parts], row_at, np.nan, np.float32)
    return frame


def _stacked(
    columns: list[dict[str, NDArray[Any]]], row_at: NDArray[np.int64], fill: object, dtype: Any
) -> dict[str, NDArray[Any]]:
    """Each name's columns one after another (``fill`` where a part lacks it); the parts'
    columns are given up as they are copied."""
    out: dict[str, NDArray[Any]] = {}
    for name in dict.fromkeys(n for part in columns for n in part):
        column = out[name] = np.full(int(row_at[-1]), fill, dtype=dtype)
        for i, part in enumerate(columns):
            if name in part:
                column[row_at[i] : row_at[i + 1]] = part.pop(name)
    return out


def _strings(
    frame: Frame, strings: pa.Array | pa.ChunkedArray, row_counts: NDArray[np.int64]
) -> None:
    """Each string feature as a column of every row, from the map column's flat keys and
    values: a value is a reference to one Python str per distinct category, not an object per
    event (a report reads up to max_report_events events: per-event dicts cost gigabytes)."""
    if isinstance(strings, pa.ChunkedArray):
        strings = strings.combine_chunks()
    entries, entry_counts = _children(strings)  # (name, values) of each event
    if len(entries) == 0:
        return
    values, value_counts = _children(entries.field(1))  # a value per row of its event
    value_entry = np.repeat(np.arange(len(entries)), value_counts)
    event = np.repeat(np.arange(len(strings)), entry_counts)[value_entry]
    position = _within(value_counts)  # the row of its event a value is for
    fits = position < row_counts[event]  # values past an event's rows are left out
    rows_at = frame.starts[event] + position
    names = entries.field(0).dictionary_encode()
    name_code = names.indices.to_numpy()[value_entry]
    categories = values.dictionary_encode()
    vocabulary = categories.dictionary.to_numpy(zero_copy_only=False)
    value_code = categories.indices.to_numpy()
    for code, name in enumerate(names.dictionary.to_pylist()):
        picked = fits & (name_code == code)
        column = frame.strings[name] = np.full(frame.rows, None, dtype=object)
        column[rows_at[picked]] = vocabulary[value_code[picked]]


def _children(lists: pa.Array) -> tuple[pa.Array, NDArray[np.int64]]:
    """The items of every list (or map) in order, and each one's count (0 for a null)."""
    offsets = lists.offsets.to_numpy().astype(np.int64)
    counts = np.diff(offsets)
    if lists.null_count:
        counts[lists.is_null().to_numpy(zero_copy_only=False)] = 0
    # NOTE: .values is the whole child array, whatever slice ``lists`` is of it.
    items = lists.values.slice(offsets[0], offsets[-1] - offsets[0])
    if counts.sum() < len(items):  # a null's slot held items: leave them out
        kept = np.zeros(len(items), dtype=bool)
        kept[np.repeat(offsets[:-1] - offsets[0], counts) + _within(counts)] = True
        items = items.filter(pa.array(kept))
    return items, counts


def _within(counts: NDArray[np.int64]) -> NDArray[np.int64]:
    """0, 1, ... within each of consecutive runs of these lengths."""
    return np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(
        np.cumsum(counts) - counts, counts
    )


def _scores(
    frame: Frame,
    row_counts: Sequence[int],
    starts: NDArray[np.int64],
    outputs: Sequence[bytes | None],
    output_widths: Sequence[Sequence[int] | None],
) -> None:
    """The first output's first column. Single-row events with the same output widths (the
    usual case) are decoded together: their blobs are rows of one matrix."""
    single = [
        i
        for i, rows in enumerate(row_counts)
        if rows == 1
        and output_widths[i]
        and outputs[i]
        and len(outputs[i] or b"") == 8 * sum(output_widths[i] or ())
    ]
    done = np.zeros(len(row_counts), dtype=bool)
    k = 0
    while k < len(single):
        layout = tuple(output_widths[single[k]] or ())
        m = k + 1
        while m < len(single) and tuple(output_widths[single[m]] or ()) == layout:
            m += 1
        run = single[k:m]
        matrix = np.frombuffer(b"".join(outputs[i] or b"" for i in run), _F64)
        frame.scores[starts[run]] = matrix.reshape(len(run), sum(layout))[:, 0]
        done[run] = True
        k = m
    for i, rows in enumerate(row_counts):
        widths, blob = output_widths[i], outputs[i]
        if done[i] or not widths or not blob or len(blob) < 8 * rows * widths[0]:
            continue
        first = np.frombuffer(blob, _F64, count=rows * widths[0])
        start = int(starts[i])
        frame.scores[start : start + rows] = first.reshape(rows, widths[0])[:, 0]


def _names(layout: Sequence[str] | str | None) -> tuple[str, ...]:
    """Column names from a list, or from one string joined with NAMES_SEPARATOR (one Python
    object per event instead of one per column: what a report reads for many events)."""
    if not layout:
        return ()
    if isinstance(layout, str):
        return _split(layout)
    return tuple(layout)


@functools.lru_cache(maxsize=256)
def _split(joined: str) -> tuple[str, ...]:
    return tuple(joined.split(NAMES_SEPARATOR))


def _put(
    columns: dict[str, NDArray[Any]],
    dtype: np.dtype[Any],
    rows: int,
    names: tuple[str, ...],
    blob: bytes,
    start: int,
    end: int,
) -> None:
    matrix = np.frombuffer(blob, dtype).reshape(-1, len(names))
    for c, name in enumerate(names):
        column = columns.get(name)
        if column is None:
            column = columns[name] = np.full(rows, np.nan, dtype=dtype.newbyteorder("="))
        column[start:end] = matrix[:, c]
