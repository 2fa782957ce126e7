"""Events as columns: the packed feature and output blocks of many events -> one numpy array
per feature (every row of every event), for metrics and for the training-set export."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

__all__ = ["Frame", "build_frame"]

_F64 = np.dtype("<f8")


@dataclass
class Frame:
    """Rows of many events. ``event_index[i]`` is the event row ``i`` came from."""

    rows: int = 0
    numbers: dict[str, NDArray[np.float64]] = field(default_factory=dict)
    strings: dict[str, NDArray[np.object_]] = field(default_factory=dict)
    scores: NDArray[np.float64] = field(default_factory=lambda: np.empty(0))
    event_index: NDArray[np.int64] = field(default_factory=lambda: np.empty(0, np.int64))


def build_frame(
    row_counts: Sequence[int],
    numeric_names: Sequence[Sequence[str]],
    numeric: Sequence[bytes | None],
    strings: Sequence[Sequence[tuple[str, Sequence[str]]] | dict[str, Sequence[str]] | None],
    outputs: Sequence[bytes | None],
    output_widths: Sequence[Sequence[int] | None],
) -> Frame:
    """Concatenate events' rows. A feature an event lacks is NaN (numbers) or None (strings)
    for its rows; ``scores`` is the first output's first column (NaN where absent)."""
    total = int(sum(row_counts))
    frame = Frame(rows=total)
    frame.event_index = np.repeat(np.arange(len(row_counts)), row_counts)
    frame.scores = np.full(total, np.nan)
    starts = np.concatenate([[0], np.cumsum(row_counts)]).astype(np.int64)
    # Runs of events with the same numeric columns (the usual case: one contract or one input
    # shape per version) are decoded at once: one join, one frombuffer, one copy per column.
    i = 0
    while i < len(row_counts):
        names = tuple(numeric_names[i] or ())
        j = i + 1
        while j < len(row_counts) and tuple(numeric_names[j] or ()) == names:
            j += 1
        blobs = [numeric[k] or b"" for k in range(i, j)]
        whole = [
            len(b) == 8 * len(names) * row_counts[k]
            for k, b in zip(range(i, j), blobs, strict=True)
        ]
        if names and all(whole):
            _put(frame, names, b"".join(blobs), int(starts[i]), int(starts[j]))
        elif names:  # a malformed event is left out, not its neighbours
            for k, ok in zip(range(i, j), whole, strict=True):
                if ok:
                    _put(frame, names, blobs[k - i], int(starts[k]), int(starts[k + 1]))
        i = j
    for i, rows in enumerate(row_counts):
        start = int(starts[i])
        entries = strings[i] or ()
        items = entries.items() if isinstance(entries, dict) else entries
        for name, values in items:
            column_s = frame.strings.get(name)
            if column_s is None:
                column_s = frame.strings[name] = np.full(total, None, dtype=object)
            column_s[start : start + rows] = list(values)[:rows]
        widths = output_widths[i] or ()
        blob_out = outputs[i]
        if widths and blob_out:
            first = np.frombuffer(blob_out, _F64, count=rows * widths[0])
            frame.scores[start : start + rows] = first.reshape(rows, widths[0])[:, 0]
    return frame


def _put(frame: Frame, names: tuple[str, ...], blob: bytes, start: int, end: int) -> None:
    matrix = np.frombuffer(blob, _F64).reshape(-1, len(names))
    for c, name in enumerate(names):
        column = frame.numbers.get(name)
        if column is None:
            column = frame.numbers[name] = np.full(frame.rows, np.nan)
        column[start:end] = matrix[:, c]
