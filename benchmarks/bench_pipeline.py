"""The request pipeline's own CPU per request, in process, without gRPC: what each traffic
feature adds to the gateway's Python work, and how this tree compares with an earlier one.

    .venv/bin/python benchmarks/bench_pipeline.py
    .venv/bin/python benchmarks/bench_pipeline.py --against 6afc7d4 --rounds 4

Builds one pipeline per configuration from the traffic benchmark's repository and settings:
everything off, a route only, a route with the cache (cold: every row new), and everything
on (route, rate limit, budget, ledger, cache); and ``every feature``, the transport
benchmark's every-feature gateway (benchmarks/bench_transport.py: a 90/10 canary route over a
32-feature contract, the cache with 40% of rows repeating, rate limit, budget, ledger) with
prediction events written to their log (the sidecar address answers nothing: what recording
costs the request path, not what the link to the sidecar does), each request its 32 named
raw features. Blocks of one-row requests, 64 at a time, alternate between the pipelines
(noise on this machine drifts; alternating cancels it); the process CPU time of each block
is charged to its pipeline.

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
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import uvloop
from numpy.typing import NDArray

HERE = Path(__file__).resolve().parent.parent
# A child measuring another revision imports that tree's gateway (see --against).
ROOT = Path(os.environ.get("BENCH_PIPELINE_TREE", HERE))
sys.path.insert(0, str(ROOT))

from benchmarks.bench_traffic import SETTINGS, TOKEN, route, traffic_repository  # noqa: E402
from gateway import _hotloops  # noqa: E402
from gateway.app import Gateway  # noqa: E402
from gateway.settings import load_settings  # noqa: E402
from gateway.types import InferRequest, Tensor  # noqa: E402

EVERY_FEATURE = "every feature"
_NOBODY = "127.0.0.1:9"  # discard's port: nothing listens there, the publisher just waits

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


def feature_requests(rows: list[dict[str, list[Any]]]) -> list[tuple[list[Tensor], int]]:
    """Each perf_analyzer step as the native decoder hands it over: one ``[1, 1]`` tensor per
    feature, of the datatype the contract advertises for its kind (BYTES as their length-
    prefixed wire buffer), and the request's raw size."""
    requests = []
    for row in rows:
        tensors = []
        for name, (value,) in row.items():
            if isinstance(value, str):
                raw = _hotloops.encode_bytes([value.encode()])
                tensors.append(Tensor(name, "BYTES", None, raw=raw, shape=(1, 1)))
            elif isinstance(value, bool):
                tensors.append(Tensor(name, "BOOL", np.array([[value]], dtype=np.bool_)))
            elif isinstance(value, int):
                tensors.append(Tensor(name, "INT64", np.array([[value]], dtype=np.int64)))
            else:
                tensors.append(Tensor(name, "FP32", np.array([[value]], dtype=np.float32)))
        requests.append((tensors, sum(t.nbytes for t in tensors)))
    return requests


async def measure(
    repo: Path, blocks: int, per_block: int, bundle: dict[str, Any]
) -> dict[str, float]:
    configs: list[tuple[str, Gateway, Callable[[int], InferRequest]]] = []
    rows: NDArray[np.float32] | None = None
    for name, (settings, model) in CONFIGS.items():
        gateway = Gateway(
            load_settings(
                None, environ={}, overrides={**settings, "repository": {"path": str(repo)}}
            )
        )
        await gateway.repository.load_all()
        if rows is None:  # one random row per request, whichever configuration it goes to
            width = gateway.repository.get("fraud").runtime.inputs[0].shape[1]
            total = blocks * per_block * (len(CONFIGS) + 1)
            rows = np.random.default_rng(0).normal(size=(total, width)).astype(np.float32)
        configs.append((name, gateway, _one_row(model, rows)))
    events_dir = tempfile.mkdtemp(prefix="bench-pipeline-events-")
    events = {"sidecar": _NOBODY, "directory": events_dir}
    gateway = Gateway(
        load_settings(None, environ={}, overrides={**bundle["settings"], "events": events})
    )
    assert gateway.events is not None
    await gateway.events.start()
    await gateway.repository.load_all()
    steps = feature_requests(bundle["rows"])

    def step(i: int, model: str = bundle["model"]) -> InferRequest:
        tensors, size = steps[i % len(steps)]
        return InferRequest(model_name=model, inputs=tensors, nbytes=size)

    configs.append((EVERY_FEATURE, gateway, step))
    # As the gateway does at start: what start-up built is out of the collector's sight.
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, *gc.get_threshold()[1:])
    cpu = {name: 0.0 for name, _, _ in configs}
    count = {name: 0 for name, _, _ in configs}
    position = 0
    for block in range(blocks):
        for name, gateway, make in configs:

            async def one(i: int, gateway: Gateway = gateway, make=make) -> None:
                await gateway.pipeline.predict(make(i))

            started = time.process_time()
            for first in range(position, position + per_block, 64):
                await asyncio.gather(*(one(i) for i in range(first, first + 64)))
            if block:  # the first block of each warms up
                cpu[name] += time.process_time() - started
                count[name] += per_block
            position += per_block
    for _, gateway, _ in configs:
        await gateway.pipeline.close()
    shutil.rmtree(events_dir, ignore_errors=True)
    return {name: cpu[name] / count[name] * 1e6 for name in cpu}


