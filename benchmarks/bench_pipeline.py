"""The request pipeline's own CPU per request, in process, without gRPC: what each traffic
feature adds to the gateway's Python work, and how this tree compares with an earlier one.

    .venv/bin/python benchmarks/bench_pipeline.py
    .venv/bin/python benchmarks/bench_pipeline.py --against 6afc7d4 --rounds 4

Builds one pipeline per configuration from the traffic benchmark's repository and settings:
everything off, a route only, a route with the cache (cold: every row new), and everything
on (route, rate limit, budget, ledger, cache). Blocks of one-row requests, 64 at a time,
alternate between the pipelines (noise on this machine drifts; alternating cancels it); the
process CPU time of each block is charged to its pipeline.

``--against REV`` checks REV out in a git worktree under .bench/ (its protos generated and
its kernels built there, once), then runs the same measurement on REV's code and on this
tree's in alternating child processes, ``--rounds`` each (which goes first alternates too),
and prints each side's median and the ratio this/REV per configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import uvloop

HERE = Path(__file__).resolve().parent.parent
# A child measuring another revision imports that tree's gateway (see --against).
ROOT = Path(os.environ.get("BENCH_PIPELINE_TREE", HERE))
sys.path.insert(0, str(ROOT))

from benchmarks.bench_traffic import SETTINGS, TOKEN, route, traffic_repository  # noqa: E402
from gateway.app import Gateway  # noqa: E402
from gateway.settings import load_settings  # noqa: E402
from gateway.types import InferRequest, Tensor  # noqa: E402

CONFIGS: dict[str, tuple[dict[str, object], str]] = {
    "all off": (SETTINGS["off"], "fraud"),
    "route": (
        {
            "routing": {"routes": {"live": route("fraud", False)}},
            "cache": {"enabled": False},
            "costs": {"enabled": False},
        },
        "live",
    ),
    "route + cache": (
        {
            "routing": {"routes": {"live": route("fraud", True)}},
            "costs": {"enabled": False},
            "admin": {"token": TOKEN},
        },
        "live",
    ),
    "all on": (SETTINGS["on"], "live"),
}


async def measure(repo: Path, blocks: int, per_block: int) -> dict[str, float]:
    pipelines = []
    for name, (settings, model) in CONFIGS.items():
        gateway = Gateway(
            load_settings(
                None, environ={}, overrides={**settings, "repository": {"path": str(repo)}}
            )
        )
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


def worktree(rev: str) -> Path:
    """REV checked out under .bench/, with its generated protos and built kernels."""
    tree = HERE / ".bench" / f"ref-{rev}"
    if not tree.exists():
        subprocess.run(
            ["git", "worktree", "add", "--detach", str(tree), rev],
            cwd=HERE,
            check=True,
            capture_output=True,
        )
    if not list((tree / "gateway").glob("_features_c*.so")):
        python = sys.executable
        subprocess.run(
            [python, "-c", "import setup; setup.generate_protos()"], cwd=tree, check=True
        )
        subprocess.run(
            [python, "setup.py", "-q", "build_ext", "--inplace"],
            cwd=tree,
            check=True,
            capture_output=True,
        )
    return tree


def child(tree: Path, repo: Path, blocks: int, per_block: int) -> dict[str, float]:
    """One measurement in a fresh process on ``tree``'s code."""
    command = [
        sys.executable,
        __file__,
        "--child",
        "--repo",
        str(repo),
        "--blocks",
        str(blocks),
        "--per-block",
        str(per_block),
    ]
    environ = {**os.environ, "BENCH_PIPELINE_TREE": str(tree)}
    done = subprocess.run(command, env=environ, check=True, capture_output=True, text=True)
    result: dict[str, float] = json.loads(done.stdout.splitlines()[-1])
    return result


def compare(rev: str, repo: Path, rounds: int, blocks: int, per_block: int) -> None:
    trees = {rev: worktree(rev), "this tree": HERE}
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
    for round_ in range(rounds):
        order = list(trees) if round_ % 2 == 0 else list(reversed(trees))
        for name in order:
            runs[name].append(child(trees[name], repo, blocks, per_block))
            print(f"round {round_ + 1} {name}: {json.dumps(runs[name][-1])}", flush=True)
    print(f"\nmedian us CPU per request over {rounds} rounds (one-row requests, in process)")
    print(f"{'configuration':14s} {rev:>10s} {'this tree':>10s}  this/{rev}")
    for config in CONFIGS:
        before = statistics.median(r[config] for r in runs[rev])
        after = statistics.median(r[config] for r in runs["this tree"])
        print(f"{config:14s} {before:10.1f} {after:10.1f}  {after / before:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--blocks", type=int, default=12)
    parser.add_argument("--per-block", type=int, default=2048)
    parser.add_argument("--work", type=Path, default=HERE / ".bench" / "traffic")
    parser.add_argument("--against", metavar="REV", help="compare with this git revision")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--repo", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = uvloop.run(measure(args.repo, args.blocks, args.per_block))
        print(json.dumps(result))
        return
    repo = traffic_repository(args.work / "repo")
    if args.against:
        compare(args.against, repo, args.rounds, args.blocks, args.per_block)
        return
    result = uvloop.run(measure(repo, args.blocks, args.per_block))
    base = result["all off"]
    for name, micros in result.items():
        print(f"{name:14s} {micros:6.1f} us CPU per request  ({micros - base:+6.1f})")


if __name__ == "__main__":
    main()
