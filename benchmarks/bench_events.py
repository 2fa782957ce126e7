"""Prediction events: what streaming them costs the gateway, how fast the sidecar ingests, and
how many events a feature shift takes to raise its alert.

    PERF_ANALYZER=... .venv/bin/python benchmarks/bench_events.py

1. Throughput: perf_analyzer (``-b 1``, concurrency 64, unary) against two gateways on the
   same repository, one streaming events to a sidecar and one without events, measured in
   alternating rounds (this machine is noisy: compare within a round).
2. Ingestion: a client streams ready-made event batches to a fresh sidecar as fast as it
   acknowledges them; events stored per second.
3. Time to alert: reference traffic, then traffic with one feature shifted, sent in chunks
   through a gateway; after each chunk the report is read; the shifted events it took.

Writes ``benchmarks/results/events.{json,md}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_serving import (  # noqa: E402
    cpu_seconds,
    find_perf_analyzer,
    perf_analyzer,
    run_meta,
    save_parts,
)
from benchmarks.models import build_bench_repositories  # noqa: E402
from gateway.api.v1 import events_pb2 as ev  # noqa: E402
from gateway.demo import build_demo_repository, synthetic_transactions  # noqa: E402
from tests.conftest import GatewayProcess, SidecarProcess, free_port  # noqa: E402


def throughput(pa: str, work: Path, repo: Path, rounds: int) -> dict[str, object]:
    """Alternating rounds on two gateways, events on and off; besides infer/s, the CPU each
    gateway spends per request and the sidecar per event (the steadier measure here, where
    perf_analyzer, both gateways and the sidecar share two cores)."""
    port = free_port()
    sidecar = SidecarProcess(work / "store-throughput", port, work / "logs")
    events = ["--sidecar", f"127.0.0.1:{port}", "--events-dir", str(work / "events-on")]
    on = GatewayProcess(repo, work / "gw-on", *events)
    off = GatewayProcess(repo, work / "gw-off")
    results: dict[str, list[float]] = {"events on": [], "events off": []}
    cpu_us: dict[str, list[float]] = {"events on": [], "events off": [], "sidecar": []}
    try:
        for _ in range(rounds):
            for name, gw in (("events on", on), ("events off", off)):
                served = gw.metric("gateway_requests_total", rpc="ModelInfer")
                cpu, sidecar_cpu = cpu_seconds(gw.process.pid), cpu_seconds(sidecar.process.pid)
                cell = perf_analyzer(pa, gw.url, "fraud", 1, 64, False, 3000)
                if isinstance(cell, str):
                    raise RuntimeError(f"perf_analyzer on {name}: {cell}")
                results[name].append(cell["infer_per_s"])
                count = max(gw.metric("gateway_requests_total", rpc="ModelInfer") - served, 1)
                cpu_us[name].append(round((cpu_seconds(gw.process.pid) - cpu) / count * 1e6))
                if name == "events on":  # its acks may trail into the next round: close enough
                    sidecar_cpu = cpu_seconds(sidecar.process.pid) - sidecar_cpu
                    cpu_us["sidecar"].append(round(sidecar_cpu / count * 1e6))
        acked = on.metric("gateway_events_total", outcome="acked")
    finally:
        on.stop(), off.stop(), sidecar.stop()
    ratios = [a / b for a, b in zip(results["events on"], results["events off"], strict=False)]
    return {
        "infer_per_s": results,
        "ratio_per_round": [round(r, 3) for r in ratios],
        "median_ratio": round(statistics.median(ratios), 3) if ratios else None,
        "cpu_us_per_request": cpu_us,
        "median_cpu_us": {k: statistics.median(v) for k, v in cpu_us.items() if v},
        "events_acked": acked,
    }


def demo_event(i: int, rng: np.random.Generator) -> ev.PredictionEvent:
    """An event as the demo model's pass-through requests make them (22 columns, 1 row)."""
    event = ev.PredictionEvent(
        event_id=f"bench-{i}",
        request_id=f"r{i}",
        event_time_us=time.time_ns() // 1000,
        route="fraud",
        model="fraud",
        version="2",
        arm="primary",
        rows=1,
    )
    event.features.numeric_names.extend(f"features[{j}]" for j in range(22))
    event.features.numbers = rng.normal(size=22).astype("<f8").tobytes()
    event.outputs.add(name="probability", values=np.array([0.1]).tobytes(), width=1)
    return event


