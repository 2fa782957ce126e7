"""Transport benchmark: the gateway on its two gRPC transports against the echo floor of each.

    .venv/bin/python benchmarks/bench_transport.py          # the whole run (~10-12 min)
    .venv/bin/python benchmarks/bench_transport.py --peers  # + PyTriton, MLServer (~+4 min)
    .venv/bin/python benchmarks/bench_transport.py --rounds 1 --interval-ms 1000 \\
        --servers echo-native,passthrough-native --concurrency 64 --modes unary --out /tmp/t

Servers (``--servers``, all by default), every one started by this script on 127.0.0.1:

* ``echo-native`` / ``echo-grpcio``: benchmarks/baselines.py ``echo`` (no model, zeros of the
  output's shape) on ``pygrpc_native.aio.server()`` / ``grpc.aio.server()``: the floor of a
  Python gRPC server on each transport.
* ``passthrough-<t>``: ``gateway serve --transport <t>`` serving the MLP 32 -> 256 -> 256 -> 1
  (FP32, benchmarks/models.py ``write_mlp``; ``max_batch_size`` 1024, 2 instances, dynamic
  batching with the config's defaults) and nothing else: no route, no contract, no cache, no
  ledger, no events.
* ``features-<t>``: the same gateway with every feature on: a route ``live`` splitting 90/10
  between two versions of that MLP (stable / canary arm, each priced), a 32-feature contract
  (24 numeric, 8 categorical, index-encoded: width 32) that every request's named raw features
  are assembled through, the response cache, a per-tenant rate limit far above the load, a
  budget (ledger on), and prediction events streamed to a live evaluation sidecar (``gateway
  sidecar``, one per gateway, its own process).
* ``pytriton`` / ``mlserver`` (``--peers``; benchmarks/peers/): the same MLP with dynamic /
  adaptive batching, each run only where its package imports (in this interpreter, or in
  ``.bench/peers/<peer>-venv``), skipped with a note otherwise. MLServer's streaming cells are
  skipped (its ModelStreamInfer serves only models that stream their own output).

Cells: perf_analyzer ``-b 1`` at concurrency 1 and 64, unary and ``--streaming``; each cell is
bounded (three windows of ``--interval-ms``: the stability check is off unless
``--stability`` tightens it). ``features-*`` cells send rows from an ``--input-data`` file of
3,000 rows of which ~40% are one of 16 hot rows and the rest one-off; the cache is bounded to
~500 rows (``cache.max_bytes``), so a one-off row is evicted before the file comes round again
and a hot row is not: the hit rate is about the hot share at any speed (reported per cell).
Echo and passthrough cells send perf_analyzer's random tensors.

On a small machine the load generator is a large part of the load: perf_analyzer spends about
300-350 us of CPU per every-feature request (32 named inputs from the file, a thread per
concurrent request in its synchronous mode), about what the gateway does, and with 64 of its
threads runnable the scheduler shares the cores among them and the server's event loop. Its
CPU per request is reported per cell (``client``). The targets add the bound this puts on the
every-feature ratio: what a gateway costing no CPU at all would reach here (the echo cell's
client + server CPU per request over the features cell's client + sidecar CPU per request).
``--server-cpus`` / ``--client-cpus`` pin the servers (with their sidecars) and perf_analyzer
to separate CPUs (``taskset -c``), so a cell measures what the server does on the CPUs it has
rather than how the scheduler shares them with its client.

Rounds (``--rounds``, default 2) alternate: in round r every cell is measured on every server,
back to back, in an order rotated by r (this machine is noisy: compare within a round).

Per server and cell: throughput (infer/s), p50 and p99 latency, the server's CPU microseconds
per request (the process group's CPU from /proc from the cell's first answered requests to
the end of the perf_analyzer run, over the requests it answered meanwhile: the gateway's
``gateway_requests_total``, a baseline's ModelStatistics), the client's (perf_analyzer's own
CPU over the same span and requests: not the ~12 s it spends reading the features' input
data before it sends anything), for
``features-*`` the sidecar's CPU microseconds per event (its CPU from the cell's start until
the gateway's events are acknowledged, over ``sidecar_events_total{outcome="stored"}``) and
the share of rows the cache answered; and which transport actually served (a ``-native``
server runs Rust threads named ``grpc-native-io``; the gateway's log line about its transport
is kept too). Then the issue's targets, from per-round ratios: passthrough-native /
echo-native at c=64 unary (>= 0.6), features-native / echo-native at c=64 unary (>= 0.4, p99 <
30 ms), c=1 unary p50 of passthrough-native (< 0.5 ms) and features-native (< 0.8 ms), and
streaming c=64 of features on each transport. Medians over rounds, with the range.
Results: benchmarks/results/transport.{json,md}.

perf_analyzer comes from ``--perf-analyzer``, ``PERF_ANALYZER``, the PATH or
``../shared/tools/install-perf-analyzer`` (benchmarks.bench_serving.find_perf_analyzer).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_serving import cpu_seconds, find_perf_analyzer, run_meta  # noqa: E402
from benchmarks.models import feature_contract, write_mlp  # noqa: E402

TRANSPORTS = ("native", "grpcio")
SERVERS = [f"{kind}-{t}" for kind in ("echo", "passthrough", "features") for t in TRANSPORTS]
PEERS = ("pytriton", "mlserver")
PEER_TRANSPORT = {"pytriton": "Triton (C++ gRPC)", "mlserver": "MLServer (grpc.aio)"}
PEER_UNSUPPORTED = {
    # Its ModelStreamInfer streams only from a model's predict_stream: perf_analyzer's streaming
    # requests fail ("Thread [0] had error") and at concurrency 64 it hangs.
    "mlserver": {"streaming": "MLServer's ModelStreamInfer does not serve predict() models"}
}
PRICE = {"compute_second": 0.0001, "request": 0.000001}
HOT_ROWS = 16
CACHE_ROWS = 500  # rows the features gateway's cache holds (see the module docstring)
CACHE_ENTRY_BYTES = 32 * 4 + 160 + 4  # assembled row + the cache's overhead + the output
NATIVE_THREAD = "grpc-native-io"  # pygrpc-native's I/O threads
TRANSPORT_LOG = re.compile(r"transport\W{0,3}(native|grpcio)", re.IGNORECASE)
GATEWAY_READY = re.compile(r"gateway ready grpc=(\S+) metrics=(\S+)")
SIDECAR_READY = re.compile(r"sidecar ready grpc=(\S+) metrics=(\S+)")
BASELINE_READY = re.compile(r"ready grpc=(\S+)")


# --- processes -------------------------------------------------------------------------------


def _stat(pid: str | int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except (FileNotFoundError, ProcessLookupError):
        return None


def group_cpu_seconds(pgid: int) -> float:
    """CPU time so far (user + system) of every live process in process group ``pgid``: the
    server and whatever it started (PyTriton's tritonserver and model proxies)."""
    ticks = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _stat(entry)) and int(fields[2]) == pgid:
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def _group_alive(pgid: int) -> list[int]:
    return [
        int(e)
        for e in os.listdir("/proc")
        if e.isdigit() and (f := _stat(e)) and int(f[2]) == pgid and f[0] not in "ZXx"
    ]


