"""The adaptation journal, in the sidecar's DuckDB file beside the events: every trigger run and
playbook action (``actions``), and the human review queue (``reviews``).

Like the rest of the store, it is called from the store's one thread only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Final, Literal

import pyarrow.parquet as pq

from gateway.evaluation.store import EventStore, joined_sql, window_filter

__all__ = ["ACTION_FIELDS", "REVIEW_FIELDS", "Journal"]

_SCHEMA: Final = """
CREATE SEQUENCE IF NOT EXISTS action_ids;
CREATE TABLE IF NOT EXISTS actions (
    id BIGINT PRIMARY KEY DEFAULT nextval('action_ids'),
    time TIMESTAMP,
    model VARCHAR,
    kind VARCHAR,      -- time, data, drift, performance (trigger runs); human_review, ...
    name VARCHAR,      -- the trigger's name; the action's for playbooks
    incident VARCHAR,  -- the alert it answers ("" for time and data)
    reason VARCHAR,
    ran VARCHAR,       -- the command, the webhook, the route rolled back, the review
    outcome VARCHAR,   -- ok, failed, timeout, error, skipped, queued, recorded
    exit_code INTEGER,
    duration_s DOUBLE,
    output VARCHAR,    -- the output's tail (bounded by the trigger's output_bytes)
    detail VARCHAR     -- JSON
);
CREATE SEQUENCE IF NOT EXISTS review_ids;
CREATE TABLE IF NOT EXISTS reviews (
    id BIGINT PRIMARY KEY DEFAULT nextval('review_ids'),
    time TIMESTAMP,
    alert VARCHAR,     -- the rule
    incident VARCHAR,
    model VARCHAR,
    version VARCHAR,
    segment VARCHAR,
    feature VARCHAR,
    value DOUBLE,
    export VARCHAR,    -- the Parquet file of the rows to review
    rows BIGINT,
    status VARCHAR,    -- open, resolved
    resolved_time TIMESTAMP,
    note VARCHAR
);
"""

ACTION_FIELDS: Final = (
    "id",
    "time",
    "model",
    "kind",
    "name",
    "incident",
    "reason",
    "ran",
    "outcome",
    "exit_code",
    "duration_s",
    "output",
    "detail",
)
REVIEW_FIELDS: Final = (
    "id",
    "time",
    "alert",
    "incident",
    "model",
    "version",
    "segment",
    "feature",
    "value",
    "export",
    "rows",
    "status",
    "resolved_time",
    "note",
)
# The kinds of a trigger run; every other kind is a playbook action.
_TRIGGER_KINDS: Final = ("time", "data", "drift", "performance", "manual")
_EPOCH_S: Final = "epoch(time)"
_IS_RUN: Final = f"kind IN ({', '.join(repr(k) for k in _TRIGGER_KINDS)})"


class Journal:
    """Records and reads the adaptation loop's actions and review queue in ``store``."""

    def __init__(self, store: EventStore) -> None:
        self.store = store
        self.directory = store.path.parent
        store.query(_SCHEMA)

    def record(self, entry: dict[str, Any]) -> int:
        """Append one action (``entry`` keyed by ACTION_FIELDS, ``time`` in Unix seconds,
        ``detail`` any JSON); returns its id."""
        values = [entry.get(k) for k in ACTION_FIELDS[2:]]
        values[-1] = json.dumps(entry.get("detail") or {}, default=str)
        placeholders = ", ".join("?" for _ in values)
        rows = self.store.query(
            f"INSERT INTO actions ({', '.join(ACTION_FIELDS[1:])}) "
            f"VALUES (make_timestamp(?), {placeholders}) RETURNING id",
            [int(entry["time"] * 1_000_000), *values],
        )
        return int(rows[0][0])

    def last_run_s(self, model: str, name: str) -> float | None:
        """When the trigger ``name`` of ``model`` last ran (started), whatever its outcome."""
        rows = self.store.query(
            f"SELECT max({_EPOCH_S}) FROM actions WHERE model = ? AND name = ? AND {_IS_RUN} "
            "AND outcome <> 'skipped'",
            [model, name],
        )
        return float(rows[0][0]) if rows and rows[0][0] is not None else None

    def last_action_s(self, kind: str, incident: str) -> float | None:
        """When action ``kind`` last acted on ``incident`` (an alert's key)."""
        rows = self.store.query(
            f"SELECT max({_EPOCH_S}) FROM actions WHERE kind = ? AND incident = ? "
            "AND outcome <> 'skipped'",
            [kind, incident],
        )
        return float(rows[0][0]) if rows and rows[0][0] is not None else None

    def actions(
        self,
        model: str = "",
        limit: int = 100,
        of: Literal["all", "triggers", "playbooks"] = "all",
    ) -> list[dict[str, Any]]:
        """The latest actions, newest first (of ``model``, or every model): all of them, the
        trigger runs only, or the playbook actions only."""
        clauses, params = (["model = ?"], [model]) if model else ([], [])
        if of != "all":
            clauses.append(_IS_RUN if of == "triggers" else f"NOT {_IS_RUN}")
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = self.store.query(
            f"SELECT id, {_EPOCH_S}, {', '.join(ACTION_FIELDS[2:])} FROM actions {where} "
            "ORDER BY id DESC LIMIT ?",
            [*params, limit],
        )
        out = [dict(zip(ACTION_FIELDS, row, strict=True)) for row in rows]
        for entry in out:
            entry["detail"] = json.loads(entry["detail"] or "{}")
        return out

    def totals(self, model: str) -> dict[str, int]:
        """How much ``model`` has recorded: its ``triggers`` runs, its ``playbook_actions`` and
        its ``open_reviews`` (what a bounded list of each leaves out)."""
        runs, others = self.store.query(
            f"SELECT count(*) FILTER (WHERE {_IS_RUN}), count(*) FILTER (WHERE NOT {_IS_RUN}) "
            "FROM actions WHERE model = ?",
            [model],
        )[0]
        ((reviews,),) = self.store.query(
            "SELECT count(*) FROM reviews WHERE model = ? AND status = 'open'", [model]
        )
        return {
            "triggers": int(runs),
            "playbook_actions": int(others),
            "open_reviews": int(reviews),
        }

    def labelled_since(self, model: str, since_s: float) -> int:
        """Labelled prediction rows of ``model`` (its shadows' copies aside) whose label was
        received after ``since_s``."""
        rows = self.store.query(
            f"SELECT count(*) FROM ({joined_sql('WHERE received_time > make_timestamp(?)')}) j "
            "JOIN events e USING (event_id) WHERE e.model = ? AND e.arm <> 'shadow'",
            [int(since_s * 1_000_000), model],
        )
        return int(rows[0][0])

    def open_review(self, alert: dict[str, Any], incident: str, now_s: float, limit: int) -> int:
        """Queue ``alert`` for review (once while one for the same incident is open), with
        the latest ``limit`` events of its version and segment in its window exported to
        ``reviews/<id>.parquet``; returns the review's id."""
        held = self.store.query(
            "SELECT id FROM reviews WHERE incident = ? AND status = 'open'", [incident]
        )
        if held:
            return int(held[0][0])
        start_us = int((now_s - float(alert.get("window_s") or 3600)) * 1_000_000)
        where, params = window_filter(alert["model"], alert["version"], start_us, 0, "e")
        segment = str(alert.get("segment") or "all")
        if segment != "all" and "=" in segment:
            key, value = segment.split("=", 1)
            where += " AND e.segments[?] = ?"
            params += [key, value]
        table = self.store.arrow(
            f"SELECT * FROM events e WHERE {where} ORDER BY event_time DESC LIMIT ?",
            [*params, limit],
        )
        (review_id,) = self.store.query("SELECT nextval('review_ids')")[0]
        path = self.directory / "reviews" / f"{review_id}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path)
        self.store.query(
            "INSERT INTO reviews VALUES (?, make_timestamp(?), ?, ?, ?, ?, ?, ?, ?, ?, ?, "
            "'open', NULL, '')",
            [
                review_id,
                int(now_s * 1_000_000),
                alert["rule"],
                incident,
                alert["model"],
                alert["version"],
                segment,
                alert.get("feature") or "",
                _number(alert.get("value")),
                str(path),
                table.num_rows,
            ],
        )
        return int(review_id)

    def reviews(
        self, status: str = "open", model: str = "", limit: int | None = None
    ) -> list[dict[str, Any]]:
        """The review queue, oldest first: ``status`` open, resolved or "" (all); with
        ``limit``, only its latest ``limit`` entries."""
        clauses, params = [], []
        if status:
            clauses.append("status = ?")
            params.append(status)
        if model:
            clauses.append("model = ?")
            params.append(model)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        columns = ", ".join(
            f"epoch({c})" if c in ("time", "resolved_time") else c for c in REVIEW_FIELDS
        )
        latest = "" if limit is None else f"ORDER BY id DESC LIMIT {int(limit)}"
        rows = self.store.query(
            f"SELECT * FROM (SELECT {columns} FROM reviews {where} {latest}) ORDER BY id", params
        )
        return [dict(zip(REVIEW_FIELDS, row, strict=True)) for row in rows]

    def resolve(self, review_id: int, note: str, now_s: float) -> bool:
        """Mark a review resolved; False when no open review has that id."""
        rows = self.store.query(
            "UPDATE reviews SET status = 'resolved', resolved_time = make_timestamp(?), note = ? "
            "WHERE id = ? AND status = 'open' RETURNING id",
            [int(now_s * 1_000_000), note, review_id],
        )
        return bool(rows)

    def finish(self, entry: dict[str, Any]) -> None:
        """Complete the action recorded as ``entry["id"]``: its outcome, exit status,
        duration, output and detail."""
        self.store.query(
            "UPDATE actions SET outcome = ?, exit_code = ?, duration_s = ?, output = ?, "
            "detail = ?, ran = ? WHERE id = ?",
            [
                entry["outcome"],
                entry.get("exit_code"),
                entry.get("duration_s"),
                entry.get("output"),
                json.dumps(entry.get("detail") or {}, default=str),
                entry.get("ran", ""),
                entry["id"],
            ],
        )

    def export_path(self, name: str, stamp_s: float) -> Path:
        """A fresh path for a training export of trigger ``name``."""
        directory = self.directory / "training"
        directory.mkdir(parents=True, exist_ok=True)
        return directory / f"{_safe(name)}-{int(stamp_s * 1000):015d}.parquet"

    def prune_exports(self, name: str, keep: int) -> None:
        """Delete trigger ``name``'s training exports but the latest ``keep`` (a bound on the
        store's directory)."""
        older = sorted((self.directory / "training").glob(f"{_safe(name)}-*.parquet"))
        for stale in older[: max(0, len(older) - keep)]:
            stale.unlink(missing_ok=True)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _number(value: object) -> float | None:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
