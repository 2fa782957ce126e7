"""Training/serving parity (the skew story): a real gateway serves raw transactions, the
sidecar exports them labelled, and `gateway parity` compares what serving saw with (a) the
contract's own offline path, which matches bit for bit, and (b) an offline pipeline that
computes one feature differently, which it names with its rows."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gateway.api.v1 import events_pb2 as ev
from gateway.demo import synthetic_transactions
from gateway.evaluation.client import send_labels
from tests.auth import wait_until
from tests.conftest import free_port
from tests.integration.test_evaluation import raw_inputs

REQUESTS, ROWS = 4, 10


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args], capture_output=True, text=True, timeout=120
    )


def test_parity_names_the_feature_an_offline_pipeline_computes_differently(
    demo_repo: Path, start_gateway, start_sidecar, tmp_path: Path
):
    port = free_port()
    sidecar = start_sidecar(tmp_path / "store", port)
    gateway = start_gateway(
        demo_repo, "--sidecar", sidecar.address, "--events-dir", str(tmp_path / "events")
    )
    offline: dict[str, list] = {"request_id": [], "row": []}
    labels = []
    with gateway.client() as client:
        for i in range(REQUESTS):
            columns, y = synthetic_transactions(ROWS, seed=700 + i)
            client.infer("fraud", raw_inputs(columns), model_version="2", request_id=f"p{i}")
            for row in range(ROWS):
                offline["request_id"].append(f"p{i}")
                offline["row"].append(row)
                for name, values in columns.items():
                    offline.setdefault(name, []).append(values[row])
            labels += [ev.Label(request_id=f"p{i}", row=r, value=float(v)) for r, v in enumerate(y)]
    wait_until(lambda: gateway.metric("gateway_events_total", outcome="acked") == REQUESTS)
    assert send_labels(sidecar.address, labels) == (len(labels), 0)
    export = tmp_path / "served.parquet"
    out = cli("export", "fraud", "--labelled", "--out", str(export), "--sidecar", sidecar.address)
    assert out.returncode == 0, out.stderr

    # (a) The contract's own offline path rebuilds the served matrix bit for bit, and an
    # offline pipeline computing every feature as serving received it matches too.
    same = tmp_path / "offline.parquet"
    pq.write_table(
        pa.table(
            {k: [str(v) if isinstance(v, bytes) else v for v in vs] for k, vs in offline.items()}
        ),
        same,
    )
    checked = cli(
        "parity",
        "fraud",
        "--export",
        str(export),
        "--offline",
        str(same),
        "--repository",
        str(demo_repo),
        "--json",
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    result = json.loads(checked.stdout)
    assert result["ok"] and result["rows"] == REQUESTS * ROWS
    assert result["rebuilt"] and all(d["differing"] == 0 for d in result["rebuilt"].values())
    assert result["offline_rows"] == REQUESTS * ROWS and "amount" in result["features"]

    # (b) A pipeline that computes amount in cents: named, with its rows and matrix column.
    skewed = dict(offline)
    skewed["amount"] = [
        v * 100 if r % 2 else v for v, r in zip(offline["amount"], offline["row"], strict=True)
    ]
    wrong = tmp_path / "skewed.parquet"
    pq.write_table(
        pa.table(
            {k: [str(v) if isinstance(v, bytes) else v for v in vs] for k, vs in skewed.items()}
        ),
        wrong,
    )
    checked = cli(
        "parity",
        "fraud",
        "--export",
        str(export),
        "--offline",
        str(wrong),
        "--repository",
        str(demo_repo),
    )
    assert checked.returncode == 3, checked.stdout + checked.stderr
    text = checked.stdout
    assert "parity DIFFERS" in text
    differing = [line for line in text.splitlines() if line.startswith("  ")]
    assert any(line.startswith("  amount:") for line in differing)
    assert any(line.startswith("  input.amount") for line in differing)
    half = REQUESTS * ROWS // 2
    assert f"amount: {half} of {REQUESTS * ROWS} rows differ" in text
    assert not any(line.startswith(("  channel", "  hour")) for line in differing)
    assert np.isfinite(
        json.loads(
            cli(
                "parity",
                "fraud",
                "--export",
                str(export),
                "--offline",
                str(wrong),
                "--repository",
                str(demo_repo),
                "--json",
            ).stdout
        )["features"]["amount"]["max_abs_diff"]
    )
