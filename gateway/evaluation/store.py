"""The sidecar's event store: prediction events and labels in one DuckDB file.

``events`` keeps one row per event_id (the primary key): a batch resent after a reconnect or
a restart is absorbed (see ``EventStore.ingest``), so what is stored is exactly once. Batches go
in through Arrow, one statement per batch. All calls come from one thread (the service's).

Columns are only ever added, at the end (a store file of an older version gets them when it
is opened): a batch goes in by position.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from itertools import chain, compress
from operator import attrgetter
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from numpy.typing import NDArray

from gateway.api.v1 import events_pb2 as ev
from gateway.evaluation.frames import build_frame

__all__ = ["EVENT_COLUMNS", "EventStore", "joined_sql", "window_filter"]

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
    entity_key VARCHAR,
    numeric_kinds VARCHAR,  -- per numeric_names: b, i, u or f, the dtype kind it was sent as
    input_columns VARCHAR[],
    model_input BLOB  -- float32 little-endian, rows x len(input_columns): the matrix served
);
-- Stores made before these columns were added: the same columns, in the same order.
ALTER TABLE events ADD COLUMN IF NOT EXISTS numeric_kinds VARCHAR;
ALTER TABLE events ADD COLUMN IF NOT EXISTS input_columns VARCHAR[];
ALTER TABLE events ADD COLUMN IF NOT EXISTS model_input BLOB;
CREATE TABLE IF NOT EXISTS labels (
    request_id VARCHAR,
    entity_key VARCHAR,
    "row" INTEGER,
    value DOUBLE,
    label_time TIMESTAMP,
    received_time TIMESTAMP,
    window_s BIGINT,
    batch BIGINT
);
"""

# Each label joined to its event: by request id, or by entity key to that entity's latest
# event at or before the label's time, within the label's window. A label sent again for the
# same prediction row (request id and row; or entity, row and time) replaces the earlier one.
# Labels whose event has not arrived yet simply do not join (yet).
_JOINED = """
WITH latest AS (
    SELECT * FROM labels {label_filter}
    QUALIFY row_number() OVER (
        PARTITION BY request_id, "row",
            CASE WHEN request_id = '' THEN entity_key END,
            CASE WHEN request_id = '' THEN label_time END
        ORDER BY received_time DESC, batch DESC
    ) = 1
),
by_id AS (
    SELECT e.event_id, l."row", l.value AS label, l.label_time
    FROM latest l JOIN events e ON e.request_id = l.request_id
    WHERE l.request_id <> '' AND l."row" < e.rows
),
by_entity AS (
    SELECT e.event_id, l."row", l.value AS label, l.label_time
    FROM (SELECT * FROM latest WHERE request_id = '' AND entity_key <> '') l
    ASOF JOIN events e ON l.entity_key = e.entity_key AND l.label_time >= e.event_time
    WHERE e.event_time >= l.label_time - to_seconds(l.window_s) AND l."row" < e.rows
)
SELECT * FROM by_id UNION ALL SELECT * FROM by_entity
"""

# Labels of one batch that join at least one event (the joins of _JOINED, counted per label,
# not per event joined).
_JOINED_LABELS = """
WITH mine AS (
    SELECT DISTINCT request_id, entity_key, "row", label_time, window_s FROM labels
    WHERE batch = $1
)
SELECT (
    SELECT count(*) FROM mine l WHERE l.request_id <> '' AND EXISTS (
        SELECT 1 FROM events e WHERE e.request_id = l.request_id AND l."row" < e.rows
    )
) + (
    SELECT count(DISTINCT (l.entity_key, l."row", l.label_time))
    FROM (SELECT * FROM mine WHERE request_id = '' AND entity_key <> '') l
    ASOF JOIN events e ON l.entity_key = e.entity_key AND l.label_time >= e.event_time
    WHERE e.event_time >= l.label_time - to_seconds(l.window_s) AND l."row" < e.rows
)
"""

