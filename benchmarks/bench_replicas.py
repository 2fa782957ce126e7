"""Replicas benchmark: two gateway worker processes sharing one port (``gateway serve --workers
2``) against one (``--workers 1``) on the same machine, both keeping their per-request state in
one Redis.

    .venv/bin/python benchmarks/bench_replicas.py            # the whole run (~1.5 min)
    .venv/bin/python benchmarks/bench_replicas.py --rounds 1 --configs one,two \\
        --concurrency 1,64 --out /tmp/replicas

Configurations, each its own ``gateway serve --transport <t>`` on 127.0.0.1 (``--transport``,
native by default), running for the whole benchmark, alike but for the two settings named:

* ``one``: ``--workers 1``: one process, ``state.backend: redis``.
* ``two``: ``--workers 2``: a supervisor (no event loop of its own) and two worker processes,
  each a whole gateway, bound to the same port with SO_REUSEPORT (gateway/workers.py): the
  kernel spreads the incoming connections over them, and a gRPC connection stays on the worker
  that accepted it. Each worker has a metrics port of its own (``metrics_port + i``, any free
  port here), read separately: ``gateway_requests_total`` summed over them is the requests, and
  each worker's part of it is reported (a worker that served nothing would make ``two`` a
  ``one`` with an idle process). ``state.backend: redis``, the same Redis as ``one``.
* ``one-memory`` (the reference): ``--workers 1``, ``state.backend: memory``.

The redis-server, the repository (the MLP 32 -> 256 -> 256 -> 1, deterministic and priced), the
per-request state (a rate limit on the tenant ``bench`` far above the load, a budget far above
the spend, the response cache with ``cache.ttl_s`` 1 s) and the input file (``--hot-share`` of
``--data-rows`` rows one of 16 hot rows) are bench_state's: see its docstring. With Redis the
rate limit's state is shared by the workers (one EVALSHA per request), so two workers admit what
one would. One difference from bench_state: ``state.budgets_on_error`` is ``fail_open`` here
(``--budgets-on-error``): on a shared 2-core machine a busy event loop can leave the budget's
sync unanswered for over a second, which ``fail_closed`` (the default) turns into UNAVAILABLE and
perf_analyzer into an aborted cell; with ``fail_open`` the cell completes and the calls that
failed or took longer than ``state.timeout_ms`` (50 ms) are counted as state errors.

perf_analyzer opens one gRPC connection per ``--channel-share`` of its worker threads (the
Triton client's ``TRITON_CLIENT_GRPC_CHANNEL_MAX_SHARE_COUNT``, 6 unless set; at concurrency 64
it runs 16 threads). With 6 that is about three connections, which two workers can only split 2:1 or
3:0; this script sets it to ``--channel-share`` (1: sixteen connections, the many-clients case)
for every configuration alike. At concurrency 1 there is one connection, so one worker serves
it whatever the configuration.

Cells: perf_analyzer ``-b 1``, unary, at ``--concurrency`` (64; ``1,64`` adds the single
connection), bounded as in bench_transport (three windows of ``--interval-ms``). Rounds
(``--rounds``) alternate: for each cell the configurations are measured back to back, in the
listed order in even rounds and reversed in odd ones.

Per configuration and cell: infer/s, p50 and p99 latency; CPU microseconds per request (over
the requests ``gateway_requests_total`` counted) of the gateway (its whole process group from
/proc: the supervisor and the workers), of Redis and of the client (perf_analyzer); the cores
each of them kept busy over the cell, and the machine's busy cores from /proc/stat (what is left
of them: other processes on the machine); each worker's share of the requests; the share of
rows the cache answered; calls to Redis that failed or took longer than ``state.timeout_ms``.
Per round, ``two`` against ``one`` (and each against ``one-memory``) of the same round: the
ratios of infer/s, p50, p99 and gateway CPU per request. Medians over rounds with the range.
Results: benchmarks/results/replicas.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_auth import round_order, tree_revision  # noqa: E402
from benchmarks.bench_serving import find_perf_analyzer, run_meta  # noqa: E402
from benchmarks.bench_state import (  # noqa: E402
    CONCERNS,
    REDIS_CPU,
    TENANT,
    RedisServer,
    build_repository,
    gateway_settings,
    input_rows,
    start_redis,
)
from benchmarks.bench_transport import (  # noqa: E402
    HOT_ROWS,
    Target,
    _fmt,
    _gateway,
    _spread,
    measure,
    metric,
    scrape,
    transport_line,
)

# name: (state.backend, --workers)
CONFIGURATIONS: dict[str, tuple[str, int]] = {
    "one": ("redis", 1),
    "two": ("redis", 2),
    "one-memory": ("memory", 1),
}
GATEWAY_CPU = "server_cpu_us_per_request"
CLIENT_CPU = "client_cpu_us_per_request"
CHANNEL_SHARE_ENV = "TRITON_CLIENT_GRPC_CHANNEL_MAX_SHARE_COUNT"
CELL_METRICS = (
    "infer_per_s",
    "p50_ms",
    "p99_ms",
    GATEWAY_CPU,
    REDIS_CPU,
    CLIENT_CPU,
    "gateway_cores",
    "redis_cores",
    "client_cores",
    "machine_busy_cores",
    "other_cores",
    "cache_answered_share",
    "state_errors",
    "state_errors_per_request",
)
# (this, against): ratios per round when both were measured
PAIRS = (("two", "one"), ("one", "one-memory"), ("two", "one-memory"))


@dataclass
class ReplicaTarget(Target):
    """A gateway of one or more workers: its requests summed over each worker's metrics."""

    metrics_urls: list[str] = field(default_factory=list)

    def per_worker(self) -> list[float]:
        out = []
        for url in self.metrics_urls:
            samples = scrape(url)
            out.append(
                metric(samples, "gateway_requests_total", rpc="ModelInfer")
                + metric(samples, "gateway_requests_total", rpc="ModelStreamInfer")
            )
        return out

    def requests(self) -> float | None:
        return sum(self.per_worker())

    def state_counters(self) -> dict[str, float]:
        totals: dict[str, float] = {}
        for url in self.metrics_urls:
            samples = scrape(url)
            rows = {
                o: metric(samples, "gateway_cache_rows_total", outcome=o)
                for o in ("hit", "coalesced", "miss")
            }
            values = {
                "answered": rows["hit"] + rows["coalesced"],
                "missed": rows["miss"],
                "spent": metric(samples, "gateway_budget_spent", budget=TENANT),
                **{
                    f"state_errors:{c}": metric(samples, "gateway_state_errors_total", concern=c)
                    for c in CONCERNS
                },
            }
            for key, value in values.items():
                totals[key] = totals.get(key, 0.0) + value
        return totals


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent busy so far (all cores, /proc/stat)."""
    with open("/proc/stat") as stat:
        fields = [int(v) for v in stat.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    busy = sum(fields[:8]) - idle  # user nice system idle iowait irq softirq steal
    return busy / os.sysconf("SC_CLK_TCK")


def client_command(pa: str, tenant: str, channel_share: int, path: Path) -> str:
    """perf_analyzer with the tenant parameter and the channel share, as one executable."""
    command = shlex.join([pa, "--request-parameter", f"tenant:{tenant}:string"])
    path.write_text(f'#!/bin/sh\nexport {CHANNEL_SHARE_ENV}={channel_share}\nexec {command} "$@"\n')
    path.chmod(0o700)
    return str(path)


def measure_cell(
    name: str,
    target: ReplicaTarget,
    client: str,
    store: RedisServer,
    concurrency: int,
    round_: int,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """bench_transport's cell, with Redis' CPU, the machine's, and each worker's requests."""
    counters, workers = target.state_counters(), target.per_worker()
    redis_cpu, gateway_cpu = store.proc.cpu_seconds(), target.proc.cpu_seconds()
    busy, started_at = machine_busy_seconds(), time.monotonic()
    row = measure(client, target, "unary", concurrency, round_, args)
    wall = time.monotonic() - started_at
    busy = machine_busy_seconds() - busy
    redis_cpu = store.proc.cpu_seconds() - redis_cpu
    gateway_cpu = target.proc.cpu_seconds() - gateway_cpu
    workers = [after - before for after, before in zip(target.per_worker(), workers, strict=True)]
    delta = {k: v - counters[k] for k, v in target.state_counters().items()}
    row["server"] = name
    row["workers"] = len(workers)
    row["worker_requests"] = [int(n) for n in workers]
    total = sum(workers)
    row["worker_share"] = [round(n / total, 3) for n in workers] if total else None
    looked_up = delta["answered"] + delta["missed"]
    row["cache_answered_share"] = round(delta["answered"] / looked_up, 3) if looked_up else None
    errors = {c: int(delta[f"state_errors:{c}"]) for c in CONCERNS}
    row["state_errors"] = sum(errors.values())
    row["state_errors_by_concern"] = {c: n for c, n in errors.items() if n}
    row["gateway_cores"] = round(gateway_cpu / wall, 2)
    row["redis_cores"] = round(redis_cpu / wall, 2)
    row["machine_busy_cores"] = round(busy / wall, 2)
    requests = row.get("requests")
    if requests:
        row[REDIS_CPU] = round(redis_cpu / requests * 1e6, 1)
        row["state_errors_per_request"] = round(row["state_errors"] / requests, 3)
        if CLIENT_CPU in row:
            client_cpu = row[CLIENT_CPU] * requests / 1e6
            row["client_cores"] = round(client_cpu / wall, 2)
            row["other_cores"] = round((busy - gateway_cpu - redis_cpu - client_cpu) / wall, 2)
    return row


# --- summary ---------------------------------------------------------------------------------


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    cells: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for row in rows:
        cells.setdefault((row["server"], row["concurrency"]), []).append(row)
    out = []
    for (name, concurrency), group in cells.items():
        entry: dict[str, Any] = {"server": name, "concurrency": concurrency, "rounds": len(group)}
        entry["workers"] = group[0]["workers"]
        if errors := [r["error"] for r in group if "error" in r]:
            entry["errors"] = errors
        for key in CELL_METRICS:
            if (spread := _spread([r[key] for r in group if r.get(key) is not None])) is not None:
                entry[key] = spread
        shares = [r["worker_share"] for r in group if r.get("worker_share")]
        entry["worker_share_per_round"] = shares
        entry["state_errors_by_concern"] = {
            c: total
            for c in CONCERNS
            if (total := sum(r.get("state_errors_by_concern", {}).get(c, 0) for r in group))
        }
        out.append(entry)
    return out


def comparisons(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each of PAIRS per round (both from the same round)."""
    by_round: dict[int, dict[tuple[str, int], dict[str, Any]]] = {}
    for row in rows:
        if "error" not in row:
            by_round.setdefault(row["round"], {})[(row["server"], row["concurrency"])] = row
    out = []
    for this, against in PAIRS:
        for concurrency in sorted({row["concurrency"] for row in rows}):
            pairs = [
                (cells[(this, concurrency)], cells[(against, concurrency)])
                for cells in by_round.values()
                if (this, concurrency) in cells and (against, concurrency) in cells
            ]
            if not pairs:
                continue
            cpu = [(a, b) for a, b in pairs if GATEWAY_CPU in a and GATEWAY_CPU in b]
            per_round = {
                "infer_per_s_ratio": [a["infer_per_s"] / b["infer_per_s"] for a, b in pairs],
                "p50_ratio": [a["p50_ms"] / b["p50_ms"] for a, b in pairs],
                "p99_ratio": [a["p99_ms"] / b["p99_ms"] for a, b in pairs],
                "gateway_cpu_per_request_ratio": [a[GATEWAY_CPU] / b[GATEWAY_CPU] for a, b in cpu],
            }
            entry: dict[str, Any] = {
                "this": this,
                "against": against,
                "concurrency": concurrency,
                "rounds": len(pairs),
            }
            for key, values in per_round.items():
                entry[key] = _spread(values)
            entry["per_round"] = {k: [round(v, 3) for v in vs] for k, vs in per_round.items()}
            out.append(entry)
    return out


