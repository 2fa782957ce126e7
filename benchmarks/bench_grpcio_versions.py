"""grpcio versions under a bare grpc.aio OIP echo server: which one serves fastest here.

    .venv/bin/python benchmarks/bench_grpcio_versions.py                      # ~6 min
    .venv/bin/python benchmarks/bench_grpcio_versions.py --versions 1.75.0,1.85.3 --rounds 5

Each grpcio version gets a venv of its own (``.bench/grpcio-VER``: ``python -m venv``, then
``grpcio==VER`` and the uvloop this checkout runs), where this file runs again as an echo
server: grpc.aio on uvloop as the gateway runs it (same server options, async handlers), with
generic handlers and identity serializers, answering ModelInfer (and the metadata, config,
live and ready calls perf_analyzer makes) with bytes built once here from the gateway's
generated modules. So no generated code has to suit the version under test, and the server
does nothing per request but gRPC's own work: the part of the gateway's cost the grpcio
version decides. The model is FP32 x [-1, 32] -> y [-1, 1], max_batch_size 1024; requests
are sent with -b 1, and every answer is the same [1, 1] tensor.

perf_analyzer (-i grpc, -b 1, unary) measures each cell: throughput and p50/p99 latency over
its stable windows. The server counts its ModelInfer calls (one private RPC reads the count)
and its CPU time (utime + stime from /proc) over the whole perf_analyzer run: their quotient
is server CPU per request, the number least moved by the load generator sharing the machine;
the same over the main thread alone (``loop``: the event loop, grpc.aio's Python side, which
cannot spread over cores) bounds what one process serves however many cores it has.
Rounds alternate: in every round each version is started and measured once, the order
rotated per round, so drift in the machine's load touches all versions alike; read the
per-round ratios against the fastest (paired within a round) beside the medians. Results:
benchmarks/results/grpcio_versions.{json,md}. Every server binds 127.0.0.1; every process
started here is stopped, and killed if it will not stop.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import csv
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SERVICE = "inference.GRPCInferenceService"
COUNT_METHOD = "/grpcio_bench.Stats/InferCount"
MODEL = "echo"
WIDTH = 32
MAX_BATCH = 1024
DEFAULT_VERSIONS = "1.75.0,1.78.0,1.81.1,1.85.3"


# -- the echo server: runs in the venv of the grpcio under test (stdlib, grpc and uvloop only)


async def serve(answers: dict[str, bytes]) -> None:
    import grpc

    infer_calls = 0

    def constant(answer: bytes) -> Callable[[bytes, Any], Any]:
        async def handler(request: bytes, context: Any) -> bytes:
            return answer

        return handler

    async def infer(request: bytes, context: Any) -> bytes:
        nonlocal infer_calls
        infer_calls += 1
        return answers["ModelInfer"]

    async def count(request: bytes, context: Any) -> bytes:
        return str(infer_calls).encode()

    # Identity serializers (None): requests arrive and answers leave as bytes.
    handlers = {
        method: grpc.unary_unary_rpc_method_handler(constant(answer))
        for method, answer in answers.items()
    }
    handlers["ModelInfer"] = grpc.unary_unary_rpc_method_handler(infer)
    service, _, method = COUNT_METHOD.strip("/").rpartition("/")
    stats = {method: grpc.unary_unary_rpc_method_handler(count)}
    limit = 64 * 1024 * 1024  # the gateway's default max_message_bytes
    server = grpc.aio.server(
        maximum_concurrent_rpcs=4096,  # the gateway's default server.max_concurrent_rpcs
        options=[
            ("grpc.max_receive_message_length", 2 * limit),
            ("grpc.max_send_message_length", 2 * limit),
            ("grpc.so_reuseport", 0),
        ],
    )
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(SERVICE, handlers),
            grpc.method_handlers_generic_handler(service, stats),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"grpcio {grpc.__version__}", file=sys.stderr, flush=True)
    print(f"ready grpc=127.0.0.1:{port}", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1)


# -- the driver: runs in the checkout's venv


def build_messages(path: Path) -> None:
    """The serialized answers the echo server gives, from the gateway's generated modules."""
    from gateway.api.v1 import inference_pb2 as pb
    from gateway.api.v1 import model_config_pb2 as mc

    tensor = pb.ModelMetadataResponse.TensorMetadata
    output = pb.ModelInferResponse.InferOutputTensor
    messages: dict[str, Any] = {
        "ServerLive": pb.ServerLiveResponse(live=True),
        "ServerReady": pb.ServerReadyResponse(ready=True),
        "ServerMetadata": pb.ServerMetadataResponse(name="grpcio-bench", version="0"),
        "ModelReady": pb.ModelReadyResponse(ready=True),
        "ModelMetadata": pb.ModelMetadataResponse(
            name=MODEL,
            versions=["1"],
            platform="onnxruntime_onnx",
            inputs=[tensor(name="x", datatype="FP32", shape=[-1, WIDTH])],
            outputs=[tensor(name="y", datatype="FP32", shape=[-1, 1])],
        ),
        "ModelConfig": pb.ModelConfigResponse(
            config=mc.ModelConfig(
                name=MODEL,
                platform="onnxruntime_onnx",
                max_batch_size=MAX_BATCH,
                input=[mc.ModelInput(name="x", data_type=mc.TYPE_FP32, dims=[WIDTH])],
                output=[mc.ModelOutput(name="y", data_type=mc.TYPE_FP32, dims=[1])],
            )
        ),
        "ModelInfer": pb.ModelInferResponse(
            model_name=MODEL,
            model_version="1",
            outputs=[output(name="y", datatype="FP32", shape=[1, 1])],
            raw_output_contents=[bytes(4)],
        ),
    }
    encoded = {k: base64.b64encode(m.SerializeToString()).decode() for k, m in messages.items()}
    path.write_text(json.dumps(encoded, indent=1) + "\n")