@dataclass
class Proc:
    """A child in a process group of its own (so that what it starts is stopped with it)."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path

    def cpu_seconds(self) -> float:
        return group_cpu_seconds(self.process.pid)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def native_threads(self) -> int:
        """Threads of the group named like pygrpc-native's I/O threads."""
        count = 0
        for pid in _group_alive(self.process.pid):
            for comm in Path(f"/proc/{pid}/task").glob("*/comm"):
                with_name = comm.read_text().strip() if comm.exists() else ""
                count += with_name == NATIVE_THREAD
        return count

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM, SIGKILL after ``timeout_s``; then SIGKILL whatever is left in its group."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if not _group_alive(self.process.pid):
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 10
        while left := _group_alive(self.process.pid):
            if time.monotonic() > deadline:
                print(f"note: {self.name}: pids {left} survived SIGKILL", file=sys.stderr)
                return
            time.sleep(0.05)


@contextmanager
def started(
    name: str,
    command: list[str],
    log: Path,
    ready: re.Pattern[str],
    env: dict[str, str] | None = None,
    timeout_s: float = 180,
    cpus: str | None = None,
) -> Iterator[tuple[Proc, re.Match[str]]]:
    """Start ``command`` (its output to ``log``; on ``cpus`` when given), wait for ``ready`` in
    the log; stop it after."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as out:
        process = subprocess.Popen(
            pinned(command, cpus),
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
    proc = Proc(name, process, log)
    try:
        deadline = time.monotonic() + timeout_s
        while not (match := ready.search(proc.text())):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start:\n{proc.text()[-3000:]}")
            time.sleep(0.1)
        yield proc, match
    finally:
        proc.stop()


def pinned(command: list[str], cpus: str | None) -> list[str]:
    """``command`` run on ``cpus`` only (a taskset list such as ``0`` or ``2-3``)."""
    return ["taskset", "-c", cpus, *command] if cpus else command


def scrape(address: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def metric(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str):
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


def model_statistics(url: str, model: str) -> float | None:
    """Requests ``model`` answered so far, from its ModelStatistics (None: not served)."""
    import grpc

    from gateway.api.v1 import inference_pb2 as pb
    from gateway.api.v1 import inference_pb2_grpc as pb_grpc

    try:
        with grpc.insecure_channel(url) as channel:
            reply = pb_grpc.GRPCInferenceServiceStub(channel).ModelStatistics(
                pb.ModelStatisticsRequest(name=model), timeout=10
            )
    except grpc.RpcError:
        return None
    return float(sum(s.inference_stats.success.count for s in reply.model_stats))


# --- servers ---------------------------------------------------------------------------------


@dataclass
class Target:
    """A server under test: where perf_analyzer calls it, and how to read what it did."""

    name: str
    proc: Proc
    url: str
    model: str
    data: Path | None = None  # perf_analyzer --input-data
    metrics_url: str | None = None  # the gateway's Prometheus endpoint
    sidecar: Proc | None = None
    sidecar_metrics: str | None = None
    transport_log: str = ""
    counters: Callable[[], dict[str, float]] = field(default=lambda: {})

    def requests(self) -> float | None:
        if self.metrics_url is not None:
            samples = scrape(self.metrics_url)
            return metric(samples, "gateway_requests_total", rpc="ModelInfer") + metric(
                samples, "gateway_requests_total", rpc="ModelStreamInfer"
            )
        return model_statistics(self.url, self.model)


def _mlp_config(**extra: object) -> dict[str, object]:
    return {"max_batch_size": 1024, "instances": 2, "dynamic_batching": {}, **extra}


def index_contract() -> dict[str, Any]:
    """The bench contract (benchmarks/models.py) with every categorical index-encoded: 32
    features, a 32-wide matrix, the MLP's input."""
    contract = feature_contract()
    for feature in contract["versions"]["v1"]["features"]:  # type: ignore[index]
        if feature["kind"] == "categorical":
            feature["encoding"] = "index"
    return contract