def _shares(cell: dict[str, Any]) -> str:
    if cell["workers"] < 2:
        return "-"
    return (
        "; ".join(
            " / ".join(f"{s:.2f}" for s in shares)
            for shares in cell.get("worker_share_per_round", [])
        )
        or "-"
    )


def _median(cell: dict[str, Any] | None, key: str) -> float | None:
    if cell is None or key not in cell:
        return None
    return float(cell[key]["median"])


def cores_prose(cells: list[dict[str, Any]], costs: list[dict[str, Any]]) -> list[str]:
    """What 2 cores allow, with this run's numbers (concurrency 64, or the highest measured)."""
    if not cells:
        return []
    concurrency = max(c["concurrency"] for c in cells)
    at = {c["server"]: c for c in cells if c["concurrency"] == concurrency}
    ratio = next(
        (
            c
            for c in costs
            if (c["this"], c["against"], c["concurrency"]) == ("two", "one", concurrency)
        ),
        None,
    )

    def num(name: str, key: str, digits: int = 2) -> str:
        value = _median(at.get(name), key)
        return "-" if value is None else f"{value:.{digits}f}"

    lines = ["## What 2 cores allow", ""]
    for name in ("one", "two", "one-memory"):
        if name in at:
            lines.append(
                f"* `{name}` at concurrency {concurrency}: {num(name, 'infer_per_s', 0)} infer/s; "
                f"busy cores (medians): gateway {num(name, 'gateway_cores')}, Redis "
                f"{num(name, 'redis_cores')}, perf_analyzer {num(name, 'client_cores')}, "
                f"everything else on the machine {num(name, 'other_cores')}, the machine in all "
                f"{num(name, 'machine_busy_cores')} of {os.cpu_count()}."
            )
    if ratio is not None:
        lines.append(
            f"* `two` / `one`, same round: infer/s {_fmt(ratio['infer_per_s_ratio'], 3)}, p50 "
            f"{_fmt(ratio['p50_ratio'], 3)}, p99 {_fmt(ratio['p99_ratio'], 3)}, gateway CPU per "
            f"request {_fmt(ratio['gateway_cpu_per_request_ratio'], 3)}."
        )
    for name in ("one", "two"):
        if name in at and "state_errors_per_request" in at[name]:
            lines.append(
                f"* `{name}`: {num(name, 'state_errors_per_request')} state errors per "
                "request: Redis calls that failed or took over `state.timeout_ms` (50 ms), "
                "answered as `on_error` says, "
                f"while Redis kept {num(name, 'redis_cores')} of a core busy."
            )
    redis_us = _median(at.get("two") or at.get("one"), REDIS_CPU)
    redis_bound = ""
    if redis_us:
        redis_bound = f" (about {1e6 / redis_us:,.0f} requests/s at {redis_us:.0f} us each)"
    lines += [
        "",
        "A second worker adds a second event loop, not a core. Here perf_analyzer, the "
        "gateway's processes and Redis share 2 cores with whatever else runs on the machine, "
        "and the client alone keeps about half a core or more busy (its cores in the table). "
        "One worker is bound by its one event loop and, when nothing else runs, leaves part of "
        "the machine idle (`machine` below 2); a second worker can use that part, a fraction of "
        "a core and no more, and it makes every request dearer: two processes compete for the "
        "same cores with each other, the client and Redis, each has fixed costs of its own "
        "(interpreter, scheduler, Redis connections, budget sync, metrics) and batches only the "
        "requests it received (compare the gateway and Redis CPU per request). So expect about "
        "1x, or less. When the machine is full, what `two` gains over `one`, if anything, it "
        "takes from the rest of the machine (two runnable processes get more of a shared CPU "
        "than one: compare the gateway and `other` cores). The state errors are the event "
        "loop's saturation too: Redis is far from busy, its replies wait for a busy loop. On a "
        "host with cores to spare each worker gets a core of its own and the workers' rates add "
        "up until something shared binds: the client, or Redis, a single thread whose CPU per "
        "request bounds it" + redis_bound + ".",
    ]
    return lines


