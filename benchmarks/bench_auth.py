"""Auth benchmark: what ``auth.mode: api_key`` and TLS cost the gateway per request, against
``auth.mode: none`` without TLS on the same transport.

    .venv/bin/python benchmarks/bench_auth.py          # the whole run (~5 min)
    .venv/bin/python benchmarks/bench_auth.py --rounds 1 --interval-ms 1000 \\
        --servers none-grpcio,tls-grpcio --concurrency 64 --out /tmp/auth

Servers (``--servers``, all by default), each ``gateway serve --transport <t>`` on 127.0.0.1,
its own process, serving what bench_transport.py's ``passthrough-<t>`` serves (the MLP
32 -> 256 -> 256 -> 1 and nothing else: no route, no cache, no ledger, no events), with one
security configuration:

* ``none-<t>``: ``auth.mode: none``, no TLS: the baseline.
* ``api_key-<t>``: ``auth.mode: api_key`` with a keys file holding the key's SHA-256;
  perf_analyzer sends ``authorization: Bearer <key>`` on every call (``-H``).
* ``tls-grpcio``: TLS on the inference port (``tls.cert_file``, ``tls.key_file``), no auth;
  perf_analyzer verifies the server against the benchmark's CA.
* ``tls+api_key-grpcio``: both.
* ``mtls-grpcio``: ``auth.mode: mtls`` (``tls.client_ca_file``): perf_analyzer presents a
  client certificate whose CN the keys file maps to the tenant.

pygrpc-native has no TLS, so TLS runs on grpcio only and is compared with ``none-grpcio``;
api_key is compared with ``none`` on its own transport. The certificates (ECDSA P-256: a CA, a
server certificate for 127.0.0.1 and localhost, a client certificate) are made in the work
directory by tests/certs.py, the authority the TLS tests use.

perf_analyzer opens its connections at the start of a cell and keeps them, so a cell's CPU
holds one TLS handshake per connection spread over thousands of requests: what is measured is
the steady cost per request (record encryption and decryption, the key's lookup), not the cost
of a handshake.

Before measuring, every server is called without credentials (ModelMetadata, in plaintext and,
for a TLS server, over TLS) and its answers are kept: a server that answers OK where its
configuration asks for a credential is reported, so a cell cannot silently time an open door.

Cells: perf_analyzer ``-b 1``, unary, random data, at concurrency 1 and 64, each bounded as in
bench_transport (three windows of ``--interval-ms``). Rounds (``--rounds``) alternate: for each
cell every server is measured back to back, in the listed order in even rounds and reversed in
odd ones (rotated by one more every two rounds), so each pair is measured in both orders.

Per server and cell: infer/s, p50 and p99 latency, the server's CPU microseconds per request
(its process group's CPU from /proc over the perf_analyzer run, over the requests its
``gateway_requests_total`` counted) and perf_analyzer's. Per round, each configuration against
its baseline from the same round: the ratio of throughputs, the ratio of CPU per request, and
the extra CPU per request in microseconds; medians over rounds with the range.
Results: benchmarks/results/auth.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import secrets
import shlex
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_serving import find_perf_analyzer, run_meta  # noqa: E402
from benchmarks.bench_transport import (  # noqa: E402
    PASSTHROUGH_SETTINGS,
    Target,
    _fmt,
    _gateway,
    _spread,
    build_repositories,
    measure,
    summarize,
    transport_line,
)
from gateway.auth import key_digest  # noqa: E402
from tests.certs import Authority, Issued  # noqa: E402

SERVERS = [
    "none-native",
    "api_key-native",
    "none-grpcio",
    "api_key-grpcio",
    "tls-grpcio",
    "tls+api_key-grpcio",
    "mtls-grpcio",
]
COMPARISONS = [  # (configuration, its baseline)
    ("api_key-native", "none-native"),
    ("api_key-grpcio", "none-grpcio"),
    ("tls-grpcio", "none-grpcio"),
    ("tls+api_key-grpcio", "none-grpcio"),
    ("mtls-grpcio", "none-grpcio"),
]
CLIENT_SUBJECT = "bench-client"
CPU = "server_cpu_us_per_request"


# --- configurations --------------------------------------------------------------------------


@dataclass(frozen=True)
class Security:
    """What a server asks of its callers, read from its name (``tls+api_key-grpcio``)."""

    auth: Literal["none", "api_key", "mtls"]
    tls: bool

    @classmethod
    def of(cls, name: str) -> Security:
        parts = set(name.rsplit("-", 1)[0].split("+"))
        auth: Literal["none", "api_key", "mtls"] = "none"
        if "mtls" in parts:
            auth = "mtls"
        elif "api_key" in parts:
            auth = "api_key"
        return cls(auth, tls=bool(parts & {"tls", "mtls"}))

    @property
    def needs_credential(self) -> bool:
        return self.auth != "none"


@dataclass(frozen=True)
class Credentials:
    """The CA, the server's and the client's certificates, the API key, and the keys file that
    holds the key's hash and the client certificate's subject (both the tenant ``bench``)."""

    ca: Path
    server: Issued
    client: Issued
    key: str
    keys_file: Path


def make_credentials(directory: Path) -> Credentials:
    ca = Authority(directory, "bench-ca")
    key = secrets.token_urlsafe(32)
    keys = [
        {"name": "bench", "key_sha256": key_digest(key), "tenant": "bench"},
        {"name": CLIENT_SUBJECT, "subject": CLIENT_SUBJECT, "tenant": "bench"},
    ]
    keys_file = directory / "keys.yaml"
    keys_file.write_text(yaml.safe_dump({"keys": keys}))
    server, client = ca.issue("gateway", server=True), ca.issue(CLIENT_SUBJECT)
    return Credentials(ca.cert, server, client, key, keys_file)


def gateway_settings(security: Security, creds: Credentials) -> dict[str, object]:
    settings: dict[str, object] = dict(PASSTHROUGH_SETTINGS)
    if security.needs_credential:
        settings["auth"] = {"mode": security.auth, "keys_file": str(creds.keys_file)}
    if security.tls:
        tls = {"cert_file": str(creds.server.cert), "key_file": str(creds.server.key)}
        if security.auth == "mtls":
            tls["client_ca_file"] = str(creds.ca)
        settings["tls"] = tls
    return settings


def client_arguments(security: Security, creds: Credentials) -> list[str]:
    """perf_analyzer's arguments for a server with ``security``."""
    out: list[str] = []
    if security.auth == "api_key":
        # NOTE: no space after the colon: perf_analyzer sends everything after it as the value,
        # and the gateway reads "Bearer " from the value's first character.
        out += ["-H", f"authorization:Bearer {creds.key}"]
    if security.tls:
        out += ["--ssl-grpc-use-ssl", "true", "--ssl-grpc-root-certifications-file", str(creds.ca)]
    if security.auth == "mtls":
        out += ["--ssl-grpc-certificate-chain-file", str(creds.client.cert)]
        out += ["--ssl-grpc-private-key-file", str(creds.client.key)]
    return out


