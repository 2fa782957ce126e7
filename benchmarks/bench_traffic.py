"""Traffic: what routing, cost accounting and a cold cache cost, and what a warm cache buys.

    PERF_ANALYZER=... .venv/bin/python benchmarks/bench_traffic.py

perf_analyzer (``-b 1``, concurrency 64, unary) sends rows from an ``--input-data`` file, so the
cache sees real row contents: perf_analyzer hands the file's steps out across its threads, so
a file of distinct rows is a cold cache (misses only) as long as a round sends fewer requests
than it has rows, and the cache is flushed between rounds.

1. Overhead: the demo model through a route (two weighted variants, sticky draw), a rate
   limit, a budget, the cost ledger and the cache, all on, the cache cold; against the same
   model called directly with the cache and the ledger off. ``overhead_nocache``: the same
   with the cache off, to tell the cache's part from the rest.
2. Cache: a workload where 90% of the rows repeat (ten hot rows) and 10% are new, with the
   cache on and off, on the demo model, on the heavier MLP (about 1 ms a row, cheap per row
   once batched) and on a compute-bound model (about 30 ms a row, batched or not).

Beside throughput, the gateway's own CPU time per request (from /proc) is reported: under a
load generator sharing the machine it is the steadier measure of what a feature costs.

Rounds alternate between the two gateways of a comparison, the first of each round swapping
(this machine is noisy: compare within a round). Writes ``benchmarks/results/traffic.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NotRequired, TypedDict

import numpy as np
import yaml

if TYPE_CHECKING:
    from tests.conftest import GatewayProcess

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_serving import (  # noqa: E402
    cpu_seconds,
    find_perf_analyzer,
    run_meta,
    save_parts,
)
from benchmarks.models import build_bench_repositories, onnx_path  # noqa: E402
from gateway.server.admin_client import AdminClient  # noqa: E402
from tests.models import write_scorer_model  # noqa: E402

TOKEN = "bench"
PRICE = {"compute_second": 1.0, "request": 0.0001}


def route(model: str, deterministic: bool) -> dict[str, object]:
    return {
        "variants": [
            {
                "name": "stable",
                "model": model,
                "weight": 90,
                "deterministic": deterministic,
                "price": PRICE,
            },
            {
                "name": "canary",
                "model": model,
                "weight": 10,
                "arm": "canary",
                "deterministic": deterministic,
                "price": PRICE,
            },
        ]
    }


# Route, rate limit, budget and ledger: what "on" turns on besides the cache.
ROUTED: dict[str, object] = {
    "routing": {
        "routes": {"live": route("fraud", True)},
        "rate_limits": {"*": {"rate": 1e9, "burst": 1_000_000_000}},
    },
    "costs": {"budgets": [{"name": "all", "tenant": "", "limit": 1e12, "policy": "alert"}]},
}

SETTINGS: dict[str, dict[str, object]] = {
    # Everything on: route, limits, budget, ledger, cache.
    "on": {**ROUTED, "admin": {"token": TOKEN}},
    "off": {"cache": {"enabled": False}, "costs": {"enabled": False}},
    # Everything on but the cache: what routing, limits, budget and ledger cost alone.
    "on_nocache": {**ROUTED, "cache": {"enabled": False}},
    "cache": {
        "routing": {
            "routes": {
                "live": route("fraud", True),
                "heavy-live": route("heavy", True),
                "costly-live": route("costly", True),
            }
        },
        "admin": {"token": TOKEN},
    },
    "nocache": {
        "routing": {
            "routes": {
                "live": route("fraud", True),
                "heavy-live": route("heavy", True),
                "costly-live": route("costly", True),
            }
        },
        "cache": {"enabled": False},
        "admin": {"token": TOKEN},
    },
}


@dataclass(frozen=True)
class Plan:
    """One comparison: two gateways (``SETTINGS`` names), the model each is called as, the rows
    perf_analyzer sends; and its line in the results table."""

    title: str
    gateways: tuple[str, str]
    models: dict[str, str]
    data: Path
    target: str


class Comparison(TypedDict):
    """What ``compare`` measures; ``command`` is stamped on by ``save_parts``."""

    infer_per_s: dict[str, list[float]]
    gateway_cpu_us_per_request: dict[str, list[float]]
    cpu_ratio: float
    cache_answered_share: dict[str, list[float]]
    ratio_per_round: list[float]
    median_ratio: float
    command: NotRequired[str]


def input_data(path: Path, width: int, steps: int, hot_share: float, seed: int) -> Path:
    """perf_analyzer steps: ``hot_share`` of them one of ten hot rows, the rest all new."""
    rng = np.random.default_rng(seed)
    hot = rng.normal(size=(10, width))
    data = []
    for _ in range(steps):
        row = hot[rng.integers(10)] if rng.random() < hot_share else rng.normal(size=width)
        data.append({"features": row.tolist()})
    path.write_text(json.dumps({"data": data}))
    return path


def run_pa(pa: str, url: str, model: str, data: Path, interval_ms: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "pa.csv"
        command = [pa, "-m", model, "-i", "grpc", "-u", url, "-b", "1"]
        command += ["--concurrency-range", "64", "--measurement-interval", str(interval_ms)]
        command += ["--stability-percentage", "50", "--max-trials", "6", "--input-data", str(data)]
        command += ["-f", str(out)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=240)
        if done.returncode != 0 or not out.exists():
            raise RuntimeError((done.stdout + done.stderr).strip().splitlines()[-1])
        import csv

        return float(next(csv.DictReader(out.open()))["Inferences/Second"])


def hit_share(gateway: GatewayProcess) -> tuple[float, int]:
    """Rows answered without computing them, since the last flush; and rows looked up."""
    with AdminClient(gateway.url, TOKEN) as admin:
        stats = admin.cache(flush=True)
    rows = stats.hits + stats.misses + stats.coalesced
    return ((stats.hits + stats.coalesced) / rows if rows else 0.0), rows


def compare(
    pa: str,
    gateways: dict[str, GatewayProcess],
    models: dict[str, str],
    data: Path,
    rounds: int,
    interval_ms: int,
) -> Comparison:
    """Alternating rounds of perf_analyzer on each gateway; the cache is flushed between."""
    names = list(gateways)
    per_round: dict[str, list[float]] = {name: [] for name in names}
    cpu_us: dict[str, list[float]] = {name: [] for name in names}
    hits: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(rounds):
        # ABBA: which gateway goes first alternates, so neither gains from its place.
        for name in names if round_ % 2 == 0 else names[::-1]:
            gateway = gateways[name]
            if "admin" in SETTINGS[name]:
                hit_share(gateway)  # flush: every round starts cold
            cpu, served = _cpu_s(gateway), _served(gateway)
            per_round[name].append(round(run_pa(pa, gateway.url, models[name], data, interval_ms)))
            cpu_us[name].append(
                round((_cpu_s(gateway) - cpu) / max(_served(gateway) - served, 1) * 1e6, 1)
            )
            if "admin" in SETTINGS[name]:
                share, rows = hit_share(gateway)
                if rows:
                    hits[name].append(round(share, 3))
    first, second = names
    ratios = [a / b for a, b in zip(per_round[first], per_round[second], strict=True)]
    return {
        "infer_per_s": per_round,
        "gateway_cpu_us_per_request": cpu_us,
        "cpu_ratio": round(statistics.median(cpu_us[first]) / statistics.median(cpu_us[second]), 3),
        "cache_answered_share": {k: v for k, v in hits.items() if v},
        "ratio_per_round": [round(r, 3) for r in ratios],
        "median_ratio": round(statistics.median(ratios), 3),
    }


def _cpu_s(gateway: GatewayProcess) -> float:
    return cpu_seconds(gateway.process.pid)


def _served(gateway: GatewayProcess) -> float:
    return gateway.metric("gateway_requests_total", rpc="ModelInfer")


MODELS = ("fraud", "heavy", "costly")
COSTLY_WIDTH = 19


def traffic_repository(target: Path) -> Path:
    """The serving benchmark's models (the demo scorer, the heavy MLP), and a compute-bound
    scorer: a chain of 1024-wide MatMuls, about 30 ms a row on one thread, batched or not."""
    if (target / "costly" / "config.yaml").exists():
        return target
    source = build_bench_repositories(ROOT / ".bench")["on"]
    for model in ("fraud", "heavy"):
        shutil.copytree(source / model, target / model, dirs_exist_ok=True)
    config = {"max_batch_size": 64, "instances": 2, "intra_op_threads": 1}
    write_scorer_model(target / "costly", COSTLY_WIDTH, hidden=1024, repeats=400, config=config)
    return target


def _width(model: Path) -> int:
    import onnx

    graph = onnx.load(str(model), load_external_data=False).graph
    return int(graph.input[0].type.tensor_type.shape.dim[1].dim_value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--perf-analyzer")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--interval-ms", type=int, default=3000)
    parser.add_argument(
        "--parts",
        default="overhead,cache_demo,cache_heavy,cache_costly",
        help="which comparisons to run",
    )
    parser.add_argument("--work", type=Path, default=ROOT / ".bench" / "traffic")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "traffic")
    args = parser.parse_args()
    pa = find_perf_analyzer(args.perf_analyzer)
    # NOTE: imported here, not at the top: it brings tritonclient, whose protos may not share a
    # process with the gateway's (bench_pipeline.py imports this module's settings).
    from tests.conftest import GatewayProcess

    repo = traffic_repository(args.work / "repo")
    widths = {model: _width(onnx_path(repo, model)) for model in MODELS}
    # More distinct rows than a round sends (a few thousand requests a second).
    cold = input_data(args.work / "cold.json", widths["fraud"], 60_000, 0.0, seed=1)
    hot = {
        m: input_data(args.work / f"hot-{m}.json", w, 60_000, 0.9, seed=2)
        for m, w in widths.items()
    }
    plans = {
        "overhead": Plan(
            title="routing + limits + budget + ledger + cold cache / all off (demo model)",
            gateways=("on", "off"),
            models={"on": "live", "off": "fraud"},
            data=cold,
            target=">= 0.90",
        ),
        "overhead_nocache": Plan(
            title="routing + limits + budget + ledger, no cache / all off (demo model)",
            gateways=("on_nocache", "off"),
            models={"on_nocache": "live", "off": "fraud"},
            data=cold,
            target="-",
        ),
        "cache_demo": Plan(
            title="90% repeated rows: cache on / off (demo model)",
            gateways=("cache", "nocache"),
            models={"cache": "live", "nocache": "live"},
            data=hot["fraud"],
            target=">= 3",
        ),
        "cache_heavy": Plan(
            title="90% repeated rows: cache on / off (heavy MLP, ~1 ms a row)",
            gateways=("cache", "nocache"),
            models={"cache": "heavy-live", "nocache": "heavy-live"},
            data=hot["heavy"],
            target=">= 3",
        ),
        "cache_costly": Plan(
            title="90% repeated rows: cache on / off (compute-bound scorer, ~30 ms a row)",
            gateways=("cache", "nocache"),
            models={"cache": "costly-live", "nocache": "costly-live"},
            data=hot["costly"],
            target=">= 3",
        ),
    }
    parts = args.parts.split(",")
    needed = {name for part in parts for name in plans[part].gateways}
    started = time.time()
    gateways: dict[str, GatewayProcess] = {}
    try:
        for name in sorted(needed):
            config = args.work / f"{name}.yaml"
            config.write_text(yaml.safe_dump(SETTINGS[name]))
            gateways[name] = GatewayProcess(repo, args.work / f"gw-{name}", "--config", str(config))
        results: dict[str, Comparison] = {}
        for part in parts:
            plan = plans[part]
            results[part] = compare(
                pa,
                gateways={k: gateways[k] for k in plan.gateways},
                models=plan.models,
                data=plan.data,
                rounds=args.rounds,
                interval_ms=args.interval_ms,
            )
    finally:
        for gateway in gateways.values():
            gateway.stop()
    meta = run_meta(started)
    results = save_parts(args.out, meta, results)
    md = [
        "# Traffic benchmark",
        "",
        f"`{json.dumps(meta)}`",
        "",
        "perf_analyzer `-b 1 --concurrency-range 64`, rows from `--input-data`, alternating "
        "rounds; the cache is flushed before each round.",
        "",
        "| comparison | infer/s (per round) | rows the cache answered | ratio per round "
        "(median) | gateway CPU us/request (median ratio) | target |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for key, plan in plans.items():
        if key not in results:
            continue
        r = results[key]
        a, b = plan.gateways
        speeds = r["infer_per_s"]
        shares = r["cache_answered_share"]
        md.append(
            f"| {plan.title} (`{r.get('command', meta['command'])}`) | "
            f"{a}: {speeds[a]}<br>{b}: {speeds[b]} | "
            f"{', '.join(f'{k}: {v}' for k, v in shares.items()) or '-'} | "
            f"{r['ratio_per_round']} ({r['median_ratio']}) | "
            f"{a}: {r['gateway_cpu_us_per_request'][a]}<br>"
            f"{b}: {r['gateway_cpu_us_per_request'][b]} ({r['cpu_ratio']}) | {plan.target} |"
        )
    args.out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