def ensure_venv(work: Path, version: str, uvloop_version: str) -> Path:
    """The python of a venv holding grpcio ``version`` and uvloop; made (or mended) once."""
    venv = work / f"grpcio-{version}"
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import grpc, uvloop; print(grpc.__version__, uvloop.__version__)"]
    wanted = f"{version} {uvloop_version}"
    if python.exists():
        found = subprocess.run(probe, capture_output=True, text=True)
        if found.returncode == 0 and found.stdout.strip() == wanted:
            return python
    print(f"venv {venv}: grpcio=={version} uvloop=={uvloop_version}", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True, timeout=300)
    install = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    install += [f"grpcio=={version}", f"uvloop=={uvloop_version}"]
    subprocess.run(install, check=True, timeout=900)
    found = subprocess.run(probe, capture_output=True, text=True, check=True)
    if found.stdout.strip() != wanted:
        sys.exit(f"{venv}: found {found.stdout.strip()!r}, wanted {wanted!r}")
    return python


def perf_cell(pa: str, url: str, concurrency: int, interval_ms: int) -> dict[str, float] | str:
    """One perf_analyzer run; an unstable one is retried once with windows twice as long."""
    result = _perf_once(pa, url, concurrency, interval_ms)
    if isinstance(result, str) and "stable" in result:
        result = _perf_once(pa, url, concurrency, 2 * interval_ms)
    return result


def _perf_once(pa: str, url: str, concurrency: int, interval_ms: int) -> dict[str, float] | str:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "pa.csv"
        command = [pa, "-m", MODEL, "-i", "grpc", "-u", url, "-b", "1"]
        command += ["--concurrency-range", str(concurrency)]
        command += ["--measurement-interval", str(interval_ms)]
        command += ["--stability-percentage", "50", "--max-trials", "5", "-f", str(out)]
        # subprocess.run kills perf_analyzer if it outlives the timeout.
        result = subprocess.run(command, capture_output=True, text=True, timeout=180)
        if result.returncode != 0 or not out.exists():
            lines = (result.stdout + result.stderr).strip().splitlines()
            return lines[-1] if lines else f"perf_analyzer exited {result.returncode}"
        row = next(csv.DictReader(out.open()))
    return {
        "infer_per_s": float(row["Inferences/Second"]),
        "p50_ms": float(row["p50 latency"]) / 1000,
        "p99_ms": float(row["p99 latency"]) / 1000,
    }


