"""Overload benchmark: 4x the measured capacity, then load drops; is the gateway still sane?

    .venv/bin/python benchmarks/bench_overload.py          # about a minute
    .venv/bin/python benchmarks/bench_overload.py --timeout-ms 50 --out /tmp/overload-50ms

The heavy MLP with dynamic batching and a bounded queue, driven by an open-loop client (request
starts on a fixed schedule, whatever the answers do) of 64-row requests, each with a
``timeout_ms`` (``--timeout-ms``, 1 s by default). Phases: capacity (closed loop), overload (4x
capacity), recovery (0.5x). Reports answered/refused counts, latency percentiles of each, the
OK answers that came back after their deadline (``ok_late``, as the client measured them: its
own event loop's delays included), the answers that left the gateway after the deadline by its
own clock (``server_over_deadline``: from the call's arrival at the transport, read from
``gateway_request_duration_seconds``; every status, DEADLINE_EXCEEDED ones included), the
server's RSS across the run and the throughput after load drops. Results:
benchmarks/results/overload.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import uvloop
import yaml
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.models import write_heavy_mlp  # noqa: E402
from gateway.api.v1 import inference_pb2 as pb  # noqa: E402
from gateway.api.v1 import inference_pb2_grpc as pb_grpc  # noqa: E402

ROWS = 64


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def answered(metrics_url: str, within_s: float) -> tuple[float, float]:
    """The gateway's own count of ModelInfer answers on ``heavy``, and of those that took at
    most ``within_s`` (the largest histogram bound not past it) from arrival to answer."""
    with urllib.request.urlopen(f"http://{metrics_url}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    total = inside = 0.0
    bound = max(b for b in (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0) if b <= within_s)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("model") != "heavy":
                continue
            if sample.name == "gateway_request_duration_seconds_count":
                total += sample.value
            elif (
                sample.name == "gateway_request_duration_seconds_bucket"
                and float(sample.labels["le"]) == bound
            ):
                inside += sample.value
    return total, inside


def make_request(timeout_ms: int) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="heavy")
    request.inputs.add(name="features", datatype="FP32", shape=[ROWS, 19])
    request.raw_input_contents.append(
        np.random.default_rng(0).normal(size=(ROWS, 19)).astype(np.float32).tobytes()
    )
    request.parameters["timeout_ms"].int64_param = timeout_ms
    return request


async def closed_loop(
    stub: pb_grpc.GRPCInferenceServiceStub, seconds: float, workers: int
) -> float:
    request = make_request(5000)
    done = 0
    end = time.monotonic() + seconds

    async def worker() -> None:
        nonlocal done
        while time.monotonic() < end:
            await stub.ModelInfer(request)
            done += 1

    await asyncio.gather(*(worker() for _ in range(workers)))
    return done / seconds


async def open_loop(
    stub: pb_grpc.GRPCInferenceServiceStub, rate: float, seconds: float, pid: int, timeout_ms: int
) -> dict[str, object]:
    request = make_request(timeout_ms)
    results: list[tuple[str, float]] = []
    rss: list[float] = []

    async def one() -> None:
        start = time.perf_counter()
        try:
            await stub.ModelInfer(request, timeout=10)
            code = "OK"
        except grpc.aio.AioRpcError as err:
            code = err.code().name
        results.append((code, (time.perf_counter() - start) * 1000))

    tasks = []
    begin = time.monotonic()
    n = int(rate * seconds)
    next_rss = begin
    for i in range(n):
        target = begin + i / rate
        delay = target - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one()))
        if time.monotonic() >= next_rss:
            rss.append(rss_mb(pid))
            next_rss += 0.5
    await asyncio.gather(*tasks)
    elapsed = time.monotonic() - begin
    rss.append(rss_mb(pid))

    def summary(code: str | None) -> dict[str, float]:
        lat = np.array([ms for c, ms in results if (c == code if code else c != "OK")])
        if not len(lat):
            return {"count": 0}
        return {
            "count": len(lat),
            "p50_ms": round(float(np.percentile(lat, 50)), 2),
            "p99_ms": round(float(np.percentile(lat, 99)), 2),
            "max_ms": round(float(lat.max()), 2),
        }

    codes: dict[str, int] = {}
    for code, _ in results:
        codes[code] = codes.get(code, 0) + 1
    return {
        "offered_per_s": round(rate, 1),
        "answered_ok_per_s": round(codes.get("OK", 0) / elapsed, 1),
        "codes": codes,
        "ok": summary("OK"),
        "ok_late": sum(1 for c, ms in results if c == "OK" and ms > timeout_ms),
        "refused": summary(None),
        "rss_mb": {"first": round(rss[0], 1), "max": round(max(rss), 1), "last": round(rss[-1], 1)},
    }


async def run(
    url: str, metrics_url: str, pid: int, seconds: float, timeout_ms: int
) -> dict[str, object]:
    async with grpc.aio.insecure_channel(url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        await closed_loop(stub, 2, 8)  # warm up
        capacity = await closed_loop(stub, 5, 16)
        total, inside = answered(metrics_url, timeout_ms / 1000)
        overload = await open_loop(stub, 4 * capacity, seconds, pid, timeout_ms)
        total_after, inside_after = answered(metrics_url, timeout_ms / 1000)
        overload["server_over_deadline"] = int((total_after - total) - (inside_after - inside))
        recovery = await open_loop(stub, 0.5 * capacity, 5, pid, timeout_ms)
    return {
        "capacity_per_s": round(capacity, 1),
        "overload_4x": overload,
        "recovery_0.5x": recovery,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--timeout-ms", type=int, default=1000, help="each request's deadline")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "overload")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        write_heavy_mlp(repo / "heavy")
        config = {
            "max_batch_size": 256,
            "instances": 2,
            "dynamic_batching": {"max_queue_delay_us": 0},
            "queue": {"max_requests": 32},
        }
        (repo / "heavy" / "config.yaml").write_text(yaml.safe_dump(config))
        log = Path(tmp) / "gateway.log"
        with log.open("wb") as err:
            command = [sys.executable, "-m", "gateway", "serve", "--repository", str(repo)]
            command += ["--port", "0", "--metrics-port", "0"]
            server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err)
        try:
            ready = r"gateway ready grpc=(\S+) metrics=(\S+)"
            while not (match := re.search(ready, log.read_text())):
                if server.poll() is not None:
                    sys.exit(log.read_text())
                time.sleep(0.1)
            url, metrics_url = match.groups()
            result = uvloop.run(run(url, metrics_url, server.pid, args.seconds, args.timeout_ms))
        finally:
            server.terminate()
            server.wait(30)
    result["setup"] = {
        "model": f"heavy MLP, 64-row requests, timeout_ms {args.timeout_ms}",
        "config": config,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(
        "# Overload benchmark\n\n```json\n" + json.dumps(result, indent=1) + "\n```\n"
    )
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