def build_repositories(work: Path) -> dict[str, Path]:
    """``passthrough``: the MLP alone; ``features``: two versions of it under the contract."""
    plain, featured = work / "repo-passthrough", work / "repo-features"
    if not (plain / "mlp" / "config.yaml").exists():
        write_mlp(plain / "mlp")
        (plain / "mlp" / "config.yaml").write_text(yaml.safe_dump(_mlp_config()))
    if not (featured / "mlp_features" / "config.yaml").exists():
        model = featured / "mlp_features"
        for version in (1, 2):
            write_mlp(model, name="mlp_features", version=version, seed=version)
        (model / "features.yaml").write_text(yaml.safe_dump(index_contract(), sort_keys=False))
        config = _mlp_config(version_policy={"all": True}, deterministic=True, price=PRICE)
        (model / "config.yaml").write_text(yaml.safe_dump(config))
    return {"passthrough": plain, "features": featured}


def feature_settings() -> dict[str, object]:
    variant = {"model": "mlp_features", "deterministic": True, "price": PRICE}
    return {
        "routing": {
            "routes": {
                "live": {
                    "variants": [
                        {"name": "stable", "version": "1", "weight": 90, **variant},
                        {"name": "canary", "version": "2", "weight": 10, "arm": "canary"} | variant,
                    ]
                }
            },
            "rate_limits": {"*": {"rate": 1e9, "burst": 1_000_000_000}},
        },
        "cache": {"enabled": True, "max_bytes": CACHE_ROWS * CACHE_ENTRY_BYTES},
        "costs": {"budgets": [{"name": "all", "tenant": "", "limit": 1e12, "policy": "alert"}]},
    }


PASSTHROUGH_SETTINGS: dict[str, object] = {"cache": {"enabled": False}, "costs": {"enabled": False}}


def feature_rows(rows: int, hot_share: float, seed: int = 0) -> list[dict[str, list[Any]]]:
    """perf_analyzer steps of named raw features (valid under the contract): ``hot_share`` of
    them one of ``HOT_ROWS`` rows, the rest each seen once."""
    rng = np.random.default_rng(seed)
    features = index_contract()["versions"]["v1"]["features"]

    def row() -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {}
        for i, f in enumerate(features):
            if f["kind"] == "categorical":
                out[f["name"]] = [str(f["vocabulary"][rng.integers(len(f["vocabulary"]))])]
            elif f["kind"] == "int":
                out[f["name"]] = [int(rng.integers(0, 100))]
            elif f["kind"] == "bool":
                out[f["name"]] = [bool(rng.random() < 0.5)]
            elif i % 4 == 0:
                out[f["name"]] = [round(float(rng.lognormal(2.0, 1.0)), 4)]
            else:
                out[f["name"]] = [round(float(rng.normal(0, 2)), 4)]
        return out

    hot = [row() for _ in range(HOT_ROWS)]
    return [hot[rng.integers(HOT_ROWS)] if rng.random() < hot_share else row() for _ in range(rows)]


def transport_line(text: str) -> str:
    """The gateway's first log line naming its transport ('' when it names none)."""
    for line in text.splitlines():
        if TRANSPORT_LOG.search(line):
            return line.strip()[-200:]
    return ""


def _gateway(
    stack: ExitStack,
    name: str,
    repo: Path,
    settings: dict[str, object],
    work: Path,
    extra: list[str],
    cpus: str | None,
) -> tuple[Proc, str, str]:
    transport = name.rsplit("-", 1)[1]
    config = work / f"{name}.yaml"
    config.write_text(yaml.safe_dump(settings))
    command = [sys.executable, "-m", "gateway", "serve", "--repository", str(repo)]
    command += ["--port", "0", "--metrics-port", "0", "--transport", transport]
    command += ["--config", str(config), *extra]
    proc, ready = stack.enter_context(
        started(
            name,
            command,
            work / "logs" / f"{name}.log",
            GATEWAY_READY,
            {"TMPDIR": str(work)},
            cpus=cpus,
        )
    )
    return proc, ready.group(1), ready.group(2)