def client_command(pa: str, arguments: list[str], path: Path) -> str:
    """perf_analyzer with ``arguments`` before the cell's own, as one executable at ``path``
    (bench_transport's ``measure`` runs the executable it is given with a cell's arguments)."""
    if not arguments:
        return pa
    path.write_text(f'#!/bin/sh\nexec {shlex.join([pa, *arguments])} "$@"\n')
    path.chmod(0o700)
    return str(path)


def answers_without_credentials(url: str, ca: Path | None) -> dict[str, str]:
    """ModelMetadata's status with no key and no client certificate: in plaintext and, when
    ``ca`` is given, over TLS verified against it."""
    import grpc

    from gateway.api.v1 import inference_pb2 as pb
    from gateway.api.v1 import inference_pb2_grpc as pb_grpc

    channels = {"plaintext": lambda: grpc.insecure_channel(url)}
    if ca is not None:
        tls = grpc.ssl_channel_credentials(root_certificates=ca.read_bytes())
        channels["tls"] = lambda: grpc.secure_channel(url, tls)
    answers = {}
    for kind, channel_for in channels.items():
        with channel_for() as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            try:
                stub.ModelMetadata(pb.ModelMetadataRequest(name="mlp"), timeout=10)
                answers[kind] = "OK"
            except grpc.RpcError as err:
                answers[kind] = err.code().name
    return answers


