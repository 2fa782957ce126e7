"""The sidecar's store on a real DuckDB file: exactly-once ingestion and label joins."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from gateway.api.v1 import events_pb2 as ev
from gateway.evaluation import frames
from gateway.evaluation.report import quality
from gateway.evaluation.store import EventStore, joined_sql

SECOND = 1_000_000


def event(i: int, entity: str = "", rows: int = 1) -> ev.PredictionEvent:
    return ev.PredictionEvent(
        event_id=f"e{i}",
        request_id=f"r{i}",
        entity_key=entity,
        model="m",
        version="1",
        event_time_us=1_000 * SECOND + i * SECOND,
        rows=rows,
    )


@pytest.fixture
def store(tmp_path: Path):
    s = EventStore(tmp_path)
    yield s
    s.close()


def joined(store: EventStore) -> list[tuple[str, int, float]]:
    return sorted((e, r, v) for e, r, v, _ in store.query(joined_sql()))


def test_a_resent_event_is_stored_once(store: EventStore):
    assert store.ingest([event(1), event(2), event(2)], 0) == (2, 1)
    assert store.ingest([event(1), event(3)], 0) == (1, 1)
    assert store.query("SELECT count(*) FROM events") == [(3,)]


def test_every_field_of_an_event_is_stored_as_sent(store: EventStore):
    full = event(1, entity="card", rows=2)
    full.segments["geo"] = "BR"
    full.features.numeric_names.extend(["a", "b"])
    full.features.numbers = np.arange(4, dtype="<f8").tobytes()
    full.features.strings.add(name="channel", values=["web", "app"])
    full.features.strings.add(name="card", values=["h1", "h2"], hashed=True)
    full.outputs.add(name="p", values=np.array([0.1, 0.2], "<f8").tobytes(), width=1)
    full.outputs.add(name="q", values=np.array([1, 2, 3, 4], "<f8").tobytes(), width=2)
    full.coverage.add(feature="a", present=2)
    full.coverage.add(feature="channel", present=1, defaulted=1, out_of_range=0, oov=1)
    store.ingest([full, event(2)], arrival_us=5 * SECOND)
    columns = (
        "segments, numeric_names, numeric, strings, hashed, output_names, output_widths, "
        "outputs, coverage, epoch_us(arrival_time)"
    )
    assert store.query(f"SELECT {columns} FROM events ORDER BY event_id") == [
        (
            {"geo": "BR"},
            ["a", "b"],
            full.features.numbers,
            {"channel": ["web", "app"], "card": ["h1", "h2"]},
            ["card"],
            ["p", "q"],
            [1, 2],
            full.outputs[0].values + full.outputs[1].values,
            [
                {"feature": "a", "present": 2, "defaulted": 0, "out_of_range": 0, "oov": 0},
                {"feature": "channel", "present": 1, "defaulted": 1, "out_of_range": 0, "oov": 1},
            ],
            5 * SECOND,
        ),
        ({}, [], b"", {}, [], [], [], b"", [], 5 * SECOND),
    ]


def test_an_entity_label_joins_the_latest_event_before_it_within_the_window(store: EventStore):
    store.ingest([event(1, "card"), event(5, "card"), event(9, "card"), event(6, "other")], 0)
    label = ev.Label(entity_key="card", value=1, event_time_us=1_000 * SECOND + 7 * SECOND)
    assert store.put_labels([label], window_s=10, received_us=0) == 1
    assert joined(store) == [("e5", 0, 1.0)]  # not e9 (after the label), not e1 (older)
    late = ev.Label(entity_key="card", value=0, event_time_us=1_000 * SECOND + 100 * SECOND)
    assert store.put_labels([late], window_s=10, received_us=0) == 0  # e9 is 91 s before it


def test_a_label_waits_for_its_event_and_a_resent_label_replaces_the_first(store: EventStore):
    assert store.put_labels([ev.Label(request_id="r4", value=0, row=1)], 3600, 10) == 0
    store.ingest([event(4, rows=2)], 0)
    assert joined(store) == [("e4", 1, 0.0)]
    store.put_labels([ev.Label(request_id="r4", value=1, row=1)], 3600, 20)
    assert joined(store) == [("e4", 1, 1.0)]
    assert store.put_labels([ev.Label(request_id="r4", value=1, row=2)], 3600, 30) == 0  # no row 2


def test_quality_metrics_match_their_definitions():
    labels = np.array([1, 0, 1, 0, 1, 0], dtype=float)
    scores = np.array([0.9, 0.9, 0.6, 0.2, 0.4, 0.1])
    q = quality(labels, scores)
    # positives 0.9, 0.6, 0.4 against negatives 0.9, 0.2, 0.1: 6 wins and one tie of 9 pairs
    assert q["auc"] == pytest.approx(6.5 / 9)
    assert q["accuracy"] == pytest.approx(4 / 6)
    assert q["labelled"] == 6 and q["positive_rate"] == 0.5


def test_the_drift_timeline_puts_each_event_in_its_own_slice_of_the_window(store, tmp_path):
    from gateway.evaluation.profile import numeric_profile, write_reference
    from gateway.evaluation.report import drift_timeline

    rng = np.random.default_rng(0)
    (tmp_path / "m").mkdir()
    write_reference(
        tmp_path / "m" / "reference.json",
        {"features": {"x": numeric_profile(rng.normal(size=5000))}, "versions": {}},
    )
    now = 10_000 * SECOND
    events = []
    for i in range(12):  # one event of 300 rows per 100 s slice; the last 4 slices shifted
        e = event(i, rows=300)
        e.event_time_us = now - (1100 - 100 * i) * SECOND - SECOND // 2
        shift = 3.0 if i >= 8 else 0.0
        e.features.numeric_names.append("x")
        e.features.numbers = (rng.normal(size=300) + shift).astype("<f8").tobytes()
        events.append(e)
    store.ingest(events, 0)
    timeline = drift_timeline(store, "m", 1200, tmp_path, 10_000, buckets=12, now_us=now)
    psi = timeline["1"]["features"]["x"]
    assert len(psi) == 12 and all(p is not None for p in psi)
    assert max(psi[:8]) < 0.2 < min(psi[8:])


def test_frames_decode_mixed_layouts_row_by_row():
    from gateway.evaluation.frames import NAMES_SEPARATOR, build_frame

    def f64(*values: float) -> bytes:
        return np.array(values, "<f8").tobytes()

    frame = build_frame(
        row_counts=[1, 1, 2, 1, 1],
        numeric_names=[["a", "b"], "a\x1fb", ["a", "b"], ["b"], None],
        numeric=[f64(1, 2), f64(3, 4), f64(5, 6, 7, 8), f64(9), None],
        strings=pa.array(
            [None, [("c", ["x"])], [("c", ["y", "z", "past the rows"])], [], None],
            pa.map_(pa.string(), pa.list_(pa.string())),
        ),
        outputs=[f64(0.1, 9), f64(0.2, 9), f64(0.3, 0.4, 9, 9), f64(0.5), b"\x00"],
        output_widths=[[1, 1], [1, 1], [1, 1], [1], [1]],
    )
    assert NAMES_SEPARATOR == "\x1f"
    assert frame.numbers["a"][:5].tolist()[:4] == [1, 3, 5, 7] and np.isnan(frame.numbers["a"][4])
    assert frame.numbers["b"].tolist()[:5] == [2, 4, 6, 8, 9]
    assert frame.strings["c"].tolist() == [None, "x", "y", "z", None, None]
    assert frame.scores[:5].tolist() == [0.1, 0.2, 0.3, 0.4, 0.5] and np.isnan(frame.scores[5])
    assert frame.event_index.tolist() == [0, 1, 2, 2, 3, 4]


def test_a_report_read_in_chunks_is_the_report_read_whole(store, tmp_path, monkeypatch):
    from gateway.evaluation import report as report_module
    from gateway.evaluation.profile import categorical_profile, numeric_profile, write_reference

    rng = np.random.default_rng(1)
    (tmp_path / "m").mkdir()
    write_reference(
        tmp_path / "m" / "reference.json",
        {
            "features": {
                "x": numeric_profile(rng.normal(size=2000)),
                "channel": categorical_profile(rng.choice(["web", "app"], size=2000)),
            },
            "versions": {},
        },
    )
    events = []
    for i in range(40):  # versions, segments, rows and layouts vary from event to event
        rows = 1 + i % 3
        e = event(i, rows=rows)
        e.version = str(1 + i % 2)
        if i % 4:
            e.segments["geo"] = "BR" if i % 4 == 1 else "US"
        if i % 5:
            e.features.numeric_names.append("x")
            e.features.numbers = rng.normal(size=rows).astype("<f8").tobytes()
        if i % 3:
            channel = rng.choice(["web", "app", "crypto"], size=rows).tolist()
            e.features.strings.add(name="channel", values=channel)
        e.outputs.add(name="p", values=rng.random(rows).astype("<f8").tobytes(), width=1)
        e.coverage.add(feature="x", present=rows - i % 2, defaulted=i % 2, oov=0)
        events.append(e)
    store.ingest(events, 0)
    labels = [ev.Label(request_id=f"r{i}", value=float(i % 2), row=0) for i in range(0, 40, 3)]
    store.put_labels(labels, 3600, 0)
    now = 2_000 * SECOND

    def report() -> dict:
        return report_module.build_report(store, "m", 3600, tmp_path, 30, now_us=now)

    whole = report()
    monkeypatch.setattr(report_module, "_CHUNK_EVENTS", 4)
    built: list[int] = []
    real_build_frame = frames.build_frame

    def counted_build_frame(**columns):
        built.append(len(columns["row_counts"]))
        return real_build_frame(**columns)

    monkeypatch.setattr(frames, "build_frame", counted_build_frame)  # batch_frame calls it
    chunked = report()
    assert len(built) > 1 and max(built) <= 4  # read in chunks, not whole
    assert chunked == whole
    assert whole["events"] == 30  # the latest 30: the bound
    assert set(whole["versions"]["2"]) == {"all", "geo=BR", "geo=US"}
    assert whole["versions"]["2"]["all"]["features"]["channel"]["oov"] > 0
    assert whole["versions"]["1"]["all"]["quality"]["labelled"] > 0


def test_a_store_made_before_the_model_input_opens_and_takes_new_events(tmp_path: Path):
    import duckdb

    from gateway.evaluation import store as store_module

    # The events table as it was: every column up to entity_key.
    before = store_module._SCHEMA.split("    numeric_kinds VARCHAR,")[0].rstrip(",\n") + "\n);"
    with duckdb.connect(str(tmp_path / store_module.DB_FILE)) as db:
        db.execute(before)
        db.execute("INSERT INTO events (event_id, model, rows) VALUES ('old', 'm', 1)")
    s = EventStore(tmp_path)
    try:
        new = event(1)
        new.features.numeric_names.append("n")
        new.features.numbers = np.array([3.0], "<f8").tobytes()
        new.features.numeric_kinds = "i"
        new.model_input.columns.extend(["a", "b=x"])
        new.model_input.values = np.array([0.5, 1.0], "<f4").tobytes()
        assert s.ingest([new], 0) == (1, 0)
        assert s.query(
            "SELECT event_id, numeric_kinds, input_columns, model_input FROM events "
            "ORDER BY event_id"
        ) == [("e1", "i", ["a", "b=x"], new.model_input.values), ("old", None, None, None)]
    finally:
        s.close()


def test_the_labelled_export_gives_features_back_as_sent_and_the_model_input_as_served(
    store: EventStore, tmp_path: Path
):
    import pyarrow.parquet as pq

    def served(i: int, kinds: str, with_input: bool = True) -> ev.PredictionEvent:
        e = event(i, rows=2)
        e.features.numeric_names.extend(["amount", "hour", "flag"])
        e.features.numbers = np.array([1.5, 3, 1, 2.25, 23, 0], "<f8").tobytes()
        e.features.numeric_kinds = kinds
        e.features.strings.add(name="country", values=["h1", "h2"], hashed=True)
        if with_input:
            e.model_input.columns.extend(["amount", "hour", "country=<oov>"])
            matrix = np.array([[0.1, 1 / 3, 0], [np.float32(2) / 3, -0.0, 1]], "<f4")
            e.model_input.values = matrix.tobytes()
        e.outputs.add(name="probability", values=np.array([0.25, 0.75], "<f8").tobytes(), width=1)
        return e

    store.ingest([served(1, "fib"), served(2, "fib"), served(3, "fib", with_input=False)], 0)
    labels = [ev.Label(request_id=f"r{i}", value=1.0, row=1) for i in (1, 2, 3)]
    store.put_labels(labels, 3600, 0)
    path, rows = store.export(tmp_path / "train.parquet", "m", "", 0, 0, labelled=True)
    assert rows == 3
    table = pq.read_table(path)
    types = {f.name: str(f.type) for f in table.schema}
    assert (types["amount"], types["hour"], types["flag"]) == ("double", "int64", "bool")
    assert table.column("hour").to_pylist() == [23, 23, 23]
    assert table.column("flag").to_pylist() == [False, False, False]
    assert table.column("country").to_pylist() == ["h2", "h2", "h2"]  # hashed stays hashed
    for column in ("input.amount", "input.hour", "input.country=<oov>"):
        assert types[column] == "float"
    served_row = np.array([np.float32(2) / 3, -0.0, 1], "<f4")
    exported = np.stack([table.column(c).to_numpy() for c in table.column_names[-5:-2]], 1)
    assert exported[:2].tobytes() == np.stack([served_row, served_row]).tobytes()  # bit for bit
    assert np.isnan(exported[2]).all()  # the event that carried no model input


def test_a_feature_sent_as_floats_by_any_event_exports_as_double(store: EventStore, tmp_path):
    import pyarrow.parquet as pq

    older = event(1)  # stored before events said what a feature was sent as
    older.features.numeric_names.append("hour")
    older.features.numbers = np.array([4.0], "<f8").tobytes()
    newer = event(2, rows=2)
    newer.features.numeric_names.extend(["hour", "count"])
    newer.features.numbers = np.array([5, 7, 6, 8], "<f8").tobytes()
    newer.features.numeric_kinds = "ii"
    store.ingest([older, newer], 0)
    store.put_labels([ev.Label(request_id=f"r{i}", value=0.0) for i in (1, 2)], 3600, 0)
    path, _ = store.export(tmp_path / "t.parquet", "m", "", 0, 0, labelled=True)
    table = pq.read_table(path)
    assert str(table.schema.field("hour").type) == "double"
    assert table.column("hour").to_pylist() == [4.0, 5.0]
    assert str(table.schema.field("count").type) == "int64"
    assert table.column("count").to_pylist() == [None, 7]  # the older event lacked it


def test_an_export_with_max_rows_keeps_the_newest_rows_in_time_order(store, tmp_path):
    import pyarrow.parquet as pq

    store.ingest([event(i, rows=2) for i in range(1, 6)], 0)  # event i at i seconds
    labels = [ev.Label(request_id=f"r{i}", value=1.0, row=r) for i in range(1, 6) for r in (0, 1)]
    store.put_labels(labels, 3600, 0)
    path, rows = store.export(tmp_path / "t.parquet", "m", "", 0, 0, True, max_rows=3)
    assert rows == 3
    table = pq.read_table(path)
    assert list(zip(table["request_id"].to_pylist(), table["row"].to_pylist(), strict=True)) == [
        ("r4", 1),
        ("r5", 0),
        ("r5", 1),
    ]
    path, rows = store.export(tmp_path / "e.parquet", "m", "", 0, 0, False, max_rows=2)
    assert rows == 2
    assert pq.read_table(path)["request_id"].to_pylist() == ["r4", "r5"]
    _, rows = store.export(tmp_path / "all.parquet", "m", "", 0, 0, True)
    assert rows == 10