def markdown(meta: dict[str, Any], cells: list[dict[str, Any]], costs: list[dict[str, Any]]) -> str:
    lines = ["# Replicas benchmark", ""]
    if meta.get("note"):
        lines += [f"**{meta['note']}**", ""]
    lines += [f"`{json.dumps({k: v for k, v in meta.items() if k != 'note'})}`", ""]
    lines += [
        "One gateway process (`one`, `--workers 1`) against two worker processes sharing its "
        "port with SO_REUSEPORT (`two`, `--workers 2`), both with their per-request state (a "
        "rate limit, a budget and the response cache on the tenant's requests) in one Redis on "
        "loopback; `one-memory` is `one` with the state in the process. The MLP passthrough, "
        "deterministic and priced; perf_analyzer `-b 1` unary with `--request-parameter "
        f"tenant:bench:string` and {meta['channel_share']} thread(s) per gRPC connection, rows "
        f"from a file ({meta['input_data']}, `cache.ttl_s` {meta['cache_ttl_s']}), "
        f"`state.budgets_on_error` {meta['budgets_on_error']}; bounded "
        "cells (three windows each), alternating rounds; medians over rounds with the range in "
        "brackets. CPU per request: from /proc over the perf_analyzer run, over the requests "
        "`gateway_requests_total` counted (summed over the workers' metrics ports); gateway: "
        "the whole process group (supervisor and workers). Cores: CPU seconds over the cell's "
        "wall time; machine: /proc/stat's busy time, `other` what is left of it after the "
        "gateway, Redis and the client (other processes on the machine). Worker shares: each "
        "worker's part of the requests, per round.",
        "",
        "## Ratios (per round, same round)",
        "",
        "| this / against | conc | infer/s ratio | p50 ratio | p99 ratio "
        "| gateway CPU/req ratio | rounds |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for c in costs:
        lines.append(
            f"| {c['this']} / {c['against']} | {c['concurrency']} | "
            f"{_fmt(c['infer_per_s_ratio'], 3)} | {_fmt(c['p50_ratio'], 3)} | "
            f"{_fmt(c['p99_ratio'], 3)} | {_fmt(c['gateway_cpu_per_request_ratio'], 3)} | "
            f"{c['rounds']} |"
        )
    lines += [
        "",
        "## Cells",
        "",
        "| config | conc | infer/s | p50 ms | p99 ms | gateway CPU us/req | Redis CPU us/req "
        "| client CPU us/req | cores: gateway / Redis / client / other / machine "
        "| worker shares per round | cache answered | state errors/req | errors |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | ---: | ---: | --- |",
    ]
    for c in cells:
        cores = " / ".join(
            _fmt(c.get(k), 2)
            for k in ("gateway_cores", "redis_cores", "client_cores", "other_cores")
        )
        by_concern = ", ".join(f"{k} {n}" for k, n in c["state_errors_by_concern"].items())
        errors = _fmt(c.get("state_errors_per_request"), 3) + (
            f" ({by_concern} in all)" if by_concern else ""
        )
        lines.append(
            f"| {c['server']} | {c['concurrency']} | {_fmt(c.get('infer_per_s'), 0)} | "
            f"{_fmt(c.get('p50_ms'), 2)} | {_fmt(c.get('p99_ms'), 2)} | "
            f"{_fmt(c.get(GATEWAY_CPU))} | {_fmt(c.get(REDIS_CPU))} | {_fmt(c.get(CLIENT_CPU))} | "
            f"{cores} / {_fmt(c.get('machine_busy_cores'), 2)} | {_shares(c)} | "
            f"{_fmt(c.get('cache_answered_share'), 2)} | {errors} | "
            f"{'; '.join(c.get('errors', []))} |"
        )
    lines += ["", *cores_prose(cells, costs)]
    return "\n".join(lines) + "\n"


# --- main ------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--configs", default=",".join(CONFIGURATIONS), help="comma-separated")
    parser.add_argument("--concurrency", default="64")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--interval-ms", type=int, default=2500, help="perf_analyzer window")
    parser.add_argument(
        "--stability", type=int, default=1000, help="perf_analyzer --stability-percentage"
    )
    parser.add_argument("--transport", choices=["native", "grpcio"], default="native")
    parser.add_argument("--data-rows", type=int, default=20_000, help="rows in the input file")
    parser.add_argument("--hot-share", type=float, default=0.4, help="share of repeated rows")
    parser.add_argument("--ttl-s", type=float, default=1.0, help="cache.ttl_s")
    parser.add_argument(
        "--channel-share",
        type=int,
        default=1,
        help=f"perf_analyzer threads per gRPC connection ({CHANNEL_SHARE_ENV})",
    )
    parser.add_argument(
        "--budgets-on-error",
        choices=["fail_open", "fail_closed"],
        default="fail_open",
        help="state.budgets_on_error (fail_closed: a budget sync over 1 s aborts the cell)",
    )
    parser.add_argument("--perf-analyzer")
    parser.add_argument("--server-cpus", help="taskset CPU list for the gateways and Redis")
    parser.add_argument("--client-cpus", help="taskset CPU list for perf_analyzer")
    parser.add_argument("--note", default="", help="a line for the results' header")
    parser.add_argument("--work", type=Path, default=ROOT / ".bench" / "replicas")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "replicas")
    args = parser.parse_args()

    names = [n for n in args.configs.split(",") if n]
    if unknown := [n for n in names if n not in CONFIGURATIONS]:
        parser.error(f"unknown configurations {unknown}; known: {list(CONFIGURATIONS)}")
    concurrencies = [int(c) for c in args.concurrency.split(",") if c]
    pa = find_perf_analyzer(args.perf_analyzer)
    args.work.mkdir(parents=True, exist_ok=True)
    repo = build_repository(args.work)
    data = args.work / "input-data.json"
    data.write_text(json.dumps({"data": input_rows(args.data_rows, args.hot_share)}))
    client = client_command(pa, TENANT, args.channel_share, args.work / "pa-replicas.sh")

    started_at = time.time()
    rows: list[dict[str, Any]] = []
    with ExitStack() as stack:
        store = start_redis(stack, args.work, args.server_cpus)
        targets: dict[str, ReplicaTarget] = {}
        for name in names:
            backend, workers = CONFIGURATIONS[name]
            settings = gateway_settings(backend, store.url, args.ttl_s)
            if backend == "redis":
                state = settings["state"]
                assert isinstance(state, dict)
                state["budgets_on_error"] = args.budgets_on_error
            label = f"{name}-{args.transport}"  # _gateway reads the transport from the name
            extra = ["--workers", str(workers)]
            proc, url, metrics = _gateway(
                stack, label, repo, settings, args.work, extra, args.server_cpus
            )
            metrics_urls = metrics.split(",")  # the supervisor names each worker's
            if len(metrics_urls) != workers:
                sys.exit(f"{name}: {workers} workers but metrics at {metrics!r}")
            targets[name] = ReplicaTarget(
                name,
                proc,
                url,
                "mlp",
                data=data,
                metrics_url=metrics_urls[0],
                transport_log=transport_line(proc.text()),
                metrics_urls=metrics_urls,
            )
        for round_ in range(args.rounds):
            for concurrency in concurrencies:
                for name in round_order(names, round_):
                    row = measure_cell(
                        name, targets[name], client, store, concurrency, round_, args
                    )
                    rows.append(row)
                    print(json.dumps(row), flush=True)
        # The budget is the tenant's alone: spend on it shows perf_analyzer's parameter arrived.
        spent = {name: t.state_counters()["spent"] for name, t in targets.items()}
        redis_version = store.client.info("server")["redis_version"]
    for name, value in spent.items():
        if not value > 0:
            print(f"note: {name}: nothing spent on tenant {TENANT!r}'s budget", flush=True)
    meta: dict[str, Any] = {
        **run_meta(started_at),
        "revision": tree_revision(),
        "perf_analyzer": "2.51 (grpc, -b 1, unary, --input-data, --request-parameter tenant)",
        "channel_share": args.channel_share,
        "interval_ms": args.interval_ms,
        "stability_percentage": args.stability,
        "rounds": args.rounds,
        "transport": args.transport,
        "input_data": f"{args.data_rows} rows, {args.hot_share:.0%} from {HOT_ROWS} hot rows",
        "cache_ttl_s": args.ttl_s,
        "budgets_on_error": args.budgets_on_error,
        "redis": f"Redis {redis_version}, loopback, no persistence, noeviction",
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
