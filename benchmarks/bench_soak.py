"""Soak: the gateway with every feature on, events streamed to its sidecar, under sustained
streaming load; the resident memory of both processes over time.

    .venv/bin/python benchmarks/bench_soak.py                       # 240 s at concurrency 128
    .venv/bin/python benchmarks/bench_soak.py --seconds 600 --label long
    .venv/bin/python benchmarks/bench_soak.py --sidecar-setting max_pending_events=4096

The gateway is bench_transport's ``features-<transport>`` server: a route splitting 90/10
between two versions of an MLP, a 32-feature contract, the response cache, a rate limit, a
budget, and prediction events streamed to a live ``gateway sidecar`` (its own process, its
own DuckDB file, settings from ``--sidecar-setting`` as ``GATEWAY_EVALUATION__*``).

The client is this process: ``--streams`` ModelStreamInfer streams over one channel, each
keeping its share of ``--concurrency`` requests in flight (a new one written as each answer
comes back), sending pre-encoded request bytes from a pool of ``--rows`` rows (about 40% a
few hot rows, the rest one-off: bench_transport's mix). Raw bytes both ways keep the client's
own CPU small on a two-core machine (it is reported).

Every ``--sample-s`` seconds: VmRSS of the gateway and the sidecar (/proc/PID/status), the
answers so far, the events the sidecar stored and the events waiting in the gateway's log.
After the load stops, the sidecar is given ``--drain-s`` to store what the log still holds.
Each run is one part of ``benchmarks/results/soak.{json,md}`` (``--label``, default
``soak``); a run of one label keeps the others.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_serving import cpu_seconds, run_meta, save_parts  # noqa: E402
from benchmarks.bench_transport import (  # noqa: E402
    GATEWAY_READY,
    SIDECAR_READY,
    Proc,
    build_repositories,
    feature_rows,
    feature_settings,
    index_contract,
    metric,
    scrape,
    started,
)
from gateway.api.v1 import inference_pb2 as pb  # noqa: E402

STREAM_METHOD = "/inference.GRPCInferenceService/ModelStreamInfer"
MODEL = "live"
# Contract kinds -> the datatype a named raw feature is sent as (one value per request).
DATATYPES = {"float": "FP32", "int": "INT64", "bool": "BOOL", "categorical": "BYTES"}
NUMPY = {"FP32": np.float32, "INT64": np.int64, "BOOL": np.bool_}
_ERROR_FIELD = b"\x0a"  # ModelStreamInferResponse.error_message (field 1, bytes)


def encode_requests(rows: list[dict[str, list[Any]]]) -> list[bytes]:
    """Each row as ModelInferRequest bytes: one named input per feature, raw contents."""
    kinds = {f["name"]: f["kind"] for f in index_contract()["versions"]["v1"]["features"]}
    out = []
    for i, row in enumerate(rows):
        request = pb.ModelInferRequest(model_name=MODEL, id=f"soak-{i}")
        for name, values in row.items():
            datatype = DATATYPES[kinds[name]]
            request.inputs.add(name=name, datatype=datatype, shape=[len(values)])
            if datatype == "BYTES":
                raw = b"".join(
                    len(v.encode()).to_bytes(4, "little") + v.encode() for v in map(str, values)
                )
            else:
                raw = np.asarray(values, dtype=NUMPY[datatype]).tobytes()
            request.raw_input_contents.append(raw)
        out.append(request.SerializeToString())
    return out


def rss_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process in KiB, from /proc/PID/status; (0, 0) once it is gone."""
    found = {"VmRSS:": 0, "VmHWM:": 0}
    with contextlib.suppress(FileNotFoundError, ProcessLookupError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, *value = line.split()
            if key in found:
                found[key] = int(value[0])
    return found["VmRSS:"], found["VmHWM:"]


class Load:
    """Streams at a fixed number of requests in flight; counts answers and errors."""

    def __init__(self, url: str, payloads: list[bytes], streams: int, in_flight: int) -> None:
        self.url = url
        self.payloads = payloads
        self.streams = streams
        self.per_stream = max(1, in_flight // streams)
        self.answered = 0
        self.errors = 0
        self.first_error = ""
        self.stop = asyncio.Event()

    async def run(self) -> None:
        options = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
        async with (
            grpc.aio.insecure_channel(self.url, options=options) as channel,
            asyncio.TaskGroup() as group,
        ):
            for s in range(self.streams):
                group.create_task(self._stream(channel, s))

    async def _stream(self, channel: grpc.aio.Channel, index: int) -> None:
        call = channel.stream_stream(
            STREAM_METHOD, request_serializer=None, response_deserializer=None
        )()
        payloads, n = self.payloads, len(self.payloads)
        sent = index * 7919  # each stream starts elsewhere in the pool
        for _ in range(self.per_stream):
            await call.write(payloads[sent % n])
            sent += 1
        outstanding = self.per_stream
        while outstanding:
            reply = await call.read()
            if reply is grpc.aio.EOF:
                raise RuntimeError(f"stream {index} ended early: {await call.details()}")
            outstanding -= 1
            self.answered += 1
            if reply[:1] == _ERROR_FIELD:
                self.errors += 1
                self.first_error = (
                    self.first_error or pb.ModelStreamInferResponse.FromString(reply).error_message
                )
            if not self.stop.is_set():
                await call.write(payloads[sent % n])
                sent += 1
                outstanding += 1
        await call.done_writing()


async def soak(
    gateway: Proc,
    gateway_metrics: str,
    sidecar: Proc,
    sidecar_metrics: str,
    url: str,
    payloads: list[bytes],
    args: argparse.Namespace,
) -> dict[str, Any]:
    load = Load(url, payloads, args.streams, args.concurrency)
    samples: list[dict[str, Any]] = []
    start = time.monotonic()
    client_cpu = cpu_seconds(os.getpid())
    gateway_cpu, sidecar_cpu = gateway.cpu_seconds(), sidecar.cpu_seconds()

    def sample(phase: str) -> dict[str, Any]:
        gw, side = scrape(gateway_metrics), scrape(sidecar_metrics)
        (gw_rss, gw_peak), (sc_rss, sc_peak) = (
            rss_kib(gateway.process.pid),
            rss_kib(sidecar.process.pid),
        )
        row = {
            "t_s": round(time.monotonic() - start, 1),
            "phase": phase,
            "gateway_rss_mb": round(gw_rss / 1024, 1),
            "gateway_peak_mb": round(gw_peak / 1024, 1),
            "sidecar_rss_mb": round(sc_rss / 1024, 1),
            "sidecar_peak_mb": round(sc_peak / 1024, 1),
            "answered": load.answered,
            "events_stored": int(metric(side, "sidecar_events_total", outcome="stored")),
            "events_backlog": int(metric(gw, "gateway_events_backlog")),
        }
        # The sidecar's own gauges, where it has them (not before the memory bound).
        for name, key, scale in (
            ("sidecar_pending_events", "sidecar_pending_events", 1),
            ("sidecar_store_memory_bytes", "duckdb_mb", 1 / 2**20),
        ):
            values = [v for (n, _), v in side.items() if n == name]
            if values:
                row[key] = round(values[0] * scale, 1) if scale != 1 else int(values[0])
        samples.append(row)
        print(json.dumps(row), flush=True)
        return row

    sample("start")
    runner = asyncio.get_running_loop().create_task(load.run())
    deadline = start + args.seconds
    while time.monotonic() < deadline and not runner.done():
        await asyncio.wait({runner}, timeout=min(args.sample_s, deadline - time.monotonic()))
        if not runner.done():
            sample("load")
    load.stop.set()
    await runner  # raises the client's error, if any
    loaded_s = time.monotonic() - start
    client_cpu = cpu_seconds(os.getpid()) - client_cpu
    gateway_cpu, sidecar_cpu = (
        gateway.cpu_seconds() - gateway_cpu,
        sidecar.cpu_seconds() - sidecar_cpu,
    )
    end = sample("stopped")
    drain_deadline = time.monotonic() + args.drain_s
    while end["events_backlog"] > 0 and time.monotonic() < drain_deadline:
        await asyncio.sleep(args.sample_s)
        end = sample("drain")
    load_rows = [s for s in samples if s["phase"] in ("load", "stopped")]
    return {
        "seconds": round(loaded_s, 1),
        "concurrency": args.streams * load.per_stream,
        "streams": args.streams,
        "answered": load.answered,
        "errors": load.errors,
        "first_error": load.first_error,
        "infer_per_s": round(load.answered / loaded_s),
        "events_stored": end["events_stored"],
        "events_backlog_at_end": end["events_backlog"],
        "cpu_us_per_request": {
            "gateway": round(gateway_cpu / max(load.answered, 1) * 1e6),
            "sidecar": round(sidecar_cpu / max(load.answered, 1) * 1e6),
            "client": round(client_cpu / max(load.answered, 1) * 1e6),
        },
        "gateway_rss_mb": _spread([s["gateway_rss_mb"] for s in load_rows]),
        "sidecar_rss_mb": _spread([s["sidecar_rss_mb"] for s in load_rows]),
        "gateway_peak_mb": max(s["gateway_peak_mb"] for s in samples),
        "sidecar_peak_mb": max(s["sidecar_peak_mb"] for s in samples),
        "samples": samples,
    }


def _spread(values: list[float]) -> dict[str, float]:
    return {
        "first": values[0],
        "median": statistics.median(values),
        "max": max(values),
        "last": values[-1],
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    args.work.mkdir(parents=True, exist_ok=True)
    repos = build_repositories(args.work)
    payloads = encode_requests(feature_rows(args.rows, args.hot_share))
    store, events = args.work / f"store-{args.label}", args.work / f"events-{args.label}"
    for stale in (store, events):
        shutil.rmtree(stale, ignore_errors=True)
    sidecar_env = {"GATEWAY_EVALUATION__METRICS_PORT": "0"}
    for setting in args.sidecar_setting:
        key, _, value = setting.partition("=")
        sidecar_env[f"GATEWAY_EVALUATION__{key.upper()}"] = value
    config = args.work / f"soak-{args.transport}.yaml"
    config.write_text(yaml.safe_dump(feature_settings()))
    logs = args.work / "logs"
    with ExitStack() as stack:
        command = [sys.executable, "-m", "gateway", "sidecar", "--store", str(store)]
        sidecar, ready = stack.enter_context(
            started(
                "sidecar",
                [*command, "--port", "0"],
                logs / f"sidecar-{args.label}.log",
                SIDECAR_READY,
                sidecar_env,
            )
        )
        sidecar_address, sidecar_metrics = ready.group(1), ready.group(2)
        command = [sys.executable, "-m", "gateway", "serve", "--repository"]
        command += [str(repos["features"]), "--port", "0", "--metrics-port", "0"]
        command += ["--transport", args.transport, "--config", str(config)]
        command += ["--sidecar", sidecar_address, "--events-dir", str(events)]
        gateway, ready = stack.enter_context(
            started(
                "gateway",
                command,
                logs / f"gateway-{args.label}.log",
                GATEWAY_READY,
                {"TMPDIR": str(args.work)},
            )
        )
        result = asyncio.run(
            soak(gateway, ready.group(2), sidecar, sidecar_metrics, ready.group(1), payloads, args)
        )
    result["transport"] = args.transport
    result["sidecar_settings"] = args.sidecar_setting
    return result


def write_markdown(out: Path, meta: dict[str, Any], parts: dict[str, Any]) -> None:
    lines = [
        "# Soak: gateway and sidecar memory under sustained streaming load",
        "",
        f"{meta['machine']}, Python {meta['python']}. The gateway with every feature on "
        "(bench_transport's features server) streams its prediction events to a live sidecar; "
        "the client keeps the stated number of ModelStreamInfer requests in flight for the "
        "whole run. RSS is VmRSS from /proc/PID/status, sampled while the load runs; peak is "
        "VmHWM.",
        "",
        "| run | command | s | infer/s | errors | events stored | backlog at end | gateway RSS "
        "MB first / median / max / last | sidecar RSS MB first / median / max / last | peak MB "
        "gateway / sidecar | CPU us/request gateway / sidecar / client |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | --- | --- | --- |",
    ]
    for label, part in parts.items():
        g, s, cpu = part["gateway_rss_mb"], part["sidecar_rss_mb"], part["cpu_us_per_request"]
        lines.append(
            f"| {label} | `{part['command']}` | {part['seconds']} | {part['infer_per_s']:,} | "
            f"{part['errors']} | {part['events_stored']:,} | {part['events_backlog_at_end']:,} | "
            f"{g['first']} / {g['median']} / {g['max']} / {g['last']} | "
            f"{s['first']} / {s['median']} / {s['max']} / {s['last']} | "
            f"{part['gateway_peak_mb']} / {part['sidecar_peak_mb']} | "
            f"{cpu['gateway']} / {cpu['sidecar']} / {cpu['client']} |"
        )
    for label, part in parts.items():
        settings = ", ".join(part["sidecar_settings"]) or "defaults"
        lines += [
            "",
            f"## {label}",
            "",
            f"Transport {part['transport']}, concurrency {part['concurrency']} over "
            f"{part['streams']} streams, sidecar settings: {settings}.",
            "",
            "| t s | phase | gateway RSS MB | sidecar RSS MB | sidecar peak MB | answered | "
            "events stored | gateway log backlog | sidecar pending | DuckDB MB |",
            "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        lines += [
            f"| {r['t_s']} | {r['phase']} | {r['gateway_rss_mb']} | {r['sidecar_rss_mb']} | "
            f"{r['sidecar_peak_mb']} | {r['answered']:,} | {r['events_stored']:,} | "
            f"{r['events_backlog']:,} | {r.get('sidecar_pending_events', '-')} | "
            f"{r.get('duckdb_mb', '-')} |"
            for r in part["samples"]
        ]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=240.0, help="how long the load runs")
    parser.add_argument("--concurrency", type=int, default=128, help="requests in flight")
    parser.add_argument("--streams", type=int, default=4, help="streams sharing them")
    parser.add_argument("--sample-s", type=float, default=5.0, help="sampling interval")
    parser.add_argument("--drain-s", type=float, default=60.0, help="wait for the log to drain")
    parser.add_argument("--transport", choices=("native", "grpcio"), default="native")
    parser.add_argument("--rows", type=int, default=20_000, help="distinct request rows")
    parser.add_argument("--hot-share", type=float, default=0.4)
    parser.add_argument(
        "--sidecar-setting",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an evaluation setting for the sidecar (repeatable)",
    )
    parser.add_argument("--label", default="soak", help="this run's part of the results")
    parser.add_argument("--work", type=Path, default=ROOT / ".bench" / "soak")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "soak")
    args = parser.parse_args()
    started_at = time.time()
    result = run(args)
    meta = run_meta(started_at)
    parts = save_parts(args.out, meta, {args.label: result})
    write_markdown(args.out, meta, parts)
    print(f"wrote {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