def _one_row(model: str, rows: NDArray[np.float32]) -> Callable[[int], InferRequest]:
    """Request ``i``: row ``i`` as the traffic model's own input."""

    def make(i: int) -> InferRequest:
        return InferRequest(model_name=model, inputs=[Tensor("features", "FP32", rows[i : i + 1])])

    return make


def features_bundle(work: Path) -> Path:
    """The every-feature gateway for a child to build (its repository, settings, the rows it
    is sent), written by this tree: a tree measured with ``--against`` needs none of it."""
    from benchmarks import bench_transport

    repos = bench_transport.build_repositories(work / "transport")
    settings = bench_transport.feature_settings() | {"repository": {"path": str(repos["features"])}}
    rows = bench_transport.feature_rows(3000, 0.4)
    path = work / "every-feature.json"
    path.write_text(json.dumps({"settings": settings, "rows": rows, "model": "live"}))
    return path


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


def child(tree: Path, repo: Path, features: Path, blocks: int, per_block: int) -> dict[str, float]:
    """One measurement in a fresh process on ``tree``'s code."""
    command = [sys.executable, __file__, "--child", "--repo", str(repo)]
    command += ["--features", str(features), "--blocks", str(blocks), "--per-block", str(per_block)]
    environ = {**os.environ, "BENCH_PIPELINE_TREE": str(tree)}
    done = subprocess.run(command, env=environ, check=True, capture_output=True, text=True)
    result: dict[str, float] = json.loads(done.stdout.splitlines()[-1])
    return result


def compare(rev: str, repo: Path, features: Path, rounds: int, blocks: int, per_block: int) -> None:
    trees = {rev: worktree(rev), "this tree": HERE}
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
    for round_ in range(rounds):
        order = list(trees) if round_ % 2 == 0 else list(reversed(trees))
        for name in order:
            runs[name].append(child(trees[name], repo, features, blocks, per_block))
            print(f"round {round_ + 1} {name}: {json.dumps(runs[name][-1])}", flush=True)
    print(f"\nmedian us CPU per request over {rounds} rounds (one-row requests, in process)")
    print(f"{'configuration':14s} {rev:>10s} {'this tree':>10s}  this/{rev}")
    for config in [*CONFIGS, EVERY_FEATURE]:
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
    parser.add_argument("--features", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        bundle = json.loads(args.features.read_text())  # `child` always passes --features
        result = uvloop.run(measure(args.repo, args.blocks, args.per_block, bundle))
        print(json.dumps(result))
        return
    repo = traffic_repository(args.work / "repo")
    features = features_bundle(args.work)
    if args.against:
        compare(args.against, repo, features, args.rounds, args.blocks, args.per_block)
        return
    bundle = json.loads(features.read_text())
    result = uvloop.run(measure(repo, args.blocks, args.per_block, bundle))
    base = result["all off"]
    for name, micros in result.items():
        print(f"{name:14s} {micros:6.1f} us CPU per request  ({micros - base:+6.1f})")


if __name__ == "__main__":
    main()
