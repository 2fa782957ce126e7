"""State benchmark: what keeping the gateway's per-request state in Redis costs one replica,
against keeping it in the process (``state.backend: memory``).

    .venv/bin/python benchmarks/bench_state.py          # the whole run (~1.5 min)
    .venv/bin/python benchmarks/bench_state.py --rounds 1 --interval-ms 1000 \\
        --concurrency 64 --out /tmp/state

Configurations, each its own ``gateway serve --transport <t>`` on 127.0.0.1 (``--transport``,
native by default), running for the whole benchmark, alike but for ``state.backend``:

* ``memory``: the embedded default: every concern below kept in the process.
* ``redis``: ``state.backend: redis`` on a ``redis-server`` this script starts on a free
  loopback port (``--save "" --appendonly no``, otherwise Redis' defaults: no ``maxmemory``,
  ``noeviction``, as the README asks) and stops by PID at the end, after an error too
  (bench_transport's ``started``: SIGTERM, then SIGKILL of its process group; its CPU is read
  from /proc like a gateway's).

Both serve the MLP 32 -> 256 -> 256 -> 1 of bench_transport's passthrough, marked deterministic
(so the cache applies) and priced (so the budget is spent), with no route (requests name the
model), and every per-request state concern on:

* a rate limit on the tenant ``bench`` far above the load: on Redis, one EVALSHA (the GCRA
  script) round trip per request;
* a budget on ``bench`` far above the spend (policy ``alert``): on Redis its spend is synced
  every ``state.sync_interval_ms``, off the request path;
* the response cache: on Redis a row the local tier misses is looked up there (one MGET per
  request with a miss) before it is computed, and a computed row is written there in the
  background (a pipelined SET).

perf_analyzer sends the tenant as a request parameter (``--request-parameter
tenant:bench:string``, read by the gateway as ``tenant``); the budget's spend seen at the end
(``gateway_budget_spent{budget="bench"}``) shows it arrived. Rows come from an ``--input-data``
file of ``--data-rows`` rows: ``--hot-share`` of them one of 16 hot rows, the rest each once in
the file. ``cache.ttl_s`` is ``--ttl-s`` (1 s), shorter than a pass over the file, so a one-off
row has expired from both tiers when the file comes round again: both configurations answer
about the hot share from the local tier and compute the rest, and on Redis every request with a
miss also pays the MGET (a miss there) and the write. That is the shared cache's cost; on
several replicas the same round trip is what turns another replica's row into a hit.

Cells: perf_analyzer ``-b 1``, unary, at concurrency 1 and 64, each bounded as in
bench_transport (three windows of ``--interval-ms``). Rounds (``--rounds``) alternate: for each
cell both configurations are measured back to back, ``memory`` first in even rounds and
``redis`` first in odd ones.

Per configuration and cell: infer/s, p50 and p99 latency, the gateway's CPU microseconds per
request (its process group's CPU from /proc over the perf_analyzer run, over the requests its
``gateway_requests_total`` counted), Redis' (the redis-server's CPU from /proc over the same
run, over the same requests; during a ``memory`` cell that is Redis idling), Redis' commands per
request and the time it spent in them (INFO commandstats; the commands a Lua script runs, the
GCRA's TIME, GET and SET, are counted there too), the share of rows the cache answered, and
calls to Redis that failed or took longer than ``state.timeout_ms`` (answered as their
``on_error`` says). Per round, ``redis`` against ``memory`` of the same round: the ratios of
infer/s, p50, p99 and gateway CPU per request, the extra gateway CPU per request, and the ratio
of gateway + Redis CPU per request to the gateway's alone on memory. Medians over rounds with
the range. Results: benchmarks/results/state.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import socket
import statistics
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import redis
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_auth import client_command, round_order, tree_revision  # noqa: E402
from benchmarks.bench_serving import find_perf_analyzer, run_meta  # noqa: E402
from benchmarks.bench_transport import (  # noqa: E402
    HOT_ROWS,
    PRICE,
    Proc,
    Target,
    _fmt,
    _gateway,
    _mlp_config,
    _spread,
    measure,
    metric,
    scrape,
    started,
    transport_line,
)
from benchmarks.models import write_mlp  # noqa: E402

CONFIGURATIONS = ["memory", "redis"]
TENANT = "bench"
REDIS_READY = re.compile(r"Ready to accept connections")
GATEWAY_CPU = "server_cpu_us_per_request"
REDIS_CPU = "redis_cpu_us_per_request"
CONCERNS = ("limits", "budgets", "cache", "routes")  # gateway_state_errors_total{concern}
CELL_METRICS = (
    "infer_per_s",
    "p50_ms",
    "p99_ms",
    GATEWAY_CPU,
    REDIS_CPU,
    "redis_command_us_per_request",
    "client_cpu_us_per_request",
    "cache_answered_share",
    "state_errors",
)


# --- the servers -----------------------------------------------------------------------------


@dataclass
class RedisServer:
    """The redis-server under the ``redis`` configuration: its process and a client to read
    its INFO with."""

    proc: Proc
    url: str
    client: redis.Redis

    def commands(self) -> dict[str, tuple[int, int]]:
        """Calls and microseconds so far per command, the INFO calls made here left out."""
        stats = self.client.info("commandstats")
        return {
            name.removeprefix("cmdstat_"): (int(v["calls"]), int(v["usec"]))
            for name, v in stats.items()
            if name != "cmdstat_info"
        }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_redis(stack: ExitStack, work: Path, cpus: str | None) -> RedisServer:
    # NOTE: not tests/services.py's RedisServer: it imports tests.conftest (pytest, and
    # tritonclient, whose protobuf registrations clash with the gateway's generated modules),
    # and ``started`` gives Redis a process group of its own, read and stopped like a gateway's.
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server not found (Debian: apt-get install redis-server)")
    directory = work / "redis"
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    command = [binary, "--bind", "127.0.0.1", "--port", str(port), "--dir", str(directory)]
    command += ["--save", "", "--appendonly", "no"]
    proc, _ = stack.enter_context(
        started("redis", command, work / "logs" / "redis.log", REDIS_READY, timeout_s=30, cpus=cpus)
    )
    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=10)
    stack.callback(client.close)
    return RedisServer(proc, f"redis://127.0.0.1:{port}/0", client)


def build_repository(work: Path) -> Path:
    """The MLP, deterministic (cached) and priced (charged to the budget)."""
    repo = work / "repo-state"
    if not (repo / "mlp" / "config.yaml").exists():
        write_mlp(repo / "mlp")
        config = _mlp_config(deterministic=True, price=PRICE)
        (repo / "mlp" / "config.yaml").write_text(yaml.safe_dump(config))
    return repo


def gateway_settings(backend: str, redis_url: str, ttl_s: float) -> dict[str, object]:
    settings: dict[str, object] = {
        "routing": {"rate_limits": {TENANT: {"rate": 1e9, "burst": 1_000_000_000}}},
        "cache": {"enabled": True, "ttl_s": ttl_s},
        "costs": {
            "budgets": [{"name": TENANT, "tenant": TENANT, "limit": 1e12, "policy": "alert"}]
        },
    }
    if backend == "redis":
        settings["state"] = {"backend": "redis", "redis_url": redis_url}
    return settings


def input_rows(rows: int, hot_share: float, seed: int = 0) -> list[dict[str, list[float]]]:
    """perf_analyzer steps for the MLP's ``features``: ``hot_share`` of them one of
    ``HOT_ROWS`` rows, the rest each seen once."""
    rng = np.random.default_rng(seed)

    def row() -> dict[str, list[float]]:
        return {"features": [round(float(x), 3) for x in rng.normal(0, 2, 32)]}

    hot = [row() for _ in range(HOT_ROWS)]
    return [hot[rng.integers(HOT_ROWS)] if rng.random() < hot_share else row() for _ in range(rows)]


# --- measuring -------------------------------------------------------------------------------


def gateway_counters(target: Target) -> dict[str, float]:
    assert target.metrics_url is not None
    samples = scrape(target.metrics_url)
    rows = {o: metric(samples, "gateway_cache_rows_total", outcome=o) for o in ("hit", "miss")}
    return {
        "answered": rows["hit"] + metric(samples, "gateway_cache_rows_total", outcome="coalesced"),
        "missed": rows["miss"],
        "limited": metric(samples, "gateway_limited_total"),
        **{
            f"state_errors:{c}": metric(samples, "gateway_state_errors_total", concern=c)
            for c in CONCERNS
        },
    }


def measure_cell(
    name: str,
    target: Target,
    client: str,
    store: RedisServer,
    concurrency: int,
    round_: int,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """bench_transport's cell, with Redis' CPU and commands and the cache's counters over it."""
    counters, commands = gateway_counters(target), store.commands()
    redis_cpu = store.proc.cpu_seconds()
    row = measure(client, target, "unary", concurrency, round_, args)
    redis_cpu = store.proc.cpu_seconds() - redis_cpu
    commands_after, counters_after = store.commands(), gateway_counters(target)
    row["server"] = name
    delta = {k: counters_after[k] - counters[k] for k in counters}
    looked_up = delta["answered"] + delta["missed"]
    row["cache_answered_share"] = round(delta["answered"] / looked_up, 3) if looked_up else None
    errors = {c: int(delta[f"state_errors:{c}"]) for c in CONCERNS}
    row["state_errors"] = sum(errors.values())
    row["state_errors_by_concern"] = {c: n for c, n in errors.items() if n}
    row["limited"] = int(delta["limited"])
    requests = row.get("requests")
    if not requests:
        return row
    row[REDIS_CPU] = round(redis_cpu / requests * 1e6, 1)
    calls, usec = {}, 0
    for command, (count, spent) in commands_after.items():
        before_count, before_spent = commands.get(command, (0, 0))
        usec += spent - before_spent
        if count - before_count >= 0.01 * requests:
            calls[command] = round((count - before_count) / requests, 3)
    row["redis_calls_per_request"] = calls
    row["redis_command_us_per_request"] = round(usec / requests, 2)
    return row


