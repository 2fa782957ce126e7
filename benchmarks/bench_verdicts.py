"""Canary verdict benchmark: how often ``gateway verdict`` rolls back a candidate that is the
stable version itself, and how often it catches one that is clearly worse.

    .venv/bin/python benchmarks/bench_verdicts.py              # the whole run (~4 min, 2 cores)
    .venv/bin/python benchmarks/bench_verdicts.py --runs 20 --out /tmp/verdicts

In process, no gateway: each run is a fresh event store (DuckDB in a temporary directory) that
``verdict.judge`` reads exactly as the sidecar's Verdict RPC does, with the default
``CanaryPolicy`` (AUC, 2% / 25% / 10% margins, confidence 0.95, at least 200 labelled rows
with 30 positives and 30 negatives and 100 requests per version).

Traffic: the demo's generator (``gateway.demo.synthetic_transactions``, a new seed per run,
about 3% positives) scored by the demo's version 2 (its MLP, the numpy forward pass its ONNX
graph computes) on the features contract v2 builds. Each run serves ``--requests`` requests
of ``--rows`` rows per version, all in the window, then labels arrive for the first rows of
each version in request order; the verdict is taken at each of ``--labels`` labelled rows
per version. A request's latency is drawn from one log-normal for both versions (median 4 ms,
sigma 0.35) and its cost is the demo's prices over its compute time (1-3 ms): equal versions
are equal in every criterion, only their samples differ.

Scenarios:

* ``equal, split``: the candidate is a copy of the stable version and the traffic is split
  between them (each request to one; unpaired comparisons). No change: every rollback is a
  false one.
* ``equal, shadow``: every request is also scored by the copy under its request id (paired).
* ``worse, split`` / ``worse, shadow``: the candidate's logit carries noise (N(0, 1.5) per
  row), an AUC about 9% lower than the stable's over the whole population: every rollback
  is right and every promote is wrong.

Per scenario and label count: the share of runs that promote, hold and rollback, with a
Wilson 95% interval for the rollback share. Results: benchmarks/results/verdicts.{json,md}.
"""

from __future__ import annotations

import argparse
import bisect
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_auth import tree_revision  # noqa: E402
from benchmarks.bench_serving import run_meta  # noqa: E402
from gateway.api.v1 import events_pb2 as ev  # noqa: E402
from gateway.demo import build_demo_repository, predict, synthetic_transactions  # noqa: E402
from gateway.evaluation.stats import delong  # noqa: E402
from gateway.evaluation.store import EventStore  # noqa: E402
from gateway.evaluation.verdict import judge  # noqa: E402
from gateway.features import assemble, load_contracts  # noqa: E402
from gateway.settings import CanaryPolicy  # noqa: E402

SCENARIOS = ("equal, split", "equal, shadow", "worse, split", "worse, shadow")
NOISE = 1.5  # the worse candidate's extra logit noise
NOW_US = 2_000_000_000 * 1_000_000
PRICE = {"compute_second": 0.0001, "request": 0.000001}  # the demo's
Params = dict[str, NDArray[np.float32]]


class Scorer:
    """The demo's version 2 on raw transaction columns, and its noisier twin."""

    def __init__(self, work: Path) -> None:
        model_dir = build_demo_repository(work)
        self.params: Params = dict(np.load(model_dir / "2" / "params.npz"))
        self.contract = load_contracts(model_dir)["v2"]

    def scores(self, rows: int, seed: int) -> tuple[NDArray[np.float64], ...]:
        """Labels, the stable's scores and the worse candidate's, for ``rows`` new rows."""
        columns, labels = synthetic_transactions(rows, seed)
        p = predict(self.params, assemble(self.contract, columns))[:, 0].astype(np.float64)
        logit = np.log(p / (1 - p))
        noise = np.random.default_rng(seed + 1).normal(0.0, NOISE, rows)
        return labels.astype(np.float64), p, 1 / (1 + np.exp(-(logit + noise)))