def thread_cpu(pid: int, tid: int) -> float:
    """One thread's CPU time so far (user + system), from /proc: the main thread (tid ==
    pid) runs the event loop, grpc.aio's Python side, the part that cannot spread over cores."""
    fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def infer_count(url: str) -> int:
    import grpc

    with grpc.insecure_channel(url) as channel:
        return int(channel.unary_unary(COUNT_METHOD)(b"", timeout=10))


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarize(rows: list[dict[str, Any]], versions: list[str], levels: list[int]) -> dict[str, Any]:
    """Per version and concurrency: median and range over rounds, and the ratio to the best
    version both of medians and paired within each round (the noise-robust one)."""
    ok = [r for r in rows if "error" not in r]
    rounds = sorted({r["round"] for r in ok})
    metrics = {
        "infer_per_s": max,
        "p99_ms": min,
        "cpu_us_per_request": min,
        "loop_us_per_request": min,
    }
    value = {(r["round"], r["version"], r["concurrency"], k): r[k] for r in ok for k in metrics}
    summary: dict[str, Any] = {}
    for c in levels:
        for metric, best_of in metrics.items():
            series = {
                v: [value[n, v, c, metric] for n in rounds if (n, v, c, metric) in value]
                for v in versions
            }
            medians = {v: statistics.median(s) for v, s in series.items() if s}
            if not medians:
                continue
            best = best_of(medians, key=lambda v: medians[v])
            for v in medians:
                paired = [
                    value[n, v, c, metric] / value[n, best, c, metric]
                    for n in rounds
                    if (n, v, c, metric) in value and (n, best, c, metric) in value
                ]
                summary.setdefault(v, {})[f"{metric}@c{c}"] = {
                    **spread(series[v]),
                    "best": best,
                    "ratio_to_best": medians[v] / medians[best],
                    "paired_ratio": spread(paired),
                    "rounds": len(series[v]),
                }
    return summary


def cell(entry: dict[str, Any], digits: int) -> str:
    if not entry:
        return "-"
    fmt = f"{{:.{digits}f}}"
    return f"{fmt.format(entry['median'])} ({fmt.format(entry['min'])}-{fmt.format(entry['max'])})"


def ratio(entry: dict[str, Any]) -> str:
    if not entry:
        return "-"
    paired = entry["paired_ratio"]
    return f"{entry['ratio_to_best']:.3f} [{paired['min']:.3f}-{paired['max']:.3f}]"


