"""Label quality for reports: how much of a window is labelled, how late its labels came, how
often a row's label was replaced or contradicted, and whether the labels' base rate moved while
the scores did not (label noise or a changed label definition look like that, a regression of
the model does not)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
from numpy.typing import NDArray

from gateway.evaluation.store import EventStore, joined_sql

__all__ = ["RowLabels", "label_notes", "label_quality", "read_labels"]

# A base rate this many standard errors from what the scores expect is called a shift.
BASE_RATE_Z: float = 3.0
# Below this output PSI the scores count as unchanged (the usual "no significant shift").
SCORES_HELD_PSI: float = 0.1
# The normal approximation behind the z-score wants this many expected positives and negatives.
_MIN_EXPECTED = 5.0

# Every label sent for a prediction row, grouped the way the store's join keeps the latest
# (request id and row; or entity, row and label time): how many copies, which value the join
# kept, how many copies said something else, and when the first arrived.
_COPIES = """
WITH ranked AS (
    SELECT request_id,
           CASE WHEN request_id = '' THEN entity_key END AS entity,
           CASE WHEN request_id = '' THEN label_time END AS label_at,
           "row", value, received_time,
           first_value(value) OVER copies AS kept,
           first_value(label_time) OVER copies AS kept_time
    FROM labels
    WINDOW copies AS (
        PARTITION BY request_id, "row",
            CASE WHEN request_id = '' THEN entity_key END,
            CASE WHEN request_id = '' THEN label_time END
        ORDER BY received_time DESC, batch DESC
    )
)
SELECT request_id, entity, label_at, "row", any_value(kept_time) AS kept_time,
       count(*) - 1 AS replaced,
       count(*) FILTER (WHERE value IS DISTINCT FROM kept) AS disagreeing,
       min(received_time) AS first_received
FROM ranked GROUP BY ALL
"""


def read_labels(store: EventStore, recent: str, params: Sequence[object]) -> pa.Table:
    """The joined label of every labelled row of the events ``recent`` picks (alias ``e``):
    event (rowid), row, label, delay_us (first label's arrival after the prediction),
    replaced (labels superseded) and disagreeing (of those, how many had another value)."""
    # NOTE: a label joined by request id matches its copies by request id (and the time of
    # the copy the join kept); one joined by entity by entity, label time and row, as the
    # store's join groups them.
    return store.arrow(
        f"""
        WITH copies AS ({_COPIES})
        SELECT e.rowid AS event, j."row", j.label,
               epoch_us(coalesce(by_id.first_received, by_entity.first_received))
                   - epoch_us(e.event_time) AS delay_us,
               coalesce(by_id.replaced, by_entity.replaced, 0) AS replaced,
               coalesce(by_id.disagreeing, by_entity.disagreeing, 0) AS disagreeing
        FROM ({joined_sql()}) j JOIN events e USING (event_id)
        LEFT JOIN copies by_id
            ON by_id.request_id <> '' AND by_id.request_id = e.request_id
            AND by_id."row" = j."row" AND by_id.kept_time = j.label_time
        LEFT JOIN copies by_entity
            ON by_entity.request_id = '' AND by_entity.entity = e.entity_key
            AND by_entity.label_at = j.label_time AND by_entity."row" = j."row"
        WHERE {recent}
        """,
        params,
    )


@dataclass
class RowLabels:
    """Per row of a frame: its label (NaN where none joined), how long after the prediction
    its first label arrived (s), labels replaced, and replaced labels of another value."""

    value: NDArray[np.float64]
    delay_s: NDArray[np.float64]
    replaced: NDArray[np.int64]
    disagreeing: NDArray[np.int64]

    @classmethod
    def unlabelled(cls, rows: int) -> RowLabels:
        return cls(
            value=np.full(rows, np.nan),
            delay_s=np.full(rows, np.nan),
            replaced=np.zeros(rows, np.int64),
            disagreeing=np.zeros(rows, np.int64),
        )


def label_quality(
    labels: RowLabels, rows: NDArray[np.bool_], scores: NDArray[np.float64]
) -> dict[str, Any]:
    """How the ``rows`` are labelled: the share labelled, the label delay (p50, p90, max),
    labels replaced and contradicted, and the labels' positive rate beside the rate the scores
    expect, as a z-score (positives minus the sum of scores, over the binomial standard error;
    about standard normal for a calibrated model and clean labels)."""
    total = int(rows.sum())
    picked = rows & ~np.isnan(labels.value)
    n = int(picked.sum())
    replaced, disagreeing = labels.replaced[picked], labels.disagreeing[picked]
    out: dict[str, Any] = {
        "rows": total,
        "labelled": n,
        "share": n / total if total else 0.0,
        "replaced": int(replaced.sum()),
        "relabelled_rows": int((replaced > 0).sum()),
        "disagreeing": int(disagreeing.sum()),
        "disagreeing_rows": int((disagreeing > 0).sum()),
    }
    if out["relabelled_rows"]:
        out["disagreement"] = out["disagreeing_rows"] / out["relabelled_rows"]
    delay = labels.delay_s[picked]
    delay = delay[np.isfinite(delay)]
    if delay.size:
        p50, p90 = np.quantile(delay, [0.5, 0.9])
        out["delay_s"] = {"p50": float(p50), "p90": float(p90), "max": float(delay.max())}
    p = scores[picked]
    scored = np.isfinite(p)
    if not scored.any():
        return out
    y = labels.value[picked][scored] > 0.5
    p = np.clip(p[scored], 0.0, 1.0)
    expected = float(p.sum())
    out["positive_rate"] = float(y.mean())
    out["expected_positive_rate"] = expected / p.size
    variance = float(np.sum(p * (1 - p)))
    if min(expected, p.size - expected) >= _MIN_EXPECTED and variance > 0:
        out["base_rate_z"] = (float(y.sum()) - expected) / math.sqrt(variance)
    return out


def label_notes(labels: dict[str, Any], output: dict[str, Any] | None = None) -> list[str]:
    """What a person should know about a segment's labels before trusting its quality
    metrics; ``output`` is the segment's score drift (its ``psi``), when there is a reference."""
    notes = []
    if labels.get("disagreeing_rows"):
        notes.append(
            f"{labels['disagreeing_rows']} of {labels['relabelled_rows']} relabelled rows "
            f"were given a different label ({labels['disagreement']:.0%}): the labels are noisy"
        )
    z = labels.get("base_rate_z")
    if z is not None and abs(z) >= BASE_RATE_Z:
        line = (
            f"labels are {labels['positive_rate']:.1%} positive where the scores expect "
            f"{labels['expected_positive_rate']:.1%} (z = {z:+.1f})"
        )
        psi = (output or {}).get("psi")
        if psi is None:
            line += "; no score reference to tell whether the scores moved"
        elif psi < SCORES_HELD_PSI:
            line += (
                f" while the scores held (output PSI {psi:.3f}): label noise or a changed "
                "label definition, not a model regression"
            )
        else:
            line += f" and the scores moved too (output PSI {psi:.3f})"
        notes.append(line)
    return notes
