"""Serving benchmark: perf_analyzer against the gateway (batching on and off) and baselines.

    make bench                      # the whole matrix, one run on this machine (~20 min)
    .venv/bin/python benchmarks/bench_serving.py --servers gateway-batching,echo \\
        --models fraud --batches 1 --concurrency 1,64 --modes unary

Servers: ``gateway-batching`` and ``gateway-nobatch`` (the same models, dynamic batching on or
off), ``naive`` (grpc.aio calling ONNX Runtime once per request, benchmarks/baselines.py) and
``echo`` (no model: the Python gRPC floor; run on the demo model's signature only). Models:
``fraud`` (the demo scorer) and ``heavy`` (an MLP of about 1 ms per row at batch 1 on one
thread). Each cell: throughput, p50/p95/p99 latency, mean rows per model run and the server's
CPU use (cores) over the measurement. Results: benchmarks/results/serving.{json,md}.

perf_analyzer comes from ``PERF_ANALYZER``, ``--perf-analyzer`` or, beside a checkout with
``../shared/tools/install-perf-analyzer``, from that installer. Every server binds 127.0.0.1;
every measurement is bounded in time.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.models import build_bench_repositories, onnx_path  # noqa: E402

READY = re.compile(r"ready grpc=(\S+)(?: metrics=(\S+))?")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    url: str
    metrics_url: str | None

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime

    def batch_rows(self, model: str) -> tuple[float, float]:
        """(rows, runs) so far for ``model`` from the gateway's Prometheus metrics."""
        if self.metrics_url is None:
            return 0.0, 0.0
        with urllib.request.urlopen(f"http://{self.metrics_url}/metrics", timeout=10) as reply:
            text = reply.read().decode()
        sums = {"sum": 0.0, "count": 0.0}
        for line in text.splitlines():
            for key in sums:
                if line.startswith(f"gateway_batch_rows_{key}{{") and f'model="{model}"' in line:
                    sums[key] += float(line.rsplit(" ", 1)[1])
        return sums["sum"], sums["count"]


@contextmanager
def running(command: list[str], log: Path) -> Iterator[Server]:
    with log.open("wb") as err:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 120
        while True:
            match = READY.search(log.read_text())
            if match:
                break
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{command[:4]} did not start:\n{log.read_text()}")
            time.sleep(0.1)
        metrics = match.group(2) if match.group(2) not in (None, "off") else None
        yield Server(process, match.group(1), metrics)
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()


def find_perf_analyzer(explicit: str | None) -> str:
    for candidate in (explicit, os.environ.get("PERF_ANALYZER"), shutil.which("perf_analyzer")):
        if candidate and Path(candidate).exists():
            return candidate
    installer = ROOT.parent / "shared" / "tools" / "install-perf-analyzer"
    if installer.exists():
        out = subprocess.run([str(installer)], check=True, capture_output=True, text=True)
        return out.stdout.strip()
    sys.exit("perf_analyzer not found: pass --perf-analyzer PATH or set PERF_ANALYZER")


def run_meta(started: float) -> dict[str, object]:
    """What a results file says about its run: machine, Python, duration, command."""
    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "python": platform.python_version(),
        "minutes": round((time.time() - started) / 60, 1),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }


def save_parts(out: Path, meta: dict[str, object], results: dict[str, Any]) -> dict[str, Any]:
    """Write ``out``.json: this run's parts, each stamped with its command, over the parts an
    earlier run left (a run of some parts keeps the others). Returns every part."""
    for part in results.values():
        part["command"] = meta["command"]
    path = out.with_suffix(".json")
    if path.exists():
        kept = {k: v for k, v in json.loads(path.read_text()).items() if k != "meta"}
        results = {**kept, **results}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, **results}, indent=1) + "\n")
    return results


