"""skew: an offline feature pipeline computes one feature differently from the contract (the
account's age in weeks where serving took days, for accounts created through one channel).
`gateway parity` on a labelled export catches it, naming the feature, its rows and the model
input column it moves, while the contract's own offline path matches serving bit for bit."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TextIO

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gateway.adaptation.parity import check_parity, format_parity
from gateway.api.v1 import events_pb2 as ev
from gateway.demo import synthetic_transactions
from gateway.evaluation.client import export
from gateway.features import load_contract
from gateway.stories.stage import Stage, label_all

__all__ = ["run"]

ROWS, REQUESTS = 25, 8


def run(work: Path, out: TextIO) -> dict[str, Any]:
    with Stage(work) as stage:
        offline: dict[str, list[Any]] = {"request_id": [], "row": []}
        labels: list[ev.Label] = []
        for i in range(REQUESTS):
            columns, y = synthetic_transactions(ROWS, seed=4200 + i)
            stage.infer("fraud", columns, version="2", request_id=f"skew-{i}")
            labels += [
                ev.Label(request_id=f"skew-{i}", row=r, value=float(v)) for r, v in enumerate(y)
            ]
            # The offline pipeline: the same rows, but for one channel the age is in weeks.
            age = np.where(
                columns["channel"] == "web",
                columns["account_age_days"] / 7,
                columns["account_age_days"],
            )
            for row in range(ROWS):
                offline["request_id"].append(f"skew-{i}")
                offline["row"].append(row)
                for name, values in {**columns, "account_age_days": age}.items():
                    value = values[row]
                    offline.setdefault(name, []).append(
                        value.item() if hasattr(value, "item") else value
                    )
        label_all(stage.sidecar, labels)
        served = work / "served.parquet"
        export(stage.sidecar, ev.ExportRequest(model="fraud", version="2", labelled=True), served)
        pq.write_table(pa.table(offline), work / "offline.parquet")
    contract = load_contract(stage.repository / "fraud", "v2")
    result = check_parity(pq.read_table(served), contract, pq.read_table(work / "offline.parquet"))
    print(
        f"{REQUESTS * ROWS} rows served and labelled; the offline pipeline recomputed their "
        "features (account_age_days in weeks for channel=web)\n",
        file=out,
    )
    print("gateway parity fraud --export served.parquet --offline offline.parquet:", file=out)
    print(format_parity(result), file=out)
    return result.as_dict()
