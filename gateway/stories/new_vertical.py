"""new-vertical: a new merchant category becomes 30% of one segment's traffic. The coverage
rule (`new_categories`, out-of-vocabulary share) fires for that feature in that segment only,
and its `human_review` playbook puts the alert in the review queue with the rows to look at."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TextIO

import numpy as np

from gateway.demo import synthetic_transactions
from gateway.evaluation.client import fetch_report, fetch_reviews, format_reviews
from gateway.stories.stage import Stage, wait_for

__all__ = ["run"]

NEW = "crypto-exchange"
ROWS, BEFORE, AFTER = 50, 8, 12  # rows per request; requests per segment before and after


def run(work: Path, out: TextIO) -> dict[str, Any]:
    with Stage(work, evaluation={"evaluate_every_s": 1.0}) as stage:
        seed = 0
        for phase, requests in (("before", BEFORE), ("after", AFTER)):
            for _ in range(requests):
                for segment in ("north", "south"):
                    seed += 1
                    columns, _ = synthetic_transactions(ROWS, seed=seed)
                    if phase == "after" and segment == "south":  # the new vertical, 30%
                        category = columns["merchant_category"].copy()
                        category[np.random.default_rng(seed).random(ROWS) < 0.3] = NEW
                        columns = {**columns, "merchant_category": category}
                    stage.infer(
                        "fraud", columns, version="2", parameters={"segment.region": segment}
                    )
        print(
            f"sent {2 * (BEFORE + AFTER) * ROWS} rows; from the midpoint 30% of region=south's "
            f"merchant_category is '{NEW}', a category the contract has never seen",
            file=out,
        )
        alerts = wait_for(lambda: _coverage_alerts(stage.sidecar), "the coverage alert")
        # Each alert's incident gets its own review item, as its round comes: wait for all.
        wanted = {(a["segment"], a["feature"]) for a in alerts if a["action"] == "human_review"}

        def reviewed() -> list[dict[str, Any]]:
            reviews = fetch_reviews(stage.sidecar, "fraud")
            return reviews if wanted <= {(r["segment"], r["feature"]) for r in reviews} else []

        reviews = wait_for(reviewed, "a review item for each alert")
        print("\nalert (gateway report fraud, sidecar_alert_firing, alerts.jsonl):", file=out)
        for alert in alerts:
            print(
                f"  {alert['rule']} on {alert['feature']} in {alert['segment']}: "
                f"{alert['value']:.0%} out of vocabulary -> {alert['action']}",
                file=out,
            )
        print(f"\nreport page: {stage.report_url}", file=out)
        print("\nreview queue (gateway review list):", file=out)
        print(format_reviews(reviews), file=out)
        print("\nresolve with: gateway review resolve ID --note '...'", file=out)
        return {"alerts": alerts, "reviews": reviews, "report_url": stage.report_url}


def _coverage_alerts(sidecar: str) -> list[dict[str, Any]]:
    report = fetch_report(sidecar, "fraud")
    return [a for a in report["alerts"] if a["rule"] == "new_categories"]