def start_target(
    stack: ExitStack,
    name: str,
    repos: dict[str, Path],
    work: Path,
    data: Path,
    cpus: str | None = None,
) -> Target:
    if name.startswith("echo-"):
        transport = name.split("-", 1)[1]
        command = [sys.executable, str(ROOT / "benchmarks" / "baselines.py"), "echo"]
        command += ["--model", str(repos["passthrough"] / "mlp" / "1" / "model.onnx")]
        command += ["--name", "mlp", "--transport", transport]
        proc, ready = stack.enter_context(
            started(name, command, work / "logs" / f"{name}.log", BASELINE_READY, cpus=cpus)
        )
        return Target(name, proc, ready.group(1), "mlp", transport_log=f"baseline {transport}")
    if name.startswith("passthrough-"):
        proc, url, metrics = _gateway(
            stack, name, repos["passthrough"], PASSTHROUGH_SETTINGS, work, [], cpus
        )
        return Target(
            name, proc, url, "mlp", metrics_url=metrics, transport_log=transport_line(proc.text())
        )
    if name.startswith("features-"):
        store, events = work / f"store-{name}", work / f"events-{name}"
        for stale in (store, events):
            shutil.rmtree(stale, ignore_errors=True)  # their events would count
        sidecar_config = work / f"sidecar-{name}.yaml"
        sidecar_config.write_text(yaml.safe_dump({"evaluation": {"metrics_port": 0}}))
        command = [sys.executable, "-m", "gateway", "sidecar", "--store", str(store)]
        command += ["--port", "0", "--config", str(sidecar_config)]
        sidecar, ready = stack.enter_context(
            started(
                f"sidecar-{name}",
                command,
                work / "logs" / f"sidecar-{name}.log",
                SIDECAR_READY,
                cpus=cpus,
            )
        )
        proc, url, metrics = _gateway(
            stack,
            name,
            repos["features"],
            feature_settings(),
            work,
            ["--sidecar", ready.group(1), "--events-dir", str(events)],
            cpus,
        )
        target = Target(
            name,
            proc,
            url,
            "live",
            data=data,
            metrics_url=metrics,
            sidecar=sidecar,
            sidecar_metrics=ready.group(2),
            transport_log=transport_line(proc.text()),
        )
        return target
    from benchmarks.peers import peer_command

    model = repos["passthrough"] / "mlp" / "1" / "model.onnx"
    command = peer_command(name, model, model_config(model, work / "mlp-config.pb"))
    proc, ready = stack.enter_context(
        started(
            name, command, work / "logs" / f"{name}.log", BASELINE_READY, timeout_s=300, cpus=cpus
        )
    )
    return Target(name, proc, ready.group(1), "mlp", transport_log=name)


def model_config(model: Path, out: Path) -> Path:
    """A serialized ModelConfigResponse for the MLP, for a peer without a ModelConfig RPC."""
    import onnx

    from gateway.api.v1 import inference_pb2 as pb
    from gateway.api.v1 import model_config_pb2 as mc

    graph = onnx.load(str(model)).graph

    def dims(value: Any) -> list[int]:
        return [d.dim_value for d in value.type.tensor_type.shape.dim][1:]

    config = mc.ModelConfig(
        name="mlp",
        platform="onnxruntime_onnx",
        max_batch_size=1024,
        input=[
            mc.ModelInput(name=i.name, data_type=mc.TYPE_FP32, dims=dims(i)) for i in graph.input
        ],
        output=[
            mc.ModelOutput(name=o.name, data_type=mc.TYPE_FP32, dims=dims(o)) for o in graph.output
        ],
    )
    out.write_bytes(pb.ModelConfigResponse(config=config).SerializeToString())
    return out


def peer_available(name: str) -> str | None:
    """Why peer ``name`` cannot run here (None: it can)."""
    from benchmarks.peers import peer_python

    python = peer_python(name)
    if python is None:
        return f"{name}: its package imports neither here nor in .bench/peers/{name}-venv"
    return None


# --- measuring -------------------------------------------------------------------------------


def perf_analyzer(
    pa: str, target: Target, concurrency: int, streaming: bool, args: argparse.Namespace
) -> dict[str, Any] | str:
    """One cell; a window that stalls (perf_analyzer: no stable measurement) is retried once
    with windows twice as long."""
    result = _perf_analyzer_once(pa, target, concurrency, streaming, args, args.interval_ms)
    if isinstance(result, str) and "stable" in result:
        result = _perf_analyzer_once(pa, target, concurrency, streaming, args, 2 * args.interval_ms)
    return result


