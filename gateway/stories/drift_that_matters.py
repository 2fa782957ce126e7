"""drift-that-matters: two shifts, one page. First the hour of daytime transactions moves
(a new market's business hours): the drift rule fires on `hour` (a retraining ticket), but the
business metric (AUC on labelled outcomes) holds, so nobody is paged. Then fraud moves to a
pattern the features do not show (outcomes no longer follow the scores): the business metric
falls, its rule fires on its interval, and its `rollback` playbook pages."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TextIO

import numpy as np

from gateway.api.v1 import events_pb2 as ev
from gateway.demo import synthetic_transactions
from gateway.evaluation.client import fetch_report
from gateway.stories.stage import Stage, label_all, wait_for

__all__ = ["run"]

ROWS = 50
PAGES = ("rollback",)  # the actions this story's pager carries
RULES = [
    {"name": "feature_drift", "metric": "psi", "above": 0.2, "action": "retrain"},
    {
        "name": "business_metric",
        "metric": "auc",
        "below": 0.7,
        "segment": "all",
        "action": "rollback",
    },
]


def run(work: Path, out: TextIO) -> dict[str, Any]:
    evaluation = {"evaluate_every_s": 1.0, "rules": RULES}
    with Stage(work, evaluation=evaluation) as stage:
        seed = [0]

        def send(requests: int, change: str) -> None:
            labels: list[ev.Label] = []
            for _ in range(requests):
                seed[0] += 1
                columns, y = synthetic_transactions(ROWS, seed=7000 + seed[0])
                if change == "hours":  # daytime moves later; night (what fraud follows) holds
                    day = columns["hour"] >= 5
                    columns["hour"] = np.where(day, 12 + columns["hour"] % 12, columns["hour"])
                if change == "pattern":  # outcomes no longer follow what the features show
                    y = np.random.default_rng(seed[0]).permutation(y)
                request_id = f"{change}-{seed[0]}"
                stage.infer("fraud", columns, version="2", request_id=request_id)
                labels += [
                    ev.Label(request_id=request_id, row=r, value=float(v)) for r, v in enumerate(y)
                ]
            label_all(stage.sidecar, labels)

        send(20, "none")
        send(30, "hours")
        first = wait_for(lambda: _firing(stage.sidecar, "feature_drift", "hour"), "the hour drift")
        quiet = _firing(stage.sidecar, "business_metric")
        report = fetch_report(stage.sidecar, "fraud")
        short = [e for e in report["not_enough_data"] if e["rule"] == "business_metric"]
        quality = report["versions"]["2"]["all"]["quality"]
        print("1. daytime hours move later (1,500 rows): drift, but outcomes hold", file=out)
        _show(first, out)
        print(
            f"   business metric: {'PAGE' if quiet else 'no page'} (auc {quality['auc']:.3f} "
            f"over {quality['labelled']} labelled rows"
            f"{', not enough data to check' if short else ''})",
            file=out,
        )
        send(60, "pattern")
        paged = wait_for(lambda: _firing(stage.sidecar, "business_metric"), "the metric's page")
        print("\n2. fraud moves to a pattern the features do not show (3,000 rows)", file=out)
        _show(paged, out)
        print(f"\nreport page: {stage.report_url}", file=out)
        return {
            "drift": first,
            "quiet": quiet,
            "checked": not short,
            "auc_before": quality["auc"],
            "paged": paged,
            "report_url": stage.report_url,
        }


def _firing(sidecar: str, rule: str, feature: str = "") -> list[dict[str, Any]]:
    alerts = fetch_report(sidecar, "fraud")["alerts"]
    return [a for a in alerts if a["rule"] == rule and (not feature or a["feature"] == feature)]


def _show(alerts: list[dict[str, Any]], out: TextIO) -> None:
    for a in alerts:
        kind = "PAGE" if a["action"] in PAGES else "ticket"
        print(
            f"   {kind}: {a['rule']} {a['feature'] or ''} in {a['segment']}: "
            f"{a['metric']} {a['value']:.3f} -> {a['action']}",
            file=out,
        )
