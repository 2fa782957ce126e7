"""Plain-text tables for the command-line clients (sidecar reports, the admin ledger)."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["format_table"]


def format_table(rows: Sequence[Sequence[object]], indent: str = "") -> list[str]:
    """One line per row, each column padded to its widest cell (the first row: the header)."""
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return [
        indent + "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in rows
    ]
