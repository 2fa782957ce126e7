"""The sidecar's event store: prediction events and labels in one DuckDB file.

``events`` keeps one row per event_id (the primary key): a batch resent after a reconnect or
a restart is absorbed by ``INSERT OR IGNORE``, so what is stored is exactly once. Batches go in
through Arrow, one statement per batch. All calls come from one thread (the service's).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import duckdb
import pyarrow as pa

from gateway.api.v1 import events_pb2 as ev

__all__ = ["EVENT_COLUMNS", "EventStore"]

DB_FILE = "events.duckdb"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    event_id VARCHAR PRIMARY KEY,
    request_id VARCHAR,
    event_time TIMESTAMP,
    arrival_time TIMESTAMP,
    tenant VARCHAR,
    surface VARCHAR,
    route VARCHAR,
    model VARCHAR,
    version VARCHAR,
    arm VARCHAR,
    segments MAP(VARCHAR, VARCHAR),
    contract_version VARCHAR,
    numeric_names VARCHAR[],
    numeric BLOB,  -- float64 little-endian, rows x len(numeric_names), row-major
    strings MAP(VARCHAR, VARCHAR[]),
    hashed VARCHAR[],
    output_names VARCHAR[],
    output_widths INTEGER[],
    outputs BLOB,  -- each output's rows x width float64 block, in output_names order
    rows INTEGER,
    cached_rows INTEGER,
    fallback VARCHAR,
    coverage STRUCT(
        feature VARCHAR, present BIGINT, defaulted BIGINT, out_of_range BIGINT, oov BIGINT
    )[],
    queue_ms DOUBLE,
    compute_ms DOUBLE,
    total_ms DOUBLE,
    cost DOUBLE,
    entity_key VARCHAR
);
"""

_COVERAGE = pa.struct(
    [
        ("feature", pa.string()),
        ("present", pa.int64()),
        ("defaulted", pa.int64()),
        ("out_of_range", pa.int64()),
        ("oov", pa.int64()),
    ]
)
_ARROW_SCHEMA = pa.schema(
    [
        ("event_id", pa.string()),
        ("request_id", pa.string()),
        ("event_time", pa.timestamp("us")),
        ("arrival_time", pa.timestamp("us")),
        ("tenant", pa.string()),
        ("surface", pa.string()),
        ("route", pa.string()),
        ("model", pa.string()),
        ("version", pa.string()),
        ("arm", pa.string()),
        ("segments", pa.map_(pa.string(), pa.string())),
        ("contract_version", pa.string()),
        ("numeric_names", pa.list_(pa.string())),
        ("numeric", pa.binary()),
        ("strings", pa.map_(pa.string(), pa.list_(pa.string()))),
        ("hashed", pa.list_(pa.string())),
        ("output_names", pa.list_(pa.string())),
        ("output_widths", pa.list_(pa.int32())),
        ("outputs", pa.binary()),
        ("rows", pa.int32()),
        ("cached_rows", pa.int32()),
        ("fallback", pa.string()),
        ("coverage", pa.list_(_COVERAGE)),
        ("queue_ms", pa.float64()),
        ("compute_ms", pa.float64()),
        ("total_ms", pa.float64()),
        ("cost", pa.float64()),
        ("entity_key", pa.string()),
    ]
)
EVENT_COLUMNS = tuple(_ARROW_SCHEMA.names)


class EventStore:
    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / DB_FILE
        self._db = duckdb.connect(str(self.path))
        self._db.execute(_SCHEMA)

    def ingest(self, events: Sequence[ev.PredictionEvent], arrival_us: int) -> tuple[int, int]:
        """Store a batch; returns (newly stored, already held)."""
        if not events:
            return 0, 0
        unique = list({e.event_id: e for e in events}.values())
        table = _to_arrow(unique, arrival_us)
        self._db.register("incoming", table)
        try:
            row = self._db.execute("INSERT OR IGNORE INTO events SELECT * FROM incoming").fetchone()
        finally:
            self._db.unregister("incoming")
        stored = int(row[0]) if row else 0
        return stored, len(events) - stored

    def query(self, sql: str, parameters: Sequence[object] = ()) -> list[tuple[object, ...]]:
        return self._db.execute(sql, list(parameters)).fetchall()

    def close(self) -> None:
        self._db.execute("CHECKPOINT")
        self._db.close()


def _to_arrow(events: Sequence[ev.PredictionEvent], arrival_us: int) -> pa.Table:
    """Columns for a batch. Feature and output values stay packed bytes: no per-value work."""
    columns: dict[str, list[object]] = {name: [] for name in EVENT_COLUMNS}
    for e in events:
        block = e.features
        outputs = e.outputs
        values = (
            e.event_id,
            e.request_id,
            e.event_time_us,
            arrival_us,
            e.tenant,
            e.surface,
            e.route,
            e.model,
            e.version,
            e.arm,
            list(e.segments.items()),
            e.contract_version,
            list(block.numeric_names),
            block.numbers,
            [(c.name, list(c.values)) for c in block.strings],
            [c.name for c in block.strings if c.hashed],
            [o.name for o in outputs],
            [o.width for o in outputs],
            b"".join(o.values for o in outputs),
            e.rows,
            e.cached_rows,
            e.fallback,
            [
                {
                    "feature": c.feature,
                    "present": c.present,
                    "defaulted": c.defaulted,
                    "out_of_range": c.out_of_range,
                    "oov": c.oov,
                }
                for c in e.coverage
            ],
            e.queue_ms,
            e.compute_ms,
            e.total_ms,
            e.cost,
            e.entity_key,
        )
        for name, value in zip(EVENT_COLUMNS, values, strict=True):
            columns[name].append(value)
    return pa.Table.from_pydict(columns, schema=_ARROW_SCHEMA)