@dataclass
class Server:
    target: Target
    security: Security
    client: str  # the perf_analyzer executable for this server
    answers: dict[str, str]


def start_server(
    stack: ExitStack,
    name: str,
    repo: Path,
    creds: Credentials,
    pa: str,
    work: Path,
    cpus: str | None,
) -> Server:
    security = Security.of(name)
    settings = gateway_settings(security, creds)
    proc, url, metrics = _gateway(stack, name, repo, settings, work, [], cpus)
    target = Target(
        name, proc, url, "mlp", metrics_url=metrics, transport_log=transport_line(proc.text())
    )
    client = client_command(pa, client_arguments(security, creds), work / f"pa-{name}.sh")
    answers = answers_without_credentials(url, creds.ca if security.tls else None)
    channel = "tls" if security.tls else "plaintext"
    if (answers[channel] == "OK") == security.needs_credential:
        print(f"note: {name} answered {answers[channel]} without credentials", flush=True)
    return Server(target, security, client, answers)


# --- summary ---------------------------------------------------------------------------------


def comparisons(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each configuration against its baseline, per round (both from the same round): the
    ratio of infer/s, the ratio of server CPU per request, the extra CPU per request."""
    by_round: dict[int, dict[tuple[str, int], dict[str, Any]]] = {}
    for row in rows:
        if "error" not in row:
            by_round.setdefault(row["round"], {})[(row["server"], row["concurrency"])] = row
    concurrencies = sorted({row["concurrency"] for row in rows})
    out = []
    for config, base in COMPARISONS:
        for concurrency in concurrencies:
            pairs = [
                (cells[(config, concurrency)], cells[(base, concurrency)])
                for cells in by_round.values()
                if (config, concurrency) in cells and (base, concurrency) in cells
            ]
            if not pairs:
                continue
            with_cpu = [(a[CPU], b[CPU]) for a, b in pairs if CPU in a and CPU in b]
            per_round = {
                "infer_per_s_ratio": [a["infer_per_s"] / b["infer_per_s"] for a, b in pairs],
                "cpu_per_request_ratio": [a / b for a, b in with_cpu],
                "cpu_us_per_request_extra": [a - b for a, b in with_cpu],
            }
            entry: dict[str, Any] = {
                "configuration": config,
                "baseline": base,
                "concurrency": concurrency,
            }
            for key, values in per_round.items():
                entry[key] = _spread(values)
            entry["per_round"] = {k: [round(v, 3) for v in vs] for k, vs in per_round.items()}
            out.append(entry)
    return out


def markdown(meta: dict[str, Any], cells: list[dict[str, Any]], costs: list[dict[str, Any]]) -> str:
    lines = ["# Auth benchmark", ""]
    if meta.get("note"):
        lines += [f"**{meta['note']}**", ""]
    lines += [f"`{json.dumps({k: v for k, v in meta.items() if k != 'note'})}`", ""]
    lines += [
        "The gateway serving the MLP passthrough with `auth.mode: api_key`, TLS, both, and "
        "mTLS, against `auth.mode: none` without TLS on the same transport (TLS: grpcio "
        "only). perf_analyzer `-b 1` unary, random data, bounded cells (three windows each), "
        "alternating rounds; medians over rounds with the range in brackets. CPU: the "
        "gateway's process group from /proc over the perf_analyzer run, per request its "
        "`gateway_requests_total` counted; client: perf_analyzer's. Connections are kept "
        "for a whole cell, so TLS is the steady per-request cost, not the handshake.",
        "",
        "## Cost against the baseline (per round, same round)",
        "",
        "| configuration | baseline | conc | infer/s ratio | server CPU/req ratio "
        "| extra server CPU us/req | rounds |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for c in costs:
        lines.append(
            f"| {c['configuration']} | {c['baseline']} | {c['concurrency']} | "
            f"{_fmt(c['infer_per_s_ratio'], 3)} | {_fmt(c['cpu_per_request_ratio'], 3)} | "
            f"{_fmt(c['cpu_us_per_request_extra'])} | {len(c['per_round']['infer_per_s_ratio'])} |"
        )
    lines += [
        "",
        "## Cells",
        "",
        "| server | transport seen | conc | infer/s | p50 ms | p99 ms | server CPU us/req "
        "| client CPU us/req | errors |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    seen = meta.get("transport_seen", {})
    for c in cells:
        lines.append(
            f"| {c['server']} | {seen.get(c['server'], '-')} | {c['concurrency']} | "
            f"{_fmt(c.get('infer_per_s'), 0)} | {_fmt(c.get('p50_ms'), 3)} | "
            f"{_fmt(c.get('p99_ms'), 2)} | {_fmt(c.get(CPU))} | "
            f"{_fmt(c.get('client_cpu_us_per_request'))} | {'; '.join(c.get('errors', []))} |"
        )
    lines += [
        "",
        "## ModelMetadata without credentials",
        "",
        "| server | plaintext | TLS (verified) |",
        "| --- | --- | --- |",
    ]
    for name, answers in meta.get("answers_without_credentials", {}).items():
        lines.append(f"| {name} | {answers['plaintext']} | {answers.get('tls', '-')} |")
    return "\n".join(lines) + "\n"


# --- main ------------------------------------------------------------------------------------


def round_order(names: list[str], round_: int) -> list[str]:
    """The listed order in even rounds, reversed in odd ones, rotated by ``round_ // 2``."""
    shift = (round_ // 2) % len(names)
    order = names[shift:] + names[:shift]
    return order[::-1] if round_ % 2 else order


def tree_revision() -> str:
    done = subprocess.run(
        ["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True, text=True
    )
    return done.stdout.strip() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--servers", default=",".join(SERVERS), help="comma-separated")
    parser.add_argument("--concurrency", default="1,64")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--interval-ms", type=int, default=2500, help="perf_analyzer window")
    parser.add_argument(
        "--stability", type=int, default=1000, help="perf_analyzer --stability-percentage"
    )
    parser.add_argument("--perf-analyzer")
    parser.add_argument("--server-cpus", help="taskset CPU list for the gateways")
    parser.add_argument("--client-cpus", help="taskset CPU list for perf_analyzer")
    parser.add_argument("--note", default="", help="a line for the results' header")
    parser.add_argument("--work", type=Path, default=ROOT / ".bench" / "auth")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "auth")
    args = parser.parse_args()

    names = [s for s in args.servers.split(",") if s]
    if unknown := [n for n in names if n not in SERVERS]:
        sys.exit(f"unknown servers {unknown}: choose from {SERVERS}")
    concurrencies = [int(c) for c in args.concurrency.split(",") if c]
    pa = find_perf_analyzer(args.perf_analyzer)
    args.work.mkdir(parents=True, exist_ok=True)
    repo = build_repositories(args.work)["passthrough"]
    creds = make_credentials(args.work / "credentials")

    started_at = time.time()
    rows: list[dict[str, Any]] = []
    with ExitStack() as stack:
        # Every server runs for the whole benchmark, so each cell is measured on all of them
        # back to back.
        servers = {
            name: start_server(stack, name, repo, creds, pa, args.work, args.server_cpus)
            for name in names
        }
        seen = {
            name: "native" if s.target.proc.native_threads() else "grpcio"
            for name, s in servers.items()
        }
        for name, transport in seen.items():
            if not name.endswith(f"-{transport}"):
                print(f"note: {name} serves on {transport}", flush=True)
        for round_ in range(args.rounds):
            for concurrency in concurrencies:
                for name in round_order(names, round_):
                    server = servers[name]
                    row = measure(server.client, server.target, "unary", concurrency, round_, args)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    meta: dict[str, Any] = {
        **run_meta(started_at),
        "revision": tree_revision(),
        "perf_analyzer": "2.51 (grpc, -b 1, unary, random data)",
        "interval_ms": args.interval_ms,
        "stability_percentage": args.stability,
        "rounds": args.rounds,
        "transport_seen": seen,
        "answers_without_credentials": {n: s.answers for n, s in servers.items()},
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