# --- summary ---------------------------------------------------------------------------------


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    cells: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for row in rows:
        cells.setdefault((row["server"], row["concurrency"]), []).append(row)
    out = []
    for (name, concurrency), group in cells.items():
        entry: dict[str, Any] = {"server": name, "concurrency": concurrency, "rounds": len(group)}
        if errors := [r["error"] for r in group if "error" in r]:
            entry["errors"] = errors
        for key in CELL_METRICS:
            if (spread := _spread([r[key] for r in group if r.get(key) is not None])) is not None:
                entry[key] = spread
        commands = sorted({c for r in group for c in r.get("redis_calls_per_request", {})})
        entry["redis_calls_per_request"] = {
            c: round(statistics.median(r["redis_calls_per_request"].get(c, 0.0) for r in group), 3)
            for c in commands
        }
        entry["state_errors_by_concern"] = {
            c: total
            for c in CONCERNS
            if (total := sum(r.get("state_errors_by_concern", {}).get(c, 0) for r in group))
        }
        out.append(entry)
    return out


def comparisons(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``redis`` against ``memory`` per round (both from the same round)."""
    by_round: dict[int, dict[tuple[str, int], dict[str, Any]]] = {}
    for row in rows:
        if "error" not in row:
            by_round.setdefault(row["round"], {})[(row["server"], row["concurrency"])] = row
    out = []
    for concurrency in sorted({row["concurrency"] for row in rows}):
        pairs = [
            (cells[("redis", concurrency)], cells[("memory", concurrency)])
            for cells in by_round.values()
            if ("redis", concurrency) in cells and ("memory", concurrency) in cells
        ]
        if not pairs:
            continue
        cpu = [(a, b) for a, b in pairs if GATEWAY_CPU in a and GATEWAY_CPU in b]
        per_round = {
            "infer_per_s_ratio": [a["infer_per_s"] / b["infer_per_s"] for a, b in pairs],
            "p50_ratio": [a["p50_ms"] / b["p50_ms"] for a, b in pairs],
            "p99_ratio": [a["p99_ms"] / b["p99_ms"] for a, b in pairs],
            "gateway_cpu_per_request_ratio": [a[GATEWAY_CPU] / b[GATEWAY_CPU] for a, b in cpu],
            "gateway_cpu_us_per_request_extra": [a[GATEWAY_CPU] - b[GATEWAY_CPU] for a, b in cpu],
            "redis_cpu_us_per_request": [a[REDIS_CPU] for a, _ in cpu if REDIS_CPU in a],
            "total_cpu_per_request_ratio": [
                (a[GATEWAY_CPU] + a[REDIS_CPU]) / b[GATEWAY_CPU] for a, b in cpu if REDIS_CPU in a
            ],
        }
        entry: dict[str, Any] = {"concurrency": concurrency, "rounds": len(pairs)}
        for key, values in per_round.items():
            entry[key] = _spread(values)
        entry["per_round"] = {k: [round(v, 3) for v in vs] for k, vs in per_round.items()}
        out.append(entry)
    return out


def _calls(calls: dict[str, float]) -> str:
    return ", ".join(f"{c} {v:.2f}" for c, v in calls.items()) or "-"


def _errors(cell: dict[str, Any]) -> str:
    """State errors per round, and over all rounds by concern."""
    by_concern = ", ".join(f"{c} {n}" for c, n in cell["state_errors_by_concern"].items())
    return _fmt(cell.get("state_errors"), 0) + (f" ({by_concern} in all)" if by_concern else "")


def markdown(meta: dict[str, Any], cells: list[dict[str, Any]], costs: list[dict[str, Any]]) -> str:
    lines = ["# State benchmark", ""]
    if meta.get("note"):
        lines += [f"**{meta['note']}**", ""]
    lines += [f"`{json.dumps({k: v for k, v in meta.items() if k != 'note'})}`", ""]
    lines += [
        "One gateway replica with a rate limit, a budget and the response cache on the "
        "tenant's requests, its state in the process (`memory`) or in Redis on loopback "
        "(`redis`): the MLP passthrough, deterministic and priced, perf_analyzer `-b 1` unary "
        "with `--request-parameter tenant:bench:string`, rows from a file "
        f"({meta['input_data']}, `cache.ttl_s` {meta['cache_ttl_s']}: each one-off row a miss "
        "in both tiers), bounded cells (three windows each), alternating rounds; medians over "
        "rounds with the range in brackets. CPU: the gateway's process group and the "
        "redis-server from /proc over the perf_analyzer run, per request the gateway's "
        "`gateway_requests_total` counted. Redis calls: INFO commandstats per request "
        "(commands run by a Lua script included). State errors: calls to Redis that failed or "
        "took longer than `state.timeout_ms` (50 ms), answered as their `on_error` says. "
        "The tenant's budget spend at the end (`tenant_budget_spent`) shows the tenant "
        "parameter arrived.",
        "",
        "## redis against memory (per round, same round)",
        "",
        "| conc | infer/s ratio | p50 ratio | p99 ratio | gateway CPU/req ratio "
        "| extra gateway CPU us/req | Redis CPU us/req | (gateway + Redis) / memory CPU/req "
        "| rounds |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for c in costs:
        lines.append(
            f"| {c['concurrency']} | {_fmt(c['infer_per_s_ratio'], 3)} | "
            f"{_fmt(c['p50_ratio'], 3)} | {_fmt(c['p99_ratio'], 3)} | "
            f"{_fmt(c['gateway_cpu_per_request_ratio'], 3)} | "
            f"{_fmt(c['gateway_cpu_us_per_request_extra'])} | "
            f"{_fmt(c['redis_cpu_us_per_request'])} | "
            f"{_fmt(c['total_cpu_per_request_ratio'], 3)} | {c['rounds']} |"
        )
    lines += [
        "",
        "## Cells",
        "",
        "| config | conc | infer/s | p50 ms | p99 ms | gateway CPU us/req | Redis CPU us/req "
        "| Redis command us/req | Redis calls/req | cache answered | state errors/round "
        "| client CPU us/req | errors |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | --- |",
    ]
    for c in cells:
        lines.append(
            f"| {c['server']} | {c['concurrency']} | {_fmt(c.get('infer_per_s'), 0)} | "
            f"{_fmt(c.get('p50_ms'), 3)} | {_fmt(c.get('p99_ms'), 2)} | "
            f"{_fmt(c.get(GATEWAY_CPU))} | {_fmt(c.get(REDIS_CPU))} | "
            f"{_fmt(c.get('redis_command_us_per_request'), 2)} | "
            f"{_calls(c['redis_calls_per_request'])} | "
            f"{_fmt(c.get('cache_answered_share'), 2)} | {_errors(c)} | "
            f"{_fmt(c.get('client_cpu_us_per_request'))} | {'; '.join(c.get('errors', []))} |"
        )
    return "\n".join(lines) + "\n"


# --- main ------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--concurrency", default="1,64")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--interval-ms", type=int, default=2500, help="perf_analyzer window")
    parser.add_argument(
        "--stability", type=int, default=1000, help="perf_analyzer --stability-percentage"
    )
    parser.add_argument("--transport", choices=["native", "grpcio"], default="native")
    parser.add_argument("--data-rows", type=int, default=20_000, help="rows in the input file")
    parser.add_argument("--hot-share", type=float, default=0.4, help="share of repeated rows")
    parser.add_argument("--ttl-s", type=float, default=1.0, help="cache.ttl_s")
    parser.add_argument("--perf-analyzer")
    parser.add_argument("--server-cpus", help="taskset CPU list for the gateways and Redis")
    parser.add_argument("--client-cpus", help="taskset CPU list for perf_analyzer")
    parser.add_argument("--note", default="", help="a line for the results' header")
    parser.add_argument("--work", type=Path, default=ROOT / ".bench" / "state")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "state")
    args = parser.parse_args()

    concurrencies = [int(c) for c in args.concurrency.split(",") if c]
    pa = find_perf_analyzer(args.perf_analyzer)
    args.work.mkdir(parents=True, exist_ok=True)
    repo = build_repository(args.work)
    data = args.work / "input-data.json"
    data.write_text(json.dumps({"data": input_rows(args.data_rows, args.hot_share)}))
    tenant = ["--request-parameter", f"tenant:{TENANT}:string"]
    client = client_command(pa, tenant, args.work / "pa-state.sh")

    started_at = time.time()
    rows: list[dict[str, Any]] = []
    with ExitStack() as stack:
        store = start_redis(stack, args.work, args.server_cpus)
        targets = {}
        for name in CONFIGURATIONS:
            settings = gateway_settings(name, store.url, args.ttl_s)
            label = f"{name}-{args.transport}"  # _gateway reads the transport from the name
            proc, url, metrics = _gateway(
                stack, label, repo, settings, args.work, [], args.server_cpus
            )
            targets[name] = Target(
                name,
                proc,
                url,
                "mlp",
                data=data,
                metrics_url=metrics,
                transport_log=transport_line(proc.text()),
            )
        for round_ in range(args.rounds):
            for concurrency in concurrencies:
                for name in round_order(CONFIGURATIONS, round_):
                    row = measure_cell(
                        name, targets[name], client, store, concurrency, round_, args
                    )
                    rows.append(row)
                    print(json.dumps(row), flush=True)
        # The budget is the tenant's alone: spend on it shows perf_analyzer's parameter arrived.
        spent = {
            name: metric(scrape(t.metrics_url or ""), "gateway_budget_spent", budget=TENANT)
            for name, t in targets.items()
        }
        redis_memory = store.client.info("memory")["used_memory_human"]
        redis_version = store.client.info("server")["redis_version"]
    for name, value in spent.items():
        if not value > 0:
            print(f"note: {name}: nothing spent on tenant {TENANT!r}'s budget", flush=True)
    meta: dict[str, Any] = {
        **run_meta(started_at),
        "revision": tree_revision(),
        "perf_analyzer": "2.51 (grpc, -b 1, unary, --input-data, --request-parameter tenant)",
        "interval_ms": args.interval_ms,
        "stability_percentage": args.stability,
        "rounds": args.rounds,
        "transport": args.transport,
        "input_data": f"{args.data_rows} rows, {args.hot_share:.0%} from {HOT_ROWS} hot rows",
        "cache_ttl_s": args.ttl_s,
        "redis": f"Redis {redis_version}, loopback, no persistence, noeviction",
        "redis_used_memory_at_end": redis_memory,
        "tenant_budget_spent": {name: round(value, 6) for name, value in spent.items()},
        "transport_logged": {name: t.transport_log for name, t in targets.items()},
        "cpus": {"servers": args.server_cpus or "all", "client": args.client_cpus or "all"},
    }
    if args.note:
        meta["note"] = args.note
    cells, costs = summarize(rows), comparisons(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {"meta": meta, "costs": costs, "cells": cells, "rows": rows}
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    table = markdown(meta, cells, costs)
    args.out.with_suffix(".md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
