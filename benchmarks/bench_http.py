"""HTTP/REST benchmark: the gateway's KServe v2 REST front on each HTTP server (uvicorn with
httptools, aiohttp), JSON and binary tensors, against the same gateway over gRPC, and
(``--mlserver``) MLServer's REST endpoint (JSON: it has no binary tensors) and gRPC on the same
model, in one run.

    .venv/bin/python benchmarks/bench_http.py                    # ~6 min
    .venv/bin/python benchmarks/bench_http.py --rounds 1 --interval-ms 1000 --concurrency 64

Every server is ``gateway serve`` on the MLP 32 -> 256 -> 256 -> 1 (benchmarks/models.py, as
bench_transport.py's passthrough: max_batch_size 1024, 2 instances, dynamic batching), with
``--http-port`` and ``server.http_transport`` set, started by this script on 127.0.0.1. Cells:
perf_analyzer ``-b 1`` at concurrency 1 and 64: ``-i http`` with JSON tensors both ways
(``--input-tensor-format json --output-tensor-format json``) and with binary tensors (Triton's
extension), and ``-i grpc`` on the same process for reference. Rounds alternate (every cell on
every server, in an order rotated by the round). Per cell: infer/s, p50/p99 latency, the
gateway's CPU per request (its process group's CPU from /proc over the run, over the requests
its ``gateway_requests_total`` counted) and perf_analyzer's.

Results: benchmarks/results/http.{json,md}.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import resource
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_serving import find_perf_analyzer, run_meta  # noqa: E402
from benchmarks.bench_transport import (  # noqa: E402
    Proc,
    _spread,
    build_repositories,
    metric,
    model_config,
    peer_available,
    scrape,
    started,
)

HTTP_SERVERS = ("uvicorn", "aiohttp")
READY = re.compile(r"gateway ready grpc=(\S+) metrics=(\S+) http=(\S+)")
PEER_READY = re.compile(r"ready grpc=(\S+) http=(\S+)")
CELLS = (("http", "json"), ("http", "binary"), ("grpc", "binary"))


def perf_analyzer(
    pa: str, url: str, protocol: str, tensors: str, concurrency: int, interval_ms: int
) -> dict[str, float] | str:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "pa.csv"
        command = [pa, "-m", "mlp", "-i", protocol, "-u", url, "-b", "1"]
        command += ["--concurrency-range", str(concurrency)]
        command += ["--measurement-interval", str(interval_ms), "--stability-percentage", "1000"]
        command += ["--max-trials", "3", "--percentile", "99", "-f", str(out)]
        if tensors == "json":
            command += ["--input-tensor-format", "json", "--output-tensor-format", "json"]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        except subprocess.TimeoutExpired:
            return "perf_analyzer hung"
        if done.returncode != 0 or not out.exists():
            lines = (done.stdout + done.stderr).strip().splitlines()
            return lines[-1] if lines else f"perf_analyzer exited {done.returncode}"
        row = next(csv.DictReader(out.open()))
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "client_cpu_s": (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
        "infer_per_s": round(float(row["Inferences/Second"]), 1),
        "p50_ms": round(float(row["p50 latency"]) / 1000, 3),
        "p99_ms": round(float(row["p99 latency"]) / 1000, 3),
    }


def answered(metrics_url: str) -> float:
    return float(metric(scrape(metrics_url), "gateway_requests_total", rpc="ModelInfer"))


def measure(
    pa: str,
    proc: Proc,
    urls: dict[str, str],
    metrics_url: str,
    cell: tuple[str, str],
    concurrency: int,
    args: argparse.Namespace,
) -> dict[str, Any]:
    protocol, tensors = cell
    peer = not metrics_url
    served, cpu = 0.0 if peer else answered(metrics_url), proc.cpu_seconds()
    began = time.monotonic()
    stats = perf_analyzer(pa, urls[protocol], protocol, tensors, concurrency, args.interval_ms)
    wall, cpu = time.monotonic() - began, proc.cpu_seconds() - cpu
    row: dict[str, Any] = {}
    if isinstance(stats, str):
        return {"error": stats}
    client = stats.pop("client_cpu_s")
    row.update(stats)
    # A peer has no request counter: its requests are estimated from the rate over the run.
    served = stats["infer_per_s"] * wall if peer else answered(metrics_url) - served
    if served > 0:
        row["requests"] = int(served)
        row["server_cpu_us_per_request"] = round(cpu / served * 1e6, 1)
        row["client_cpu_us_per_request"] = round(client / served * 1e6, 1)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--servers", default=",".join(HTTP_SERVERS))
    parser.add_argument("--mlserver", action="store_true", help="also MLServer's REST (JSON)")
    parser.add_argument("--concurrency", default="1,64")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--interval-ms", type=int, default=2000)
    parser.add_argument("--perf-analyzer")
    parser.add_argument("--work", type=Path, default=ROOT / ".bench" / "http")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "http")
    args = parser.parse_args()
    began = time.time()
    pa = find_perf_analyzer(args.perf_analyzer)
    servers = [s for s in args.servers.split(",") if s]
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    repo = build_repositories(args.work)["passthrough"]
    rows: list[dict[str, Any]] = []
    with ExitStack() as stack:
        running = {}
        for server in servers:
            config = args.work / f"{server}.yaml"
            config.write_text(yaml.safe_dump({"server": {"http_transport": server}}))
            command = [sys.executable, "-m", "gateway", "serve", "--repository", str(repo)]
            command += ["--port", "0", "--metrics-port", "0", "--http-port", "0"]
            command += ["--config", str(config)]
            proc, ready = stack.enter_context(
                started(server, command, args.work / "logs" / f"{server}.log", READY)
            )
            urls = {"grpc": ready.group(1), "http": ready.group(3)}
            running[server] = (proc, urls, ready.group(2))
        if args.mlserver:
            why = peer_available("mlserver")
            if why is not None:
                sys.exit(why)
            from benchmarks.peers import peer_command

            model = repo / "mlp" / "1" / "model.onnx"
            rest = args.work / "mlp-config.json"
            rest.write_text(json.dumps(rest_config(model)))
            command = peer_command("mlserver", model, model_config(model, args.work / "mlp.pb"))
            proc, ready = stack.enter_context(
                started(
                    "mlserver",
                    [*command, "--rest-config", str(rest)],
                    args.work / "logs" / "mlserver.log",
                    PEER_READY,
                    timeout_s=300,
                )
            )
            running["mlserver"] = (proc, {"grpc": ready.group(1), "http": ready.group(2)}, "")
            servers.append("mlserver")
        for round_ in range(args.rounds):
            order = servers[round_ % len(servers) :] + servers[: round_ % len(servers)]
            for concurrency in concurrencies:
                for cell in CELLS:
                    for server in order:
                        if server == "mlserver" and cell == ("http", "binary"):
                            continue  # MLServer has no binary tensor extension
                        proc, urls, metrics_url = running[server]
                        row = measure(pa, proc, urls, metrics_url, cell, concurrency, args)
                        row.update(
                            server=server,
                            protocol=cell[0],
                            tensors=cell[1],
                            concurrency=concurrency,
                            round=round_,
                        )
                        print(json.dumps(row), flush=True)
                        rows.append(row)
    meta = run_meta(began) | {"rounds": args.rounds, "interval_ms": args.interval_ms}
    write(args.out, rows, meta)


def rest_config(model: Path) -> dict[str, Any]:
    """The MLP's model config as Triton's REST JSON (what perf_analyzer -i http reads)."""
    import onnx

    graph = onnx.load(str(model)).graph

    def tensors(values: Any) -> list[dict[str, Any]]:
        return [
            {
                "name": v.name,
                "data_type": "TYPE_FP32",
                "dims": [d.dim_value for d in v.type.tensor_type.shape.dim][1:],
            }
            for v in values
        ]

    return {
        "name": "mlp",
        "platform": "onnxruntime_onnx",
        "max_batch_size": 1024,
        "input": tensors(graph.input),
        "output": tensors(graph.output),
    }


def _median(group: list[dict[str, Any]], key: str) -> float | None:
    spread = _spread([r[key] for r in group if r.get(key) is not None])
    return None if spread is None else spread["median"]


def write(out: Path, rows: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    cells: dict[tuple[str, str, str, int], list[dict[str, Any]]] = {}
    for row in rows:
        key = (row["server"], row["protocol"], row["tensors"], row["concurrency"])
        cells.setdefault(key, []).append(row)
    lines = [
        "# HTTP/REST benchmark",
        "",
        f"`{json.dumps(meta)}`",
        "",
        "perf_analyzer `-b 1` on the MLP passthrough gateway; medians over alternating rounds. "
        "CPU: the gateway's process group per request it answered; client: perf_analyzer's.",
        "",
        "| HTTP server | protocol | tensors | conc | infer/s | p50 ms | p99 ms "
        "| server CPU us/req | client CPU us/req | errors |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for (server, protocol, tensors, concurrency), group in sorted(cells.items()):
        errors = "; ".join(r["error"] for r in group if "error" in r)
        lines.append(
            f"| {server} | {protocol} | {tensors} | {concurrency} | "
            f"{_median(group, 'infer_per_s')} | {_median(group, 'p50_ms')} | "
            f"{_median(group, 'p99_ms')} | {_median(group, 'server_cpu_us_per_request')} | "
            f"{_median(group, 'client_cpu_us_per_request')} | {errors} |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