def markdown(summary: dict[str, Any], versions: list[str], levels: list[int]) -> str:
    low, high = levels[0], levels[-1]
    columns = [
        (f"infer/s c={low}", f"infer_per_s@c{low}", 0),
        (f"infer/s c={high}", f"infer_per_s@c{high}", 0),
        (f"p99 ms c={high}", f"p99_ms@c{high}", 2),
        (f"µs CPU/req c={low}", f"cpu_us_per_request@c{low}", 0),
        (f"µs CPU/req c={high}", f"cpu_us_per_request@c{high}", 0),
        (f"µs loop/req c={high}", f"loop_us_per_request@c{high}", 0),
    ]
    head = "| grpcio | " + " | ".join(title for title, _, _ in columns) + " |"
    lines = [head, "| --- |" + " ---: |" * len(columns)]
    for v in versions:
        got = summary.get(v, {})
        lines.append(
            f"| {v} | " + " | ".join(cell(got.get(key, {}), d) for _, key, d in columns) + " |"
        )
    lines += [
        "",
        "Ratio to the best version of each column (highest infer/s, lowest p99 and CPU): "
        "ratio of medians [range of the per-round paired ratios]. A range wholly on one side "
        "of 1.000 means the best won that column in every round.",
        "",
        head,
        "| --- |" + " ---: |" * len(columns),
    ]
    for v in versions:
        got = summary.get(v, {})
        lines.append(f"| {v} | " + " | ".join(ratio(got.get(key, {})) for _, key, _ in columns))
        lines[-1] += " |"
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(ROOT))
    from importlib.metadata import version as installed

    from benchmarks.bench_serving import find_perf_analyzer, run_meta, running

    # SIGTERM unwinds like Ctrl-C: every server and perf_analyzer started here is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.time()
    split = lambda text: [s for s in text.split(",") if s]  # noqa: E731
    versions = split(args.versions)
    levels = [int(c) for c in split(args.concurrency)]
    pa = find_perf_analyzer(args.perf_analyzer)
    args.work.mkdir(parents=True, exist_ok=True)
    messages = args.work / "grpcio-messages.json"
    build_messages(messages)
    uvloop_version = installed("uvloop")
    pythons = {v: ensure_venv(args.work, v, uvloop_version) for v in versions}
    load_before = os.getloadavg()
    rows: list[dict[str, Any]] = []
    for n in range(1, args.rounds + 1):
        shift = (n - 1) % len(versions)
        for v in versions[shift:] + versions[:shift]:
            command = [str(pythons[v]), str(Path(__file__).resolve()), "--serve", str(messages)]
            with running(command, args.work / f"grpcio-{v}.log") as server:
                for c in levels:
                    pid = server.process.pid
                    calls, cpu = infer_count(server.url), server.cpu_seconds()
                    loop, wall = thread_cpu(pid, pid), time.monotonic()
                    stats = perf_cell(pa, server.url, c, args.interval_ms)
                    cpu, loop = server.cpu_seconds() - cpu, thread_cpu(pid, pid) - loop
                    wall = time.monotonic() - wall
                    calls = infer_count(server.url) - calls
                    row: dict[str, Any] = {"round": n, "version": v, "concurrency": c}
                    if isinstance(stats, str):
                        row["error"] = stats
                    else:
                        row.update(stats)
                        row["cpu_us_per_request"] = round(1e6 * cpu / max(calls, 1), 1)
                        row["loop_us_per_request"] = round(1e6 * loop / max(calls, 1), 1)
                    row.update(requests=calls, server_cpu_cores=round(cpu / wall, 2))
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    summary = summarize(rows, versions, levels)
    meta = {
        **run_meta(started),
        "cpu_count": os.cpu_count(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "perf_analyzer": (
            f"{pa}: -i grpc -b 1, unary, --measurement-interval {args.interval_ms} "
            "--stability-percentage 50 --max-trials 5"
        ),
        "uvloop": uvloop_version,
        "rounds": args.rounds,
        "versions": versions,
        "concurrency": levels,
    }
    table = markdown(summary, versions, levels)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    document = {"meta": meta, "summary": summary, "rows": rows}
    args.out.with_suffix(".json").write_text(json.dumps(document, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(
        "# grpcio versions: bare grpc.aio echo server on uvloop\n\n"
        f"`{json.dumps(meta, ensure_ascii=False)}`\n\n"
        "Median (min-max) over rounds; µs CPU/req is the server's CPU time (all threads) "
        "over the ModelInfer calls it answered during the perf_analyzer run; µs loop/req the "
        "same for its main thread alone (the event loop).\n\n"
        f"{table}"
    )
    print(table)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--versions", default=DEFAULT_VERSIONS, help="grpcio versions, a,b,c")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", default="1,64")
    parser.add_argument("--interval-ms", type=int, default=3000)
    parser.add_argument("--perf-analyzer")
    parser.add_argument("--work", type=Path, default=ROOT / ".bench")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "grpcio_versions"
    )
    parser.add_argument("--serve", type=Path, metavar="MESSAGES", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve is not None:
        import uvloop

        if sys.platform == "linux":  # a driver killed outright takes its server with it
            import ctypes

            ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG

        messages = json.loads(args.serve.read_text())
        uvloop.run(serve({method: base64.b64decode(text) for method, text in messages.items()}))
    else:
        run(args)


if __name__ == "__main__":
    main()