async def _stream(address: str, batches: list[bytes], window: int) -> float:
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.stream_stream(
            "/gateway.v1.EvaluationService/Publish",
            request_serializer=None,
            response_deserializer=ev.Ack.FromString,
        )()
        acked = asyncio.Semaphore(window)
        started = time.perf_counter()

        async def send() -> None:
            for batch in batches:
                await acked.acquire()
                await call.write(batch)
            await call.done_writing()

        writer = asyncio.create_task(send())
        async for _ack in call:
            acked.release()
        await writer
        return time.perf_counter() - started


def ingestion(work: Path, events: int, batch: int) -> dict[str, object]:
    rng = np.random.default_rng(0)
    port = free_port()
    sidecar = SidecarProcess(work / "store-ingest", port, work / "logs")
    all_events = [demo_event(i, rng) for i in range(events)]
    batches = [
        ev.EventBatch(sequence=k + batch, events=all_events[k : k + batch]).SerializeToString()
        for k in range(0, events, batch)
    ]
    try:
        seconds = asyncio.run(_stream(sidecar.address, batches, window=32))
    finally:
        sidecar.stop()
    return {
        "events": events,
        "batch": batch,
        "seconds": round(seconds, 2),
        "events_per_s": round(events / seconds),
    }


def encoding(repo: Path, reps: int = 5, count: int = 5000) -> dict[str, object]:
    """In process: microseconds to encode one event, native encoder against the protobuf
    runtime (alternating, best of ``reps``), for the throughput part's event (the model's own
    input, 19 columns) and a raw-feature event under the demo contract (8 features)."""
    from gateway.events import _encoder
    from gateway.events.builder import Pending, encode_event_py
    from gateway.features import redact
    from gateway.features.contract import load_contract
    from gateway.types import InferRequest, InferResponse, RequestOptions, Tensor

    assert _encoder.USING_EXTENSION, "the native encoder is not built (make native)"
    native = _encoder.encode_event
    contract = load_contract(repo / "fraud", "v2")
    columns, _ = synthetic_transactions(1, seed=3)

    def first_row(name: str, kind: str) -> Tensor:
        if kind == "categorical":
            text = np.array([str(columns[name][0]).encode()], dtype=object)
            return Tensor(name, "BYTES", text)
        if kind == "int":
            return Tensor(name, "INT64", np.asarray(columns[name][:1], np.int64))
        return Tensor(name, "FP64", np.asarray(columns[name][:1], np.float64))

    raw = [first_row(f.name, f.kind) for f in contract.features]
    probability = [Tensor("probability", "FP32", np.full((1, 1), 0.25, np.float32))]
    answered = {"queue_us": 40, "compute_us": 25, "cost": 1e-6, "cached_rows": 0}
    cases = {
        "model input (19 columns)": Pending(
            request=InferRequest(
                "fraud", inputs=[Tensor("features", "FP32", np.ones((1, 19), "f4"))]
            ),
            response=InferResponse("fraud", "1", "", probability, dict(answered)),
            request_id="r1",
            coverage=None,
            event_time_us=time.time_ns() // 1000,
            total_ms=0.8,
            nbytes=76,
        ),
        "raw features (contract v2)": Pending(
            request=InferRequest(
                "fraud", inputs=raw, options=RequestOptions.parse({"segment.country": "DE"})
            ),
            response=InferResponse("fraud", "2", "", probability, dict(answered)),
            request_id="r2",
            coverage=contract.assemble(raw, "fraud", 1 << 20).coverage,
            event_time_us=time.time_ns() // 1000,
            total_ms=0.8,
            nbytes=76,
        ),
    }
    key = b"k" * 32
    out: dict[str, dict[str, float]] = {}
    for name, pending in cases.items():
        best = {"native": float("inf"), "protobuf": float("inf")}
        for _ in range(reps):
            for impl, encode in (("native", native), ("protobuf", encode_event_py)):
                started = time.perf_counter()
                for _ in range(count):
                    encode(pending, "e1", key, redact, 64)
                best[impl] = min(best[impl], (time.perf_counter() - started) / count * 1e6)
        out[name] = {k: round(v, 2) for k, v in best.items()}
        out[name]["speedup"] = round(best["protobuf"] / best["native"], 2)
    return {"us_per_event": out}