def cpu_seconds(pid: int) -> float:
    """A process's CPU time so far (user + system, all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def perf_analyzer(
    pa: str, url: str, model: str, batch: int, concurrency: int, streaming: bool, interval_ms: int
) -> dict[str, float] | str:
    """One cell; on a noisy machine an unstable window is retried once with a longer one."""
    result = _perf_analyzer_once(pa, url, model, batch, concurrency, streaming, interval_ms)
    if isinstance(result, str) and "stable" in result:
        result = _perf_analyzer_once(pa, url, model, batch, concurrency, streaming, 2 * interval_ms)
    return result


def _perf_analyzer_once(
    pa: str, url: str, model: str, batch: int, concurrency: int, streaming: bool, interval_ms: int
) -> dict[str, float] | str:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "pa.csv"
        command = [pa, "-m", model, "-i", "grpc", "-u", url, "-b", str(batch)]
        command += ["--concurrency-range", str(concurrency)]
        command += ["--measurement-interval", str(interval_ms)]
        command += ["--stability-percentage", "50", "--max-trials", "8", "--percentile", "99"]
        command += ["-f", str(out)]
        if streaming:
            command.append("--streaming")
        result = subprocess.run(command, capture_output=True, text=True, timeout=240)
        if result.returncode != 0 or not out.exists():
            return (result.stdout + result.stderr).strip().splitlines()[-1]
        row = next(csv.DictReader(out.open()))
    return {
        "infer_per_s": float(row["Inferences/Second"]),
        "p50_ms": float(row["p50 latency"]) / 1000,
        "p95_ms": float(row["p95 latency"]) / 1000,
        "p99_ms": float(row["p99 latency"]) / 1000,
    }


def server_command(kind: str, model: str, repos: dict[str, Path]) -> list[str]:
    if kind.startswith("gateway"):
        repo = repos["on" if kind == "gateway-batching" else "off"]
        serve = [sys.executable, "-m", "gateway", "serve"]
        return [*serve, "--repository", str(repo), "--port", "0", "--metrics-port", "0"]
    mode = "echo" if kind == "echo" else "naive"
    baseline = [sys.executable, str(ROOT / "benchmarks" / "baselines.py"), mode]
    return [*baseline, "--model", str(onnx_path(repos["on"], model)), "--name", model]


def measure(
    pa: str,
    server: Server,
    kind: str,
    model: str,
    mode: str,
    batch: int,
    concurrency: int,
    args: argparse.Namespace,
) -> dict[str, object]:
    rows_before, runs_before = server.batch_rows(model)
    cpu_before, wall_before = server.cpu_seconds(), time.monotonic()
    stats = perf_analyzer(
        pa, server.url, model, batch, concurrency, mode == "streaming", args.interval_ms
    )
    cpu = (server.cpu_seconds() - cpu_before) / (time.monotonic() - wall_before)
    rows_after, runs_after = server.batch_rows(model)
    runs = runs_after - runs_before
    row: dict[str, object] = {
        "server": kind,
        "model": model,
        "mode": mode,
        "batch": batch,
        "concurrency": concurrency,
        "server_cpu_cores": round(cpu, 2),
        "mean_batch_rows": round((rows_after - rows_before) / runs, 1) if runs else float(batch),
    }
    if isinstance(stats, str):
        row["error"] = stats
    else:
        row.update(stats)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--servers", default="gateway-batching,gateway-nobatch,naive,echo")
    parser.add_argument("--models", default="fraud,heavy")
    parser.add_argument("--modes", default="unary,streaming")
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--concurrency", default="1,8,32,64,128")
    parser.add_argument("--interval-ms", type=int, default=2000)
    parser.add_argument("--perf-analyzer")
    parser.add_argument("--work", type=Path, default=ROOT / ".bench")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "serving")
    args = parser.parse_args()

    pa = find_perf_analyzer(args.perf_analyzer)
    repos = build_bench_repositories(args.work)
    split = lambda text: [s for s in text.split(",") if s]  # noqa: E731
    rows: list[dict[str, object]] = []
    started = time.time()
    # Every server runs for the whole benchmark (idle ones cost nothing) and each cell is
    # measured on all of them back to back, so drift in the machine's load over the run
    # touches every server of a cell alike: compare within a cell, as ratios.
    with contextlib.ExitStack() as stack:
        servers: dict[tuple[str, str], Server] = {}
        for kind in split(args.servers):
            models = ["fraud"] if kind == "echo" else split(args.models)
            # The gateway serves both models from one process; the baselines one model each.
            groups = [models] if kind.startswith("gateway") else [[m] for m in models]
            for group in groups:
                log = args.work / f"{kind}-{group[0]}.log"
                server = stack.enter_context(running(server_command(kind, group[0], repos), log))
                servers.update({(kind, model): server for model in group})
        for model in split(args.models):
            for mode in split(args.modes):
                for batch in (int(b) for b in split(args.batches)):
                    for concurrency in (int(c) for c in split(args.concurrency)):
                        for (kind, served), server in servers.items():
                            if served != model:
                                continue
                            row = measure(pa, server, kind, model, mode, batch, concurrency, args)
                            rows.append(row)
                            print(json.dumps(row), flush=True)
    meta = {
        **run_meta(started),
        "perf_analyzer": "2.51 (grpc, raw binary tensors, random data)",
        "interval_ms": args.interval_ms,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(
        json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n"
    )
    table = markdown(rows)
    args.out.with_suffix(".md").write_text(
        f"# Serving benchmark\n\n`{json.dumps(meta)}`\n\n{table}"
    )
    print(table)


def markdown(rows: list[dict[str, object]]) -> str:
    lines = [
        "| server | model | mode | -b | conc | infer/s | p50 ms | p95 ms | p99 ms "
        "| rows/run | cpu |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        if "error" in r:
            cells = f"error: {r['error']} | | | | | "
        else:
            cells = (
                f"{r['infer_per_s']:.0f} | {r['p50_ms']:.2f} | {r['p95_ms']:.2f} | "
                f"{r['p99_ms']:.2f} | {r['mean_batch_rows']} | {r['server_cpu_cores']}"
            )
        lines.append(
            f"| {r['server']} | {r['model']} | {r['mode']} | {r['batch']} | {r['concurrency']} | "
            + cells
            + " |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
