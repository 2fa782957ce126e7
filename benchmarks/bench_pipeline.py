"""The request pipeline's own CPU per request, in process, without gRPC: what each traffic
feature adds to the gateway's Python work.

    .venv/bin/python benchmarks/bench_pipeline.py

Builds one pipeline per configuration from the traffic benchmark's repository and settings:
everything off, a route only, a route with the cache (cold: every row new), and everything
on (route, rate limit, budget, ledger, cache). Blocks of one-row requests, 64 at a time,
alternate between the pipelines (noise on this machine drifts; alternating cancels it); the
process CPU time of each block is charged to its pipeline.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
import time
from pathlib import Path

import numpy as np
import uvloop

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_traffic import SETTINGS, TOKEN, route, traffic_repository  # noqa: E402
from gateway.app import Gateway  # noqa: E402
from gateway.settings import load_settings  # noqa: E402
from gateway.types import InferRequest, Tensor  # noqa: E402

CONFIGS: dict[str, tuple[dict[str, object], str]] = {
    "all off": (SETTINGS["off"], "fraud"),
    "route": (
        {"routing": {"routes": {"live": route("fraud", False)}},
         "cache": {"enabled": False}, "costs": {"enabled": False}},
        "live",
    ),
    "route + cache": (
        {"routing": {"routes": {"live": route("fraud", True)}}, "costs": {"enabled": False},
         "admin": {"token": TOKEN}},
        "live",
    ),
    "all on": (SETTINGS["on"], "live"),
}  # fmt: skip


async def measure(repo: Path, blocks: int, per_block: int) -> dict[str, float]:
    pipelines = []
    for name, (settings, model) in CONFIGS.items():
        gateway = Gateway(load_settings(None, environ={}, overrides={
            **settings, "repository": {"path": str(repo)}}))  # fmt: skip
        await gateway.repository.load_all()
        pipelines.append((name, model, gateway))
    # As the gateway does at start: what start-up built is out of the collector's sight.
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, *gc.get_threshold()[1:])
    width = pipelines[0][2].repository.get("fraud").runtime.inputs[0].shape[1]
    rows = np.random.default_rng(0).normal(size=(blocks * per_block * len(pipelines), width))
    rows = rows.astype(np.float32)
    cpu = dict.fromkeys(CONFIGS, 0.0)
    count = dict.fromkeys(CONFIGS, 0)
    position = 0
    for block in range(blocks):
        for name, model, gateway in pipelines:

            async def one(i: int, model: str = model, gateway: Gateway = gateway) -> None:
                tensor = Tensor("features", "FP32", rows[i : i + 1])
                await gateway.pipeline.predict(InferRequest(model_name=model, inputs=[tensor]))

            started = time.process_time()
            for first in range(position, position + per_block, 64):
                await asyncio.gather(*(one(i) for i in range(first, first + 64)))
            if block:  # the first block of each warms up
                cpu[name] += time.process_time() - started
                count[name] += per_block
            position += per_block
    for _, _, gateway in pipelines:
        await gateway.pipeline.close()
    return {name: cpu[name] / count[name] * 1e6 for name in CONFIGS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--blocks", type=int, default=12)
    parser.add_argument("--per-block", type=int, default=2048)
    parser.add_argument("--work", type=Path, default=ROOT / ".bench" / "traffic")
    args = parser.parse_args()
    repo = traffic_repository(args.work / "repo")
    result = uvloop.run(measure(repo, args.blocks, args.per_block))
    base = result["all off"]
    for name, micros in result.items():
        print(f"{name:14s} {micros:6.1f} us CPU per request  ({micros - base:+6.1f})")


if __name__ == "__main__":
    main()
