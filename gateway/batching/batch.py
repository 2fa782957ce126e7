"""Stage 5: merge requests' rows into one batch and split the outputs back (pure functions)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

from gateway.types import Feeds

__all__ = ["chunk", "join", "merge", "split"]


def chunk(
    feeds: Feeds, rows: int, max_rows: int
) -> list[tuple[dict[str, NDArray[np.generic]], int]]:
    """Cut a request into pieces of at most ``max_rows`` rows (views, no copies)."""
    if rows <= max_rows:
        return [(dict(feeds), rows)]
    return [
        (
            {name: array[start : start + max_rows] for name, array in feeds.items()},
            min(max_rows, rows - start),
        )
        for start in range(0, rows, max_rows)
    ]


def merge(parts: Sequence[Feeds], rows: int) -> dict[str, NDArray[np.generic]]:
    """Concatenate parts along dim 0 into preallocated buffers; one part passes through."""
    if len(parts) == 1:
        return dict(parts[0])
    merged: dict[str, NDArray[np.generic]] = {}
    for name, first in parts[0].items():
        buffer = np.empty((rows, *first.shape[1:]), dtype=first.dtype)
        offset = 0
        for part in parts:
            array = part[name]
            buffer[offset : offset + len(array)] = array
            offset += len(array)
        merged[name] = buffer
    return merged


def split(
    outputs: Sequence[NDArray[np.generic]], sizes: Sequence[int]
) -> list[list[NDArray[np.generic]]]:
    """Slice each output by row counts: part i gets rows [sum(sizes[:i]), +sizes[i]) (views)."""
    if len(sizes) == 1:
        return [list(outputs)]
    pieces: list[list[NDArray[np.generic]]] = []
    offset = 0
    for size in sizes:
        pieces.append([output[offset : offset + size] for output in outputs])
        offset += size
    return pieces


def join(pieces: Sequence[Sequence[NDArray[np.generic]]]) -> list[NDArray[np.generic]]:
    """Reassemble a request that was cut into chunks: concatenate each output in order."""
    if len(pieces) == 1:
        return list(pieces[0])
    return [np.concatenate([piece[i] for piece in pieces]) for i in range(len(pieces[0]))]