def event(
    version: str, request: int, scores: NDArray[np.float64], rng: np.random.Generator
) -> ev.PredictionEvent:
    compute_ms = float(rng.uniform(1.0, 3.0))
    e = ev.PredictionEvent(
        event_id=f"{version}-{request}",
        request_id=f"r{request}",
        model="fraud",
        version=version,
        event_time_us=NOW_US - 10_000_000 + request,
        rows=len(scores),
        total_ms=float(rng.lognormal(math.log(4.0), 0.35)),
        cost=PRICE["request"] + PRICE["compute_second"] * compute_ms / 1000,
    )
    e.outputs.add(name="probability", values=scores.astype("<f8").tobytes(), width=1)
    return e


def one_run(
    scorer: Scorer, scenario: str, seed: int, args: argparse.Namespace
) -> list[tuple[str, int | None]]:
    """The verdict at each label count for one seeded run of a scenario, with the more
    labelled rows per version its AUC criterion asked for when it could not tell."""
    change, layout = scenario.split(", ")
    requests, rows = args.requests, args.rows
    shadow = layout == "shadow"
    # Split traffic: the stable's requests and the candidate's are different rows.
    total = requests * rows * (1 if shadow else 2)
    labels, stable_p, worse_p = scorer.scores(total, seed)
    candidate_p = worse_p if change == "worse" else stable_p
    rng = np.random.default_rng(seed + 2)
    events, label_rows = [], []
    for r in range(requests):
        at = r * rows
        s_rows = slice(at, at + rows)
        c_rows = s_rows if shadow else slice(total // 2 + at, total // 2 + at + rows)
        events.append(event("2", r, stable_p[s_rows], rng))
        c_request = r if shadow else requests + r  # a shadow copy keeps its primary's id
        events.append(event("5", c_request, candidate_p[c_rows], rng))
        for request, part in ((r, s_rows), (c_request, c_rows)):
            for i, y in enumerate(labels[part]):
                label_rows.append((at + i, ev.Label(request_id=f"r{request}", row=i, value=y)))
    label_rows.sort(key=lambda item: item[0])  # each version's rows in request order
    positions = [at for at, _ in label_rows]
    policy = CanaryPolicy(model="fraud", stable="2", candidate="5", window_s=3600)
    outcomes = []
    with tempfile.TemporaryDirectory() as work:
        store = EventStore(Path(work))
        store.ingest(events, NOW_US)
        sent = 0
        for count in args.labels:
            # labels for each version's rows [sent, count)
            end = bisect.bisect_left(positions, count)
            store.put_labels([label for _, label in label_rows[sent:end]], 3600, NOW_US)
            sent = end
            verdict = judge(store, policy, 1_000_000, NOW_US)
            auc = verdict["criteria"][0]
            undecided = auc["outcome"] == "inconclusive" and auc["needs"]
            more = auc["needs"]["candidate"]["labelled_rows"] if undecided else None
            outcomes.append((verdict["verdict"], more))
        store.close()
    return outcomes


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if not n:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def population_auc(scorer: Scorer) -> dict[str, float]:
    labels, stable_p, worse_p = scorer.scores(200_000, 10**6)
    y = labels > 0.5
    return {
        "positive_rate": round(float(y.mean()), 4),
        "stable": round(delong(y, stable_p)[0], 4),
        "worse": round(delong(y, worse_p)[0], 4),
    }


def markdown(meta: dict[str, Any], cells: list[dict[str, Any]]) -> str:
    lines = ["# Canary verdict benchmark", ""]
    if meta.get("note"):
        lines += [f"**{meta['note']}**", ""]
    lines += [f"`{json.dumps({k: v for k, v in meta.items() if k != 'note'})}`", ""]
    auc = meta["population"]
    lines += [
        "Seeded runs of the demo's traffic and model through `verdict.judge` on a fresh event "
        "store, default `CanaryPolicy` (AUC within 2%, p95 within 25%, cost per row within "
        "10%, confidence 0.95, 200 labelled rows with 30 positives and 30 negatives, 100 "
        f"requests). {meta['requests']} requests of {meta['rows']} rows per version, all in "
        "the window; labels for each version's first rows. Population AUC (200,000 rows): "
        f"stable {auc['stable']}, worse candidate {auc['worse']}; positive rate "
        f"{auc['positive_rate']:.1%}. Rollback share with its Wilson 95% interval. AUC "
        "undecided: runs whose AUC interval straddled the margin; for them, the median of the "
        "more labelled rows per version the verdict said would likely decide it (hold also "
        "comes from too few positives: 30 need ~1,000 rows at this rate).",
        "",
        "| scenario | labelled rows per version | runs | promote | hold | rollback "
        "| rollback 95% interval | AUC undecided | more labelled rows asked (median) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |",
    ]
    for c in cells:
        low, high = c["rollback_interval"]
        asked = f"{c['median_more_rows_asked']:,}" if c["median_more_rows_asked"] else "-"
        lines.append(
            f"| {c['scenario']} | {c['labelled_rows']:,} | {c['runs']} | {c['promote']:.1%} "
            f"| {c['hold']:.1%} | {c['rollback']:.1%} | {low:.1%}-{high:.1%} "
            f"| {c['auc_undecided']:.0%} | {asked} |"
        )
    equal = [c for c in cells if c["scenario"].startswith("equal")]
    worst = max(equal, key=lambda c: c["rollback"])
    lines += [
        "",
        f"False rollbacks (equal versions): at most {worst['rollback']:.1%} in any cell "
        f"({worst['scenario']}, {worst['labelled_rows']:,} labelled rows; 95% interval up to "
        f"{worst['rollback_interval'][1]:.1%}); the goal is at most 5%.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=200, help="seeded runs of 'equal, split'")
    parser.add_argument(
        "--other-runs", type=int, default=40, help="seeded runs of each other scenario"
    )
    parser.add_argument("--requests", type=int, default=800, help="per version")
    parser.add_argument("--rows", type=int, default=20, help="per request")
    parser.add_argument("--labels", default="1000,4000,16000", help="labelled rows per version")
    parser.add_argument("--note", default="", help="a line for the results' header")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "verdicts")
    args = parser.parse_args()
    args.labels = [int(n) for n in args.labels.split(",") if n]
    if max(args.labels) > args.requests * args.rows:
        parser.error("--labels: at most --requests x --rows per version")

    started_at = time.time()
    with tempfile.TemporaryDirectory() as work:
        scorer = Scorer(Path(work))
    cells: list[dict[str, Any]] = []
    for scenario in SCENARIOS:
        runs = args.runs if scenario == "equal, split" else args.other_runs
        tallies = [dict.fromkeys(("promote", "hold", "rollback"), 0) for _ in args.labels]
        asked: list[list[int]] = [[] for _ in args.labels]
        for seed in range(runs):
            results = one_run(scorer, scenario, seed, args)
            for i, (outcome, more) in enumerate(results):
                tallies[i][outcome] += 1
                if more is not None:
                    asked[i].append(more)
        for count, tally, more_rows in zip(args.labels, tallies, asked, strict=True):
            cell = {
                "scenario": scenario,
                "labelled_rows": count,
                "runs": runs,
                **{k: v / runs for k, v in tally.items()},
                "rollback_interval": wilson(tally["rollback"], runs),
                "auc_undecided": len(more_rows) / runs,
                "median_more_rows_asked": int(np.median(more_rows)) if more_rows else None,
            }
            cells.append(cell)
            print(json.dumps(cell), flush=True)
    meta: dict[str, Any] = {
        **run_meta(started_at),
        "revision": tree_revision(),
        "requests": args.requests,
        "rows": args.rows,
        "worse_logit_noise": NOISE,
        "population": population_auc(scorer),
    }
    if args.note:
        meta["note"] = args.note
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(
        json.dumps({"meta": meta, "cells": cells}, indent=1) + "\n"
    )
    table = markdown(meta, cells)
    args.out.with_suffix(".md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
