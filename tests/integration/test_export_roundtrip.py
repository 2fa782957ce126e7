"""The labelled export is training-ready: what training reads of a prediction is what serving saw.

A real gateway scores raw transactions under the demo contracts (v1 for model version 1, v2
for version 2; ``country`` is sensitive) and streams their events to a real sidecar; the rows
are labelled and exported with ``gateway export --labelled``. Then, from the Parquet file alone:
the model (its ONNX file, run by onnxruntime) on the exported model input gives the served
scores bit for bit, and ``features.assemble_columns`` on the exported raw features rebuilds
every column of that matrix but the sensitive feature's (its values are exported hashed). A
request that sent the model's own input carries no second copy of it: its columns are its raw
features.
"""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import tritonclient.grpc as triton_grpc

from gateway import features
from gateway.demo import synthetic_transactions
from tests.auth import wait_until
from tests.conftest import DEMO_WIDTH, demo_features, demo_input, free_port

# (model version, rows, how numbers are sent): ints as INT64 or INT32, floats as FP64 or FP32
# (each accepted by its kind); one row and many.
REQUESTS = [
    ("2", 1, "wide"),
    ("2", 17, "narrow"),
    ("2", 40, "wide"),
    ("1", 1, "narrow"),
    ("1", 23, "wide"),
    ("2", 5, "narrow"),
]
SENSITIVE_COLUMNS = 6  # country: its five values and its out-of-vocabulary column


def raw_inputs(columns: dict[str, np.ndarray], width: str) -> list[triton_grpc.InferInput]:
    inputs = []
    for name, values in columns.items():
        if values.dtype == object:
            array = np.array([str(v).encode() for v in values], dtype=object)
        elif values.dtype.kind == "i":
            array = values.astype(np.int64 if width == "wide" else np.int32)
        else:
            array = values.astype(np.float64 if width == "wide" else np.float32)
        datatype = "BYTES" if array.dtype == object else triton_grpc.np_to_triton_dtype(array.dtype)
        tensor = triton_grpc.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def gateway_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args], capture_output=True, text=True, timeout=120
    )


def scored_as_served(model: ort.InferenceSession, matrix: np.ndarray, part: pa.Table) -> bytes:
    """The model's scores of the rows, each request's rows run together as the gateway ran
    them (a batch of its own: requests were sent one at a time)."""
    ids = part.column("request_id").to_pylist()
    scores = []
    start = 0
    while start < len(ids):
        end = start + ids.count(ids[start])
        assert part.column("row").to_pylist()[start:end] == list(range(end - start))
        (probability,) = model.run(None, {"features": matrix[start:end]})
        scores.append(probability[:, 0])
        start = end
    return np.concatenate(scores).astype(np.float32).tobytes()