_STRING = pa.string()
_TIMESTAMP = pa.timestamp("us")
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
        ("numeric_kinds", pa.string()),
        ("input_columns", pa.list_(pa.string())),
        ("model_input", pa.binary()),
    ]
)
EVENT_COLUMNS = tuple(_ARROW_SCHEMA.names)


class EventStore:
    def __init__(
        self, directory: Path, threads: int = 1, memory_limit_bytes: int | None = None
    ) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / DB_FILE
        config: dict[str, str | bool | int | float | list[str]] = {"threads": threads}
        if memory_limit_bytes is not None:
            # NOTE: DuckDB reads a bare number as megabytes (of 10^6 bytes); with a unit it is
            # exact. Past the limit it evicts blocks and spills big queries to <file>.tmp.
            config["memory_limit"] = f"{memory_limit_bytes}B"
        self._db = duckdb.connect(str(self.path), config=config)
        self._db.execute(_SCHEMA)
        self._batch = self._scalar("SELECT coalesce(max(batch), 0) FROM labels")

    def ingest(self, events: Sequence[ev.PredictionEvent], arrival_us: int) -> tuple[int, int]:
        """Store a batch; returns (newly stored, already held)."""
        if not events:
            return 0, 0
        unique = list({e.event_id: e for e in events}.values())
        table = _to_arrow(unique, arrival_us)
        # NOTE: a plain INSERT first. DuckDB runs INSERT OR IGNORE as a merge: it groups the
        # batch by event_id and hash-joins it with a scan of every stored event_id, so its cost
        # grows with the store (batches of 512: 45 us per event into an empty store, 93 at 1M
        # events, 230 at 4M); a plain INSERT checks the primary key in its index (20-25 us
        # whatever the store holds). It fails, storing nothing, only when the batch holds an
        # event already stored (a resend after a reconnect or a restart): only such a batch
        # pays for the merge.
        try:
            self._db.from_arrow(table).insert_into("events")
            stored = len(unique)
        except duckdb.ConstraintException:
            self._db.register("incoming", table)
            try:
                stored = self._scalar("INSERT OR IGNORE INTO events SELECT * FROM incoming")
            finally:
                self._db.unregister("incoming")
        return stored, len(events) - stored

    def put_labels(self, labels: Sequence[ev.Label], window_s: int, received_us: int) -> int:
        """Store labels; returns how many of them join a prediction now (the rest join when it
        arrives). A label counts once however many events it joins (a primary and its shadow
        copies share a request id)."""
        if not labels:
            return 0
        self._batch += 1
        table = pa.table(
            {
                "request_id": [label.request_id for label in labels],
                "entity_key": [label.entity_key for label in labels],
                "row": pa.array([label.row for label in labels], pa.int32()),
                "value": [label.value for label in labels],
                "label_time": pa.array(
                    [label.event_time_us or received_us for label in labels], pa.timestamp("us")
                ),
                "received_time": pa.array([received_us] * len(labels), pa.timestamp("us")),
                "window_s": pa.array([window_s] * len(labels), pa.int64()),
                "batch": pa.array([self._batch] * len(labels), pa.int64()),
            }
        )
        self._db.register("incoming_labels", table)
        try:
            self._db.execute("INSERT INTO labels SELECT * FROM incoming_labels").fetchall()
        finally:
            self._db.unregister("incoming_labels")
        return self._scalar(_JOINED_LABELS, [self._batch])

    def export(
        self,
        path: Path,
        model: str,
        version: str,
        start_us: int,
        end_us: int,
        labelled: bool,
        max_rows: int = 0,
    ) -> tuple[Path, int]:
        """Write a window's events, or its labelled prediction rows, to Parquet (with
        ``max_rows``, the newest that many, in time order all the same).

        A labelled row holds what training needs to see what serving saw: the raw features,
        numeric ones in the type they were sent as (``_raw_type``), and the model input as
        served, a float32 column ``input.<column>`` per matrix column (see ``_training_rows``).
        Returns the file's absolute path and the rows written.
        """
        where, params = window_filter(model, version, start_us, end_us, table="e")
        path = path.expanduser().resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        newest = f"LIMIT {int(max_rows)}" if max_rows > 0 else ""
        if not labelled:
            events = (
                f"SELECT * FROM (SELECT * FROM events e WHERE {where} "
                f"ORDER BY event_time DESC {newest}) ORDER BY event_time"
            )
            self._db.execute(
                f"COPY ({events}) TO '{_quoted(path)}' (FORMAT parquet)", params
            ).fetchall()
            return path, self._scalar(f"SELECT count(*) FROM ({events})", params)
        table = self.arrow(
            f"""
            SELECT * FROM (
                SELECT e.request_id, e.event_time, e.model, e.version, e.arm, e.segments,
                       e.numeric_names, e.numeric, e.numeric_kinds, e.strings, e.input_columns,
                       e.model_input, e.outputs, e.output_widths, e.rows, j."row", j.label
                FROM ({joined_sql()}) j JOIN events e USING (event_id)
                WHERE {where} ORDER BY e.event_time DESC, j."row" DESC {newest}
            ) ORDER BY event_time, "row"
            """,
            params,
        )
        pq.write_table(_training_rows(table), path)
        return path, int(table.num_rows)

    def arrow(self, sql: str, params: Sequence[object] = ()) -> pa.Table:
        return self._db.sql(sql, params=list(params)).to_arrow_table()

    def batches(
        self, sql: str, params: Sequence[object] = (), rows: int = 16_384
    ) -> Iterator[pa.RecordBatch]:
        """A query's result a batch of about ``rows`` at a time (read each before the next
        query): only the batch in hand is held, not the whole result."""
        yield from self._db.sql(sql, params=list(params)).to_arrow_reader(rows)

    def _scalar(self, sql: str, params: Sequence[object] = ()) -> int:
        rows = self._db.execute(sql, list(params)).fetchall()
        return int(rows[0][0]) if rows and rows[0][0] is not None else 0

    def query(self, sql: str, parameters: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        return self._db.execute(sql, list(parameters)).fetchall()

    def memory_bytes(self) -> int:
        """What DuckDB's buffer pool holds now (bounded by its memory_limit)."""
        return self._scalar("SELECT sum(memory_usage_bytes) FROM duckdb_memory()")

    def close(self) -> None:
        self._db.execute("CHECKPOINT").fetchall()
        self._db.close()


def window_filter(
    model: str, version: str = "", start_us: int = 0, end_us: int = 0, table: str = "events"
) -> tuple[str, list[object]]:
    """A WHERE clause (with its parameters) for one model's events in a time window."""
    clauses = [f"{table}.model = ?"]
    params: list[object] = [model]
    if version:
        clauses.append(f"{table}.version = ?")
        params.append(version)
    if start_us:
        clauses.append(f"{table}.event_time >= make_timestamp(?)")
        params.append(start_us)
    if end_us:
        clauses.append(f"{table}.event_time < make_timestamp(?)")
        params.append(end_us)
    return " AND ".join(clauses), params


def _quoted(path: Path) -> str:
    return str(path).replace("'", "''")


def _training_rows(table: pa.Table) -> pa.Table:
    """One row per labelled prediction row (``request_id`` and ``row``, what its label named):
    its version and segments, its raw features (each numeric one in the type it was sent as;
    a sensitive one hashed), the model input as served (``input.<column>``, float32; NaN for
    an event without one: it sent the model's own input, or came from an older gateway), its
    score and its label."""
    data = table.drop_columns(["strings"]).to_pydict()
    count = len(data["request_id"])
    frame = build_frame(
        row_counts=data["rows"],
        numeric_names=data["numeric_names"],
        numeric=data["numeric"],
        strings=table.column("strings"),
        outputs=data["outputs"],
        output_widths=data["output_widths"],
        input_columns=data["input_columns"],
        model_input=data["model_input"],
    )
    picks = frame.starts[:count] + np.asarray(data["row"], dtype=np.int64)
    out: dict[str, object] = {
        name: data[name] for name in ("request_id", "row", "event_time", "model", "version", "arm")
    }
    segment_keys = sorted({k for m in data["segments"] if m for k, _ in m})
    for key in segment_keys:
        out[f"segment.{key}"] = [dict(m or {}).get(key) for m in data["segments"]]
    kinds = _sent_kinds(data["numeric_names"], data["numeric_kinds"])
    for name, column in frame.numbers.items():
        out[name] = _raw_column(column[picks], kinds.get(name, set()))
    for name, column_s in frame.strings.items():
        out[name] = column_s[picks].tolist()
    for name, column_f in frame.inputs.items():
        out[f"{_INPUT_PREFIX}{name}"] = column_f[picks]
    out["score"] = frame.scores[picks]
    out["label"] = data["label"]
    return pa.table(out)


_INPUT_PREFIX = "input."  # the model input's columns, apart from raw features of the same name
# A numeric feature's dtype kind as sent -> the type it is exported as (any other: float64).
_SENT_TYPES: dict[str, tuple[type[np.generic], pa.DataType]] = {
    "b": (np.bool_, pa.bool_()),
    "i": (np.int64, pa.int64()),
    "u": (np.uint64, pa.uint64()),
}


def _sent_kinds(
    names: Sequence[Sequence[str] | None], kinds: Sequence[str | None]
) -> dict[str, set[str]]:
    """Per numeric feature, the dtype kinds its events sent it as ("f" for an event that did
    not say: stored before events carried kinds)."""
    seen: dict[str, set[str]] = {}
    for layout, sent in set(zip(map(tuple, (n or () for n in names)), kinds, strict=True)):
        if not sent or len(sent) != len(layout):
            sent = "f" * len(layout)
        for name, kind in zip(layout, sent, strict=True):
            seen.setdefault(name, set()).add(kind)
    return seen


def _raw_column(values: NDArray[np.float64], kinds: set[str]) -> pa.Array:
    """A numeric feature in the type it was sent as: bool, int64 or uint64 when every event
    sent it so (the float64 the event carries holds such a value exactly, up to 2**53), else
    float64. A row whose event lacked the feature is null in a bool or integer column."""
    sent = _SENT_TYPES.get(next(iter(kinds))) if len(kinds) == 1 else None
    if sent is None:
        return pa.array(values, pa.float64())
    numpy_type, arrow_type = sent
    missing = np.isnan(values)
    exact = np.where(missing, 0, values).astype(numpy_type)
    return pa.array(exact, arrow_type, mask=missing if missing.any() else None)


def joined_sql(label_filter: str = "") -> str:
    """SQL for (event_id, row, label, label_time) of every joined label."""
    return _JOINED.format(label_filter=label_filter)


def _to_arrow(events: Sequence[ev.PredictionEvent], arrival_us: int) -> pa.Table:
    """A batch as Arrow columns in the table's layout, each built by pyarrow from one flat list
    of values (a list column: its items, all events together, and offsets). Feature and output
    values stay packed bytes: no per-value work."""
    count = len(events)

    def scalar(name: str, type_: pa.DataType = _STRING) -> pa.Array:
        return _field(events, name, type_)

    blocks = list(map(attrgetter("features"), events))
    segments = list(map(attrgetter("segments"), events))
    segment_items = [item for m in segments for item in m.items()]
    columns = list(chain.from_iterable(map(attrgetter("strings"), blocks)))
    column_names = list(map(attrgetter("name"), columns))
    column_offsets = _offsets((len(b.strings) for b in blocks), count)
    is_hashed = np.fromiter(map(attrgetter("hashed"), columns), np.bool_, len(columns))
    hashed_before = np.zeros(len(columns) + 1, np.int32)  # hashed columns before column i
    np.cumsum(is_hashed, out=hashed_before[1:])
    outputs = list(map(attrgetter("outputs"), events))
    output_offsets = _offsets(map(len, outputs), count)
    output_columns = list(chain.from_iterable(outputs))
    arrays = [
        scalar("event_id"),
        scalar("request_id"),
        scalar("event_time_us", _TIMESTAMP),
        pa.repeat(pa.scalar(arrival_us, _TIMESTAMP), count),
        scalar("tenant"),
        scalar("surface"),
        scalar("route"),
        scalar("model"),
        scalar("version"),
        scalar("arm"),
        pa.MapArray.from_arrays(
            _offsets(map(len, segments), count),
            pa.array([key for key, _ in segment_items], _STRING),
            pa.array([value for _, value in segment_items], _STRING),
            type=_ARROW_SCHEMA.field("segments").type,
        ),
        scalar("contract_version"),
        _list_array(list(map(attrgetter("numeric_names"), blocks)), _STRING),
        _field(blocks, "numbers", pa.binary()),
        pa.MapArray.from_arrays(
            column_offsets,
            pa.array(column_names, _STRING),
            _list_array(list(map(attrgetter("values"), columns)), _STRING),
            type=_ARROW_SCHEMA.field("strings").type,
        ),
        pa.ListArray.from_arrays(
            pa.array(hashed_before[column_offsets.to_numpy()]),
            pa.array(list(compress(column_names, is_hashed)), _STRING),
        ),
        pa.ListArray.from_arrays(output_offsets, _field(output_columns, "name")),
        pa.ListArray.from_arrays(output_offsets, _field(output_columns, "width", pa.int32())),
        pa.array([b"".join(map(attrgetter("values"), o)) for o in outputs], pa.binary()),
        scalar("rows", pa.int32()),
        scalar("cached_rows", pa.int32()),
        scalar("fallback"),
        _coverage(events),
        scalar("queue_ms", pa.float64()),
        scalar("compute_ms", pa.float64()),
        scalar("total_ms", pa.float64()),
        scalar("cost", pa.float64()),
        scalar("entity_key"),
        _field(blocks, "numeric_kinds"),
        _list_array([e.model_input.columns for e in events], _STRING),
        _field(list(map(attrgetter("model_input"), events)), "values", pa.binary()),
    ]
    return pa.Table.from_arrays(arrays, schema=_ARROW_SCHEMA)


def _field(messages: Sequence[Any], name: str, type_: pa.DataType = _STRING) -> pa.Array:
    """One field of every message (a C-level pass), as an array."""
    return pa.array(list(map(attrgetter(name), messages)), type_)


def _coverage(events: Sequence[ev.PredictionEvent]) -> pa.Array:
    """The coverage column: one struct array of every event's entries, cut by offsets."""
    fields: tuple[list[Any], ...] = ([], [], [], [], [])
    feature, present, defaulted, out_of_range, oov = (f.append for f in fields)
    # NOTE: one loop reading all five fields: each entry's Python object is made once, where
    # a map(attrgetter) per field would make it five times (the objects are most of the cost).
    for event in events:
        for c in event.coverage:
            feature(c.feature)
            present(c.present)
            defaulted(c.defaulted)
            out_of_range(c.out_of_range)
            oov(c.oov)
    entries = pa.StructArray.from_arrays(
        [pa.array(values, f.type) for values, f in zip(fields, _COVERAGE, strict=True)],
        fields=list(_COVERAGE),
    )
    offsets = _offsets((len(e.coverage) for e in events), len(events))
    return pa.ListArray.from_arrays(offsets, entries, type=_ARROW_SCHEMA.field("coverage").type)


def _list_array(lists: Sequence[Sequence[Any]], type_: pa.DataType) -> pa.Array:
    """A list column: every list's items in one array, cut by offsets."""
    items = pa.array(list(chain.from_iterable(lists)), type_)
    return pa.ListArray.from_arrays(_offsets(map(len, lists), len(lists)), items)


def _offsets(lengths: Iterable[int], count: int) -> pa.Array:
    """int32 offsets of ``count`` consecutive lists of these lengths: 0, then running totals."""
    offsets = np.zeros(count + 1, np.int32)
    np.cumsum(np.fromiter(lengths, np.int32, count), out=offsets[1:])
    return pa.array(offsets)