def time_to_alert(work: Path, repo: Path, chunk_rows: int, max_chunks: int) -> dict[str, object]:
    import tritonclient.grpc as triton_grpc

    from gateway.evaluation.client import fetch_report

    port = free_port()
    sidecar = SidecarProcess(work / "store-alert", port, work / "logs", "--repository", str(repo))
    events = ["--sidecar", f"127.0.0.1:{port}", "--events-dir", str(work / "events-alert")]
    gw = GatewayProcess(repo, work / "gw-alert", *events)
    client = gw.client()

    def send(columns: dict[str, np.ndarray], count: int) -> None:
        inputs = []
        for name, values in columns.items():
            array = values
            if values.dtype == object:
                array = np.array([str(v).encode() for v in values], dtype=object)
            datatype = (
                "BYTES" if array.dtype == object else triton_grpc.np_to_triton_dtype(array.dtype)
            )
            tensor = triton_grpc.InferInput(name, list(array.shape), datatype)
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        client.infer("fraud", inputs, model_version="2")
        deadline = time.monotonic() + 60
        while gw.metric("gateway_events_total", outcome="acked") < count:
            assert time.monotonic() < deadline
            time.sleep(0.02)

    try:
        sent = 0
        for i in range(10):  # 10 reference requests first: the window is not all shifted
            columns, _ = synthetic_transactions(chunk_rows, seed=500 + i)
            sent += 1
            send(columns, sent)
        for chunk in range(1, max_chunks + 1):
            columns, _ = synthetic_transactions(chunk_rows, seed=900 + chunk)
            columns["amount"] = columns["amount"] * 3
            sent += 1
            send(columns, sent)
            report = fetch_report(sidecar.address, "fraud")
            fired = [
                a
                for a in report["alerts"]
                if (a["rule"], a["feature"], a["segment"]) == ("feature_drift", "amount", "all")
            ]
            if fired:
                return {
                    "reference_rows": 10 * chunk_rows,
                    "shifted_rows_to_alert": chunk * chunk_rows,
                    "shifted_requests": chunk,
                    "psi": fired[0]["value"],
                    "shift": "amount x 3",
                    "rule": "psi > 0.2 over >= 200 rows",
                }
        return {"shifted_rows_to_alert": None, "note": f"no alert after {max_chunks} chunks"}
    finally:
        client.close()
        gw.stop(), sidecar.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--perf-analyzer")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ingest-events", type=int, default=100_000)
    parser.add_argument(
        "--parts",
        default="throughput,ingestion,encoding,time_to_alert",
        help="which measures to run",
    )
    parser.add_argument("--work", type=Path, default=ROOT / ".bench" / "events")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "events")
    args = parser.parse_args()
    parts = args.parts.split(",")
    pa = find_perf_analyzer(args.perf_analyzer) if "throughput" in parts else ""
    for stale in [*args.work.glob("store-*"), *args.work.glob("events-*")]:
        shutil.rmtree(stale)  # a store or log left by an earlier run would count its events
    repo = args.work / "repo"
    if not (repo / "fraud" / "reference.json").exists():
        build_demo_repository(repo)
    started = time.time()
    measures = {
        # The serving benchmark's repository: the demo model without its contract, so
        # perf_analyzer's random tensors are servable (the events carry its 22 columns).
        "throughput": lambda: throughput(
            pa, args.work, build_bench_repositories(ROOT / ".bench")["on"], args.rounds
        ),
        "ingestion": lambda: ingestion(args.work, args.ingest_events, 512),
        "encoding": lambda: encoding(repo),
        "time_to_alert": lambda: time_to_alert(args.work, repo, chunk_rows=20, max_chunks=50),
    }
    results: dict[str, Any] = {part: measures[part]() for part in parts}
    meta = run_meta(started)
    results = save_parts(args.out, meta, results)
    md = ["# Event streaming benchmark", "", f"`{json.dumps(meta)}`", ""]
    md += ["| measure | value |", "| --- | --- |"]
    if t := results.get("throughput"):
        md += [
            f"| gateway infer/s, events on (per round) | {t['infer_per_s']['events on']} |",
            f"| gateway infer/s, events off (per round) | {t['infer_per_s']['events off']} |",
            f"| on / off, per round | {t['ratio_per_round']} (median {t['median_ratio']}) |",
            "| CPU per request (us): gateway events on, off; sidecar per event (median) | "
            f"{t.get('cpu_us_per_request')} ({t.get('median_cpu_us')}) |",
        ]
    if i := results.get("ingestion"):
        batches = f"({i['events']} events, batches of {i['batch']})"
        md.append(f"| sidecar ingestion | {i['events_per_s']} events/s {batches} |")
    for case, e in (results.get("encoding") or {}).get("us_per_event", {}).items():
        speeds = f"native {e['native']}, protobuf {e['protobuf']} ({e['speedup']}x)"
        md.append(f"| event encoding, {case}: us per event | {speeds} |")
    if a := results.get("time_to_alert"):
        md.append(
            f"| shifted rows until the drift alert | {a.get('shifted_rows_to_alert')} "
            f"({a.get('shift')}, after {a.get('reference_rows')} reference rows) |"
        )
    args.out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