def test_the_labelled_export_rebuilds_the_served_input_and_scores_bit_for_bit(
    demo_repo: Path, start_gateway, start_sidecar, tmp_path: Path
):
    port = free_port()
    sidecar = start_sidecar(tmp_path / "store", port)
    # The whole matrix, sensitive features' columns included (the default leaves those out).
    gateway = start_gateway(
        demo_repo,
        "--sidecar",
        f"127.0.0.1:{port}",
        "--events-dir",
        str(tmp_path / "events"),
        env={"GATEWAY_EVENTS__MODEL_INPUT": "all"},
    )
    served: dict[tuple[str, int], bytes] = {}  # (request id, row) -> its float32 probability
    labels = tmp_path / "labels.csv"
    client = gateway.client()
    try:
        with labels.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["request_id", "row", "label"])
            for i, (version, rows, width) in enumerate(REQUESTS):
                columns, y = synthetic_transactions(rows, seed=500 + i)
                request_id = f"req-{i}"
                reply = client.infer(
                    "fraud",
                    raw_inputs(columns, width),
                    model_version=version,
                    request_id=request_id,
                )
                probability = reply.as_numpy("probability")
                assert probability.dtype == np.float32 and probability.shape == (rows, 1)
                for row in range(rows):
                    served[request_id, row] = probability[row, 0].tobytes()
                    writer.writerow([request_id, row, y[row]])
            client.infer("fraud", [demo_input(2)], model_version="2", request_id="dense")
            writer.writerows([["dense", 0, 1], ["dense", 1, 0]])
    finally:
        client.close()
    wait_until(
        lambda: gateway.metric("gateway_events_total", outcome="acked") == len(REQUESTS) + 1,
        "every event at the sidecar",
    )
    sent = gateway_cli("labels", str(labels), "--sidecar", sidecar.address)
    assert sent.returncode == 0, sent.stderr
    assert f"{len(served) + 2} joined a prediction" in sent.stdout
    export = tmp_path / "train.parquet"
    out = gateway_cli(
        "export", "fraud", "--labelled", "--out", str(export), "--sidecar", sidecar.address
    )
    assert out.returncode == 0, out.stderr

    table = pq.read_table(export)
    dense = table.filter(pc.equal(table.column("request_id"), "dense"))
    sent_matrix = np.stack([dense.column(f"features[{j}]") for j in range(DEMO_WIDTH)], axis=1)
    assert sent_matrix.astype(np.float32).tobytes() == demo_features(2).tobytes()
    inputs = [c for c in dense.column_names if c.startswith("input.")]
    assert inputs and all(np.isnan(dense.column(c).to_numpy()).all() for c in inputs)
    table = table.filter(pc.not_equal(table.column("request_id"), "dense"))
    assert table.num_rows == len(served)
    types = {f.name: str(f.type) for f in table.schema}
    # Raw features in their contract's types: ints as ints (sent as INT32 or INT64), floats
    # as doubles (sent as FP32 or FP64), categories as text, the sensitive one hashed.
    assert types["hour"] == types["tx_count_24h"] == "int64"
    assert types["amount"] == types["account_age_days"] == "double"
    assert types["channel"] == types["country"] == "string"
    assert not {"US", "BR", "DE", "IN", "NG"} & set(table.column("country").to_pylist())

    for version in ("1", "2"):
        contract = features.load_contract(demo_repo / "fraud", f"v{version}")
        model = ort.InferenceSession(
            str(demo_repo / "fraud" / version / "model.onnx"), providers=["CPUExecutionProvider"]
        )
        part = table.filter(table.column("version").to_numpy(zero_copy_only=False) == version)
        expected = b"".join(
            served[key]
            for key in zip(
                part.column("request_id").to_pylist(), part.column("row").to_pylist(), strict=True
            )
        )
        assert len(expected) == 4 * part.num_rows > 0
        matrix_columns = [f"input.{c}" for c in contract.columns]
        assert all(types[c] == "float" for c in matrix_columns)  # float32, as served
        matrix = np.stack([part.column(c).to_numpy() for c in matrix_columns], axis=1)
        assert matrix.dtype == np.float32 and not np.isnan(matrix).any()

        # (a) The model on the exported matrix gives the served scores, bit for bit; the
        # exported score is the served one too.
        assert scored_as_served(model, matrix, part) == expected
        assert part.column("score").to_numpy().astype(np.float32).tobytes() == expected

        # (b) assemble_columns on the exported raw features rebuilds every column of the
        # served matrix but the sensitive feature's, bit for bit ...
        sensitive = contract.sensitive
        raw = {f.name: part.column(f.name) for f in contract.features if f.name not in sensitive}
        rebuilt = features.assemble_columns(contract, raw).matrix
        clear = [j for j, c in enumerate(contract.columns) if c.split("=")[0] not in sensitive]
        hidden = [j for j in range(contract.width) if j not in clear]
        assert len(hidden) == SENSITIVE_COLUMNS
        assert rebuilt[:, clear].tobytes() == np.ascontiguousarray(matrix[:, clear]).tobytes()
        # ... and, given the served sensitive columns, the model scores it as served.
        rebuilt[:, hidden] = matrix[:, hidden]
        assert scored_as_served(model, rebuilt, part) == expected


def test_by_default_events_carry_no_sensitive_feature_of_the_matrix(
    demo_repo: Path, start_gateway, start_sidecar, tmp_path: Path
):
    """events.model_input non_sensitive (the default): the matrix's columns a sensitive
    feature fills (country's one-hot columns, which would show its category) are in neither the
    write-ahead log nor the export; the others are, as served."""
    port = free_port()
    sidecar = start_sidecar(tmp_path / "store", port)
    events = tmp_path / "events"
    gateway = start_gateway(
        demo_repo, "--sidecar", f"127.0.0.1:{port}", "--events-dir", str(events)
    )
    columns, y = synthetic_transactions(8, seed=900)
    with gateway.client() as client:
        client.infer("fraud", raw_inputs(columns, "wide"), model_version="2", request_id="r")
    wait_until(lambda: gateway.metric("gateway_events_total", outcome="written") == 1)
    logged = b"".join(p.read_bytes() for p in events.rglob("*.wal"))
    assert b"channel=" in logged  # the event is there, a public one-hot column with it
    assert b"country=" not in logged  # no column of the sensitive feature
    wait_until(lambda: gateway.metric("gateway_events_total", outcome="acked") == 1)
    labels = tmp_path / "labels.csv"
    labels.write_text("request_id,row,label\n" + "".join(f"r,{i},{v}\n" for i, v in enumerate(y)))
    assert gateway_cli("labels", str(labels), "--sidecar", sidecar.address).returncode == 0
    export = tmp_path / "train.parquet"
    out = gateway_cli(
        "export", "fraud", "--labelled", "--out", str(export), "--sidecar", sidecar.address
    )
    assert out.returncode == 0, out.stderr
    names = pq.read_table(export).column_names
    contract = features.load_contract(demo_repo / "fraud", "v2")
    public, _ = contract.public_columns
    assert [n for n in names if n.startswith("input.")] == [f"input.{c}" for c in public]
    assert not any(n.startswith("input.country") for n in names)