@dataclass
class LoadStart:
    """What a cell's counters read when its first requests were answered: its CPU per request
    counts from here. perf_analyzer reads its ``--input-data`` file before it sends anything
    (about 12 s of its CPU for the features file, longer than a cell's load): counted from its
    start, that reading would be charged to the requests as client CPU."""

    served: float
    client_cpu_s: float
    server_cpu_s: float
    at: float


def _load_start(
    target: Target, process: subprocess.Popen[str], before: float | None, deadline: float
) -> LoadStart | None:
    """Poll the target's count of answered requests until it moves (None: no counter, or
    perf_analyzer ended or ran out of time first)."""
    if before is None:
        return None
    while process.poll() is None and time.monotonic() < deadline:
        served = target.requests()
        if served is not None and served > before:
            # NOTE: perf_analyzer is not reaped until polled again: its /proc entry is there
            client = cpu_seconds(process.pid)
            return LoadStart(served, client, target.proc.cpu_seconds(), time.monotonic())
        time.sleep(0.05)
    return None


def _perf_analyzer_once(
    pa: str,
    target: Target,
    concurrency: int,
    streaming: bool,
    args: argparse.Namespace,
    interval_ms: int,
) -> dict[str, Any] | str:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "pa.csv"
        command = [pa, "-m", target.model, "-i", "grpc", "-u", target.url, "-b", "1"]
        command += ["--concurrency-range", str(concurrency)]
        command += ["--measurement-interval", str(interval_ms)]
        command += ["--stability-percentage", str(args.stability), "--max-trials", "3"]
        command += ["--percentile", "99", "-f", str(out)]
        if target.data is not None:
            command += ["--input-data", str(target.data)]
        if streaming:
            command.append("--streaming")
        # Reading the data, three windows and the warm-up take a few intervals; past this
        # perf_analyzer hangs.
        timeout_s = 30 + 10 * interval_ms / 1000
        served = target.requests()
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        deadline = time.monotonic() + timeout_s
        process = subprocess.Popen(
            pinned(command, args.client_cpus),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        start = _load_start(target, process, served, deadline)
        try:
            output, _ = process.communicate(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            return f"perf_analyzer hung (killed after {timeout_s:.0f} s)"
        if process.returncode != 0 or not out.exists():
            lines = output.strip().splitlines()
            return lines[-1] if lines else f"perf_analyzer exited {process.returncode}"
        row = next(csv.DictReader(out.open()))
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    client_cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return {
        "client_cpu_s": client_cpu - (start.client_cpu_s if start is not None else 0.0),
        "load_start": start,
        "infer_per_s": round(float(row["Inferences/Second"]), 1),
        "p50_ms": round(float(row["p50 latency"]) / 1000, 3),
        "p99_ms": round(float(row["p99 latency"]) / 1000, 3),
    }


def _features_counters(target: Target) -> dict[str, float]:
    assert target.metrics_url is not None and target.sidecar_metrics is not None
    gw = scrape(target.metrics_url)
    cache = {o: metric(gw, "gateway_cache_rows_total", outcome=o) for o in ("hit", "coalesced")}
    return {
        "cache_answered": cache["hit"] + cache["coalesced"],
        "cache_missed": metric(gw, "gateway_cache_rows_total", outcome="miss"),
        "events_recorded": metric(gw, "gateway_events_total", outcome="recorded"),
        "events_acked": metric(gw, "gateway_events_total", outcome="acked"),
        "sidecar_stored": metric(
            scrape(target.sidecar_metrics), "sidecar_events_total", outcome="stored"
        ),
    }


def _drain(target: Target, timeout_s: float = 20.0) -> dict[str, float]:
    """Wait until the sidecar has acknowledged every event the gateway recorded."""
    deadline = time.monotonic() + timeout_s
    while True:
        counters = _features_counters(target)
        if counters["events_acked"] >= counters["events_recorded"] or time.monotonic() > deadline:
            return counters
        time.sleep(0.1)


def measure(
    pa: str, target: Target, mode: str, concurrency: int, round_: int, args: argparse.Namespace
) -> dict[str, Any]:
    features = target.sidecar is not None
    before = _features_counters(target) if features else {}
    sidecar_cpu = target.sidecar.cpu_seconds() if target.sidecar else 0.0
    served, before_cpu = target.requests(), target.proc.cpu_seconds()
    started_at = time.monotonic()
    stats = perf_analyzer(pa, target, concurrency, mode == "streaming", args)
    ended_at = time.monotonic()
    cpu = target.proc.cpu_seconds() - before_cpu
    served_after = target.requests()
    row: dict[str, Any] = {
        "server": target.name,
        "mode": mode,
        "concurrency": concurrency,
        "round": round_,
    }
    client_cpu = 0.0
    if isinstance(stats, str):
        row["error"] = stats
    else:
        client_cpu = stats.pop("client_cpu_s")
        start: LoadStart | None = stats.pop("load_start")
        if start is not None:  # count from the first answers, not from perf_analyzer's start
            served, started_at = start.served, start.at
            cpu -= start.server_cpu_s - before_cpu
        row.update(stats)
    wall = ended_at - started_at
    if served is not None and served_after is not None and served_after > served:
        row["requests"] = int(served_after - served)
        row["server_cpu_us_per_request"] = round(cpu / (served_after - served) * 1e6, 1)
        row["client_cpu_us_per_request"] = round(client_cpu / (served_after - served) * 1e6, 1)
    elif not isinstance(stats, str):  # no counter (a peer): estimated from the rate
        row["server_cpu_us_per_request_est"] = round(cpu / (stats["infer_per_s"] * wall) * 1e6, 1)
    row["server_cpu_cores"] = round(cpu / wall, 2)
    if features:
        assert target.sidecar is not None
        after = _drain(target)
        delta = {k: after[k] - before[k] for k in after}
        rows = delta["cache_answered"] + delta["cache_missed"]
        row["cache_answered_share"] = round(delta["cache_answered"] / rows, 3) if rows else None
        row["events"] = int(delta["sidecar_stored"])
        row["events_unacked"] = int(after["events_recorded"] - after["events_acked"])
        sidecar_cpu = target.sidecar.cpu_seconds() - sidecar_cpu
        if delta["sidecar_stored"] > 0:
            row["sidecar_cpu_us_per_event"] = round(sidecar_cpu / delta["sidecar_stored"] * 1e6, 1)
    return row


# --- summary ---------------------------------------------------------------------------------

METRICS = (
    "infer_per_s",
    "p50_ms",
    "p99_ms",
    "server_cpu_us_per_request",
    "server_cpu_us_per_request_est",
    "client_cpu_us_per_request",
    "sidecar_cpu_us_per_event",
    "cache_answered_share",
)


def _spread(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {
        "median": round(statistics.median(values), 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
    }


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    cells: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for row in rows:
        cells.setdefault((row["server"], row["mode"], row["concurrency"]), []).append(row)
    out = []
    for (server, mode, concurrency), group in cells.items():
        entry: dict[str, Any] = {"server": server, "mode": mode, "concurrency": concurrency}
        entry["rounds"] = len(group)
        errors = [r["error"] for r in group if "error" in r]
        if errors:
            entry["errors"] = errors
        for key in METRICS:
            spread = _spread([r[key] for r in group if r.get(key) is not None])
            if spread is not None:
                entry[key] = spread
        out.append(entry)
    return out


@dataclass(frozen=True)
class Goal:
    """One of the issue's targets: a per-round value, and what it must meet."""

    title: str
    value: Callable[[dict[tuple[str, str, int], dict[str, Any]]], float | None]
    goal: str
    passes: Callable[[float], bool] | None


def _get(server: str, mode: str, concurrency: int, key: str):
    def read(cells: dict[tuple[str, str, int], dict[str, Any]]) -> float | None:
        cell = cells.get((server, mode, concurrency))
        return None if cell is None else cell.get(key)

    return read


def _ratio(a: str, b: str, mode: str = "unary", concurrency: int = 64, key: str = "infer_per_s"):
    def read(cells: dict[tuple[str, str, int], dict[str, Any]]) -> float | None:
        x, y = _get(a, mode, concurrency, key)(cells), _get(b, mode, concurrency, key)(cells)
        return None if x is None or not y else x / y

    return read


def _free_gateway_bound(transport: str):
    """The every-feature ratio at c=64 unary that a gateway costing no CPU would reach on this
    machine: the echo cell's CPU per request (client + server) over what the features cell
    spends besides the gateway (perf_analyzer's 32 named inputs + the sidecar per event). Both
    cells keep the cores busy, so a cell's rate is about the busy cores over its CPU per
    request; a target above this value cannot be met here whatever the gateway does."""

    readers = [
        _get(f"echo-{transport}", "unary", 64, "client_cpu_us_per_request"),
        _get(f"echo-{transport}", "unary", 64, "server_cpu_us_per_request"),
        _get(f"features-{transport}", "unary", 64, "client_cpu_us_per_request"),
        _get(f"features-{transport}", "unary", 64, "sidecar_cpu_us_per_event"),
    ]

    def read(cells: dict[tuple[str, str, int], dict[str, Any]]) -> float | None:
        parts = [reader(cells) for reader in readers]
        known = [part for part in parts if part is not None]
        if len(known) < len(parts):
            return None
        echo_client, echo_server, client, sidecar = known
        return (echo_client + echo_server) / (client + sidecar)

    return read


TARGETS = [
    Goal(
        "passthrough-native / echo-native, infer/s, c=64 unary",
        _ratio("passthrough-native", "echo-native"),
        ">= 0.6",
        lambda v: v >= 0.6,
    ),
    Goal(
        "features-native / echo-native, infer/s, c=64 unary",
        _ratio("features-native", "echo-native"),
        ">= 0.4",
        lambda v: v >= 0.4,
    ),
    Goal(
        "bound here: features-native / echo-native with a gateway costing nothing, c=64 unary",
        _free_gateway_bound("native"),
        "-",
        None,
    ),
    Goal(
        "features-native p99 ms, c=64 unary",
        _get("features-native", "unary", 64, "p99_ms"),
        "< 30",
        lambda v: v < 30,
    ),
    Goal(
        "passthrough-native p50 ms, c=1 unary",
        _get("passthrough-native", "unary", 1, "p50_ms"),
        "< 0.5",
        lambda v: v < 0.5,
    ),
    Goal(
        "features-native p50 ms, c=1 unary",
        _get("features-native", "unary", 1, "p50_ms"),
        "< 0.8",
        lambda v: v < 0.8,
    ),
    Goal(
        "features-native infer/s, c=64 streaming",
        _get("features-native", "streaming", 64, "infer_per_s"),
        "-",
        None,
    ),
    Goal(
        "features-grpcio infer/s, c=64 streaming",
        _get("features-grpcio", "streaming", 64, "infer_per_s"),
        "-",
        None,
    ),
    Goal(
        "features-native / features-grpcio, infer/s, c=64 streaming",
        _ratio("features-native", "features-grpcio", "streaming"),
        "-",
        None,
    ),
    # The same on grpcio, and native against grpcio, for reference.
    Goal(
        "passthrough-grpcio / echo-grpcio, infer/s, c=64 unary",
        _ratio("passthrough-grpcio", "echo-grpcio"),
        "-",
        None,
    ),
    Goal(
        "features-grpcio / echo-grpcio, infer/s, c=64 unary",
        _ratio("features-grpcio", "echo-grpcio"),
        "-",
        None,
    ),
    Goal(
        "passthrough-native / passthrough-grpcio, infer/s, c=64 unary",
        _ratio("passthrough-native", "passthrough-grpcio"),
        "-",
        None,
    ),
    Goal(
        "features-native / features-grpcio, infer/s, c=64 unary",
        _ratio("features-native", "features-grpcio"),
        "-",
        None,
    ),
    Goal(
        "echo-native / echo-grpcio, infer/s, c=64 unary",
        _ratio("echo-native", "echo-grpcio"),
        "-",
        None,
    ),
]


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each target's value per round (both ends of a ratio from the same round), median and
    range, and whether the median meets it."""
    by_round: dict[int, dict[tuple[str, str, int], dict[str, Any]]] = {}
    for row in rows:
        if "error" not in row:
            cell = (row["server"], row["mode"], row["concurrency"])
            by_round.setdefault(row["round"], {})[cell] = row
    out = []
    for target in TARGETS:
        values = [v for cells in by_round.values() if (v := target.value(cells)) is not None]
        spread = _spread(values)
        verdict = "-"
        if spread is not None and target.passes is not None:
            verdict = "pass" if target.passes(spread["median"]) else "FAIL"
        out.append(
            {
                "target": target.title,
                "goal": target.goal,
                "per_round": [round(v, 3) for v in values],
                **({"value": spread} if spread else {}),
                "verdict": verdict if spread else "not measured",
            }
        )
    return out


def _fmt(spread: dict[str, float] | None, digits: int = 1) -> str:
    if spread is None:
        return "-"
    m, lo, hi = spread["median"], spread["min"], spread["max"]
    return f"{m:.{digits}f}" if lo == hi else f"{m:.{digits}f} ({lo:.{digits}f}-{hi:.{digits}f})"


def markdown(meta: dict[str, Any], cells: list[dict[str, Any]], goals: list[dict[str, Any]]) -> str:
    lines = ["# Transport benchmark", ""]
    if meta.get("note"):
        lines += [f"**{meta['note']}**", ""]
    lines += [f"`{json.dumps({k: v for k, v in meta.items() if k != 'note'})}`", ""]
    lines += [
        "perf_analyzer `-b 1`, bounded cells (three windows each), alternating rounds; medians "
        "over rounds with the range in brackets. CPU: the server's process group from /proc "
        "from the cell's first answered requests to the end of the perf_analyzer run, per "
        "request it answered meanwhile (`est`: from the rate over the whole run, no counter); "
        "client: perf_analyzer's CPU over the same span and requests; sidecar: its CPU per "
        "event stored. "
        "Transport: what served (Rust "
        f"`{NATIVE_THREAD}` threads seen, or not).",
        "",
        "## Targets",
        "",
        "| target | goal | median (range) | per round | verdict |",
        "| --- | --- | ---: | --- | --- |",
    ]
    for g in goals:
        lines.append(
            f"| {g['target']} | {g['goal']} | {_fmt(g.get('value'), 3)} | {g['per_round']} | "
            f"{g['verdict']} |"
        )
    lines += [
        "",
        "## Cells",
        "",
        "| server | transport seen | mode | conc | infer/s | p50 ms | p99 ms | server CPU us/req "
        "| client CPU us/req | sidecar CPU us/event | cache answered | errors |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    seen = meta.get("transport_seen", {})
    for c in cells:
        cpu = _fmt(c.get("server_cpu_us_per_request"))
        if cpu == "-" and c.get("server_cpu_us_per_request_est"):
            cpu = _fmt(c["server_cpu_us_per_request_est"]) + " est"
        lines.append(
            f"| {c['server']} | {seen.get(c['server'], '-')} | {c['mode']} | {c['concurrency']} | "
            f"{_fmt(c.get('infer_per_s'), 0)} | {_fmt(c.get('p50_ms'), 3)} | "
            f"{_fmt(c.get('p99_ms'), 2)} | {cpu} | {_fmt(c.get('client_cpu_us_per_request'))} | "
            f"{_fmt(c.get('sidecar_cpu_us_per_event'))} | "
            f"{_fmt(c.get('cache_answered_share'), 2)} | {'; '.join(c.get('errors', [])) or ''} |"
        )
    return "\n".join(lines) + "\n"


# --- main ------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--servers", default=",".join(SERVERS), help="comma-separated")
    parser.add_argument("--peers", action="store_true", help="also PyTriton and MLServer")
    parser.add_argument("--concurrency", default="1,64")
    parser.add_argument("--modes", default="unary,streaming")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--interval-ms", type=int, default=2500, help="perf_analyzer window")
    parser.add_argument(
        "--stability", type=int, default=1000, help="perf_analyzer --stability-percentage"
    )
    parser.add_argument("--hot-share", type=float, default=0.4, help="features: repeated rows")
    parser.add_argument("--data-rows", type=int, default=3000, help="features: rows in the file")
    parser.add_argument("--perf-analyzer")
    parser.add_argument("--server-cpus", help="taskset CPU list for the servers and sidecars")
    parser.add_argument("--client-cpus", help="taskset CPU list for perf_analyzer")
    parser.add_argument("--note", default="", help="a line for the results' header")
    parser.add_argument("--work", type=Path, default=ROOT / ".bench" / "transport")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "transport")
    args = parser.parse_args()

    split = lambda text: [s for s in text.split(",") if s]  # noqa: E731
    names = split(args.servers)
    unknown = [n for n in names if n not in SERVERS and n not in PEERS]
    if unknown:
        sys.exit(f"unknown servers {unknown}: choose from {SERVERS + list(PEERS)}")
    skipped: dict[str, str] = {}
    if args.peers:
        names += [p for p in PEERS if p not in names]
    for name in [n for n in names if n in PEERS]:
        if why := peer_available(name):
            skipped[name] = why
            names.remove(name)
            print(f"note: skipping {why}", flush=True)
    cells = [(m, int(c)) for m in split(args.modes) for c in split(args.concurrency)]
    pa = find_perf_analyzer(args.perf_analyzer)
    args.work.mkdir(parents=True, exist_ok=True)
    repos = build_repositories(args.work)
    data = args.work / "features-data.json"
    data.write_text(json.dumps({"data": feature_rows(args.data_rows, args.hot_share)}))

    started_at = time.time()
    rows: list[dict[str, Any]] = []
    seen: dict[str, str] = {}
    logged: dict[str, str] = {}
    with ExitStack() as stack:
        # Every server runs for the whole benchmark (an idle one costs next to nothing), so
        # each cell is measured on all of them back to back.
        servers = {
            name: start_target(stack, name, repos, args.work, data, args.server_cpus)
            for name in names
        }
        for name, target in servers.items():
            threads = target.proc.native_threads()
            seen[name] = "native" if threads else "grpcio"
            if name in PEERS:
                seen[name] = PEER_TRANSPORT[name]
            logged[name] = target.transport_log
            want = name.rsplit("-", 1)[-1]
            if want in TRANSPORTS and seen[name] != want:
                print(f"note: {name} serves on {seen[name]} (log: {logged[name]!r})", flush=True)
        for round_ in range(args.rounds):
            order = names[round_ % len(names) :] + names[: round_ % len(names)]
            for mode, concurrency in cells:
                for name in order:
                    if why := PEER_UNSUPPORTED.get(name, {}).get(mode):
                        row = {"server": name, "mode": mode, "concurrency": concurrency}
                        rows.append({**row, "round": round_, "error": f"skipped: {why}"})
                        continue
                    row = measure(pa, servers[name], mode, concurrency, round_, args)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    meta: dict[str, Any] = {
        **run_meta(started_at),
        "perf_analyzer": "2.51 (grpc, -b 1; features: --input-data, others random data)",
        "interval_ms": args.interval_ms,
        "stability_percentage": args.stability,
        "rounds": args.rounds,
        "features_data": f"{args.data_rows} rows, {args.hot_share:.0%} from {HOT_ROWS} hot rows",
        "cache_rows": CACHE_ROWS,
        "transport_seen": seen,
        "transport_logged": logged,
        "skipped": skipped,
        "cpus": {"servers": args.server_cpus or "all", "client": args.client_cpus or "all"},
    }
    if args.note:
        meta["note"] = args.note
    summary, goals = summarize(rows), targets(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {"meta": meta, "targets": goals, "cells": summary, "rows": rows}
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    table = markdown(meta, summary, goals)
    args.out.with_suffix(".md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
