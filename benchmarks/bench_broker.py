"""Broker benchmark: Redis Streams against NATS JetStream as the durable hop between the
gateway's event write-ahead log and the sidecar, on this machine, over loopback.

    .venv/bin/python benchmarks/bench_broker.py                 # the whole run (~1.5 min)
    .venv/bin/python benchmarks/bench_broker.py --rounds 1 --events 20000 --out /tmp/broker

Needs ``redis-server`` and, for NATS, ``nats-server`` (Debian: ``apt-get install
nats-server``) and the ``nats-py`` client in the venv (``.venv/bin/pip install nats-py``; it
is not a gateway dependency). Without either, NATS is skipped with a message and Redis alone
is measured.

Servers, each started once by this script on a free 127.0.0.1 port in a temporary directory
and stopped by PID at the end (after an error too: SIGTERM, then SIGKILL):

* Redis: ``--appendonly yes --appendfsync everysec --save ""``, otherwise Redis' defaults
  (the AOF is written before a reply is sent and fsynced once a second; automatic AOF
  rewrites at 64 MB stay on: their forked children's CPU is counted as the server's).
* NATS: ``jetstream { store_dir }``, otherwise the server's defaults; the stream is file
  storage, one replica, work-queue retention (a message is removed once acknowledged, as
  Redis' XDEL below does). JetStream acknowledges a publish once the message is written to its
  block file (the OS page cache) and fsyncs on its own timer, not per message: Debian's
  nats-server 2.9 rejects ``sync_interval`` (later servers: default 2 min, or ``always``).
  Both survive a crash of the server process; on an OS crash Redis loses at most about the
  last second, JetStream possibly more: Redis is the slightly stronger of the two here.

Payloads: real ``EventBatch`` bytes (gateway.api.v1.events_pb2), ``--batch-sizes`` events per
batch (64 and 512), each ``PredictionEvent`` carrying 6-20 numeric features with their names,
a probability output, segments and ids (about 300-600 bytes each); a pool of 8 distinct
batches per size is built up front and cycled, so the clients' CPU is the broker's work only.

Cell (one broker, one batch size): a fresh stream and durable consumer, then two processes:

* the consumer (the sidecar's part) is started first and waits: Redis ``XREADGROUP ... COUNT
  --fetch BLOCK 1000`` then one pipeline of ``XACK`` + ``XDEL`` of the ids read; NATS a pull
  consumer (explicit ack), ``fetch(--fetch)`` then ``msg.ack()`` each (acks are not awaited
  singly; a ``flush()`` round trip at the end makes the last one count). No decoding and no
  database: its CPU is the broker client's alone.
* the publisher (the gateway's part): one connection, up to ``--window`` batches in flight,
  each awaiting the server's reply, which is the durability confirmation: Redis ``XADD`` on one
  raw connection (a writer task sends, a reader task reads the replies in order); NATS
  ``js.publish_async`` (the publish ack).

Per cell: events/s end to end (the publisher's first send -> the consumer's last ack
confirmed, both on CLOCK_MONOTONIC), the publisher's, the consumer's and the server's CPU
microseconds per event (each client's own ``process_time`` over its work; the server's
utime+stime(+children) from /proc over the cell), the server's bytes written per event
(/proc/<pid>/io), and p50/p99 of the publish -> ack latency per batch. Rounds (``--rounds``)
alternate the brokers (Redis first in even rounds, NATS first in odd ones) for each batch
size, after one short discarded cell per broker and size. Three busy processes share two
cores, so events/s is contended; CPU per event is the steadier measure. Results:
benchmarks/results/broker.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

STREAM = "events"  # Redis key, NATS stream name and subject
GROUP = "sidecar"  # Redis consumer group, NATS durable consumer
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------- payloads


def build_pool(batch: int, pool: int, seed: int) -> list[bytes]:
    """``pool`` distinct encoded EventBatch messages of ``batch`` events each."""
    import numpy as np

    from gateway.api.v1 import events_pb2 as ev

    rng = np.random.default_rng(seed)
    out = []
    now_us = time.time_ns() // 1000
    for b in range(pool):
        events = []
        for i in range(batch):
            n = int(rng.integers(6, 21))
            event = ev.PredictionEvent(
                event_id=f"{rng.integers(1 << 62):016x}-{b}-{i}",
                request_id=f"req-{rng.integers(1 << 40):x}",
                event_time_us=now_us + i,
                arrival_time_us=now_us + i + 150,
                tenant="acme",
                surface="checkout",
                route="fraud",
                model="fraud",
                version="2",
                arm="primary",
                segments={"country": "DE", "channel": "web"},
                contract_version="v2",
                rows=1,
                queue_ms=0.04,
                compute_ms=0.25,
                total_ms=0.8,
                cost=1e-6,
                entity_key=f"user-{rng.integers(1 << 30)}",
            )
            event.features.numeric_names.extend(f"features[{j}]" for j in range(n))
            event.features.numbers = rng.normal(size=n).astype("<f8").tobytes()
            event.outputs.add(name="probability", values=rng.random(1).tobytes(), width=1)
            events.append(event)
        out.append(ev.EventBatch(sequence=b, events=events).SerializeToString())
    return out


def write_pool(path: Path, pool: list[bytes]) -> None:
    path.write_bytes(b"".join(struct.pack("<I", len(p)) + p for p in pool))


def read_pool(path: Path) -> list[bytes]:
    data, pool, at = path.read_bytes(), [], 0
    while at < len(data):
        (n,) = struct.unpack_from("<I", data, at)
        pool.append(data[at + 4 : at + 4 + n])
        at += 4 + n
    return pool


# ---------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_cpu(pid: int) -> float:
    """utime + stime + cutime + cstime (the last two: reaped children, e.g. AOF rewrites)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return sum(int(f) for f in fields[11:15]) / CLOCK_TICKS


def proc_write_bytes(pid: int) -> int | None:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/io").read_text().splitlines():
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    return None


@contextlib.contextmanager
def server(command: list[str], port: int, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Start ``command``, wait for its port to accept, stop it by PID on the way out."""
    with log.open("wb") as err:
        process = subprocess.Popen(
            command, stdout=err, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{command[0]} did not start:\n{log.read_text()}")
            time.sleep(0.05)
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def redis_command(work: Path, port: int) -> list[str]:
    exe = shutil.which("redis-server") or "/usr/bin/redis-server"
    return [
        exe, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(work),
        "--appendonly", "yes", "--appendfsync", "everysec", "--save", "",
        "--protected-mode", "no", "--daemonize", "no",
    ]  # fmt: skip


def nats_command(work: Path, port: int) -> list[str]:
    exe = shutil.which("nats-server") or "/usr/sbin/nats-server"
    conf = work / "nats.conf"
    conf.write_text(
        f'listen: "127.0.0.1:{port}"\n'
        f'jetstream {{ store_dir: "{work / "js"}" }}\n'
        "max_payload: 8MB\n"
    )
    return [exe, "-c", str(conf)]


def nats_module(name: str) -> Any:
    """nats-py, imported by name: it is this benchmark's alone, not a gateway dependency (nor
    installed for type checking)."""
    return importlib.import_module(name)


def nats_missing() -> str | None:
    try:
        nats_module("nats")
    except ImportError:
        return "nats-py is not installed (.venv/bin/pip install nats-py)"
    if not (shutil.which("nats-server") or Path("/usr/sbin/nats-server").exists()):
        return "nats-server is not installed (apt-get install nats-server)"
    return None


def server_version(command: str) -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run([command, "--version"], capture_output=True, text=True, timeout=10)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    return "?"


# ---------------------------------------------------------------- clients (child processes)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def redis_publish(port: int, pool: list[bytes], count: int, window: int) -> dict[str, Any]:
    from redis.asyncio.connection import Connection

    conn = Connection(host="127.0.0.1", port=port)
    await conn.connect()
    slots = asyncio.Semaphore(window)
    sent_at: list[float] = []
    latencies: list[float] = []

    async def reader() -> None:
        for i in range(count):
            reply = await conn.read_response()
            if isinstance(reply, Exception):
                raise reply
            latencies.append(time.monotonic() - sent_at[i])
            slots.release()

    cpu, started = time.process_time(), time.monotonic()
    reading = asyncio.create_task(reader())
    for i in range(count):
        await slots.acquire()
        sent_at.append(time.monotonic())
        await conn.send_packed_command(
            conn.pack_command("XADD", STREAM, "*", "b", pool[i % len(pool)]), check_health=False
        )
    await reading
    cpu, ended = time.process_time() - cpu, time.monotonic()
    await conn.disconnect()
    return {"started": started, "ended": ended, "cpu_s": cpu, "latencies": latencies}


async def redis_consume(port: int, count: int, fetch: int, ready: Any) -> dict[str, Any]:
    import redis.asyncio as redis

    client = redis.Redis(host="127.0.0.1", port=port)
    await client.delete(STREAM)
    await client.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    ready()
    cpu, got, nbytes = time.process_time(), 0, 0
    while got < count:
        reply: Any = await client.xreadgroup(GROUP, "c1", {STREAM: ">"}, count=fetch, block=1000)
        if not reply:
            continue
        entries = reply[0][1]
        ids = [entry_id for entry_id, _ in entries]
        nbytes += sum(len(fields[b"b"]) for _, fields in entries)
        pipe = client.pipeline(transaction=False)
        pipe.xack(STREAM, GROUP, *ids)  # type: ignore[unused-awaitable]
        pipe.xdel(STREAM, *ids)  # type: ignore[unused-awaitable]
        await pipe.execute()
        got += len(ids)
    ended, cpu = time.monotonic(), time.process_time() - cpu
    left = await client.xlen(STREAM)
    await client.aclose()
    return {"ended": ended, "cpu_s": cpu, "messages": got, "bytes": nbytes, "left": left}


async def nats_publish(port: int, pool: list[bytes], count: int, window: int) -> dict[str, Any]:
    nats = nats_module("nats")
    nc = await nats.connect(f"nats://127.0.0.1:{port}", pending_size=64 << 20)
    js = nc.jetstream(publish_async_max_pending=window)
    latencies: list[float] = []
    done = asyncio.Event()

    def acked(sent: float) -> Any:
        def callback(future: asyncio.Future[Any]) -> None:
            future.result()  # a publish error fails the run
            latencies.append(time.monotonic() - sent)
            if len(latencies) == count:
                done.set()

        return callback

    await (await js.publish_async(STREAM, b"warm-up"))  # its reply inbox, off the clock
    await js.publish_async_completed()
    latencies.clear()
    cpu, started = time.process_time(), time.monotonic()
    for i in range(count):
        sent = time.monotonic()
        future = await js.publish_async(STREAM, pool[i % len(pool)])
        future.add_done_callback(acked(sent))
    await done.wait()
    cpu, ended = time.process_time() - cpu, time.monotonic()
    await nc.close()
    return {"started": started, "ended": ended, "cpu_s": cpu, "latencies": latencies}


async def nats_consume(port: int, count: int, fetch: int, ready: Any) -> dict[str, Any]:
    nats, api = nats_module("nats"), nats_module("nats.js.api")
    nats_timeout = nats_module("nats.errors").TimeoutError
    not_found = nats_module("nats.js.errors").NotFoundError

    nc = await nats.connect(f"nats://127.0.0.1:{port}", pending_size=64 << 20)
    js = nc.jetstream()
    with contextlib.suppress(not_found):
        await js.delete_stream(STREAM)
    await js.add_stream(
        api.StreamConfig(
            name=STREAM,
            subjects=[STREAM],
            storage=api.StorageType.FILE,
            retention=api.RetentionPolicy.WORK_QUEUE,
            num_replicas=1,
        )
    )
    sub = await js.pull_subscribe(
        STREAM,
        durable=GROUP,
        config=api.ConsumerConfig(ack_policy=api.AckPolicy.EXPLICIT, max_ack_pending=10_000),
        pending_bytes_limit=512 << 20,
    )
    ready()
    cpu, got, nbytes, warm = time.process_time(), 0, 0, False
    while got < count:
        try:
            msgs = await sub.fetch(fetch, timeout=1)
        except nats_timeout:
            continue
        for msg in msgs:
            if not warm and msg.data == b"warm-up":  # the publisher's, not counted
                warm = True
                await msg.ack()
                continue
            nbytes += len(msg.data)
            got += 1
            await msg.ack()
    await nc.flush()  # the server has every ack
    ended, cpu = time.monotonic(), time.process_time() - cpu
    # Work-queue removal on ack is asynchronous in the server: wait for the stream to empty
    # (so the server's CPU for it is in the cell) and report how long that took.
    deadline = time.monotonic() + 10
    while (left := (await js.stream_info(STREAM)).state.messages) and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.005)
    drained = time.monotonic() - ended
    await nc.close()
    return {
        "ended": ended,
        "cpu_s": cpu,
        "messages": got,
        "bytes": nbytes,
        "left": left,
        "drain_ms": round(drained * 1e3, 1),
    }


def child(args: argparse.Namespace) -> None:
    """A publisher or consumer process: prints ``ready`` (consumer), then its result as JSON."""

    def ready() -> None:
        print("ready", flush=True)

    if args.role == "publish":
        pool = read_pool(args.pool)
        publish = {"redis": redis_publish, "nats": nats_publish}[args.broker]
        result = asyncio.run(publish(args.port, pool, args.count, args.window))
    else:
        consume = {"redis": redis_consume, "nats": nats_consume}[args.broker]
        result = asyncio.run(consume(args.port, args.count, args.fetch, ready))
    print(json.dumps(result), flush=True)


# ---------------------------------------------------------------- cells (parent)


def spawn(*extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), *extra],
        stdout=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen[str], what: str, timeout: float) -> dict[str, Any]:
    try:
        out, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise RuntimeError(f"{what} did not finish in {timeout:.0f} s") from None
    if process.returncode != 0:
        raise RuntimeError(f"{what} failed (rc {process.returncode})")
    return json.loads(out.strip().splitlines()[-1])


def cell(
    broker: str, pid: int, port: int, pool_path: Path, batch: int, batches: int, args: Any
) -> dict[str, Any]:
    common = ["--broker", broker, "--port", str(port), "--count", str(batches)]
    consumer = spawn("--role", "consume", *common, "--fetch", str(args.fetch))
    try:
        assert consumer.stdout is not None
        if consumer.stdout.readline().strip() != "ready":
            raise RuntimeError(f"{broker} consumer did not get ready")
        cpu, written = proc_cpu(pid), proc_write_bytes(pid)
        publisher = spawn("--role", "publish", *common, "--window", str(args.window),
                          "--pool", str(pool_path))  # fmt: skip
        pub = finish(publisher, f"{broker} publisher", 120)
        con = finish(consumer, f"{broker} consumer", 120)
    finally:
        if consumer.poll() is None:
            consumer.kill()
            consumer.wait()
    server_cpu = proc_cpu(pid) - cpu
    after = proc_write_bytes(pid)
    events = batches * batch
    if con["messages"] != batches:
        raise RuntimeError(f"{broker}: consumed {con['messages']} of {batches} batches")
    seconds = con["ended"] - pub["started"]
    lat = pub["latencies"]
    return {
        "events": events,
        "batches": batches,
        "bytes_per_batch": round(con["bytes"] / batches),
        "seconds": round(seconds, 3),
        "events_per_s": round(events / seconds),
        "publish_events_per_s": round(events / (pub["ended"] - pub["started"])),
        "publisher_cpu_us_per_event": round(pub["cpu_s"] / events * 1e6, 2),
        "consumer_cpu_us_per_event": round(con["cpu_s"] / events * 1e6, 2),
        "server_cpu_us_per_event": round(server_cpu / events * 1e6, 2),
        "server_write_bytes_per_event": (
            round((after - written) / events) if after is not None and written is not None else None
        ),
        "publish_ack_ms_p50": round(pct(lat, 0.5) * 1e3, 2),
        "publish_ack_ms_p99": round(pct(lat, 0.99) * 1e3, 2),
        "left_in_stream": con["left"],
        **({"ack_drain_ms": con["drain_ms"]} if "drain_ms" in con else {}),
    }


def git_commit() -> str:
    out = subprocess.run(
        ["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True, text=True
    )
    return out.stdout.strip() or "?"


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    keys = [k for k, v in rounds[0].items() if isinstance(v, int | float) and k != "batches"]
    out: dict[str, Any] = {}
    for key in keys:
        values = [r[key] for r in rounds if r.get(key) is not None]
        if values:
            out[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    return out


def fmt(s: dict[str, Any] | None, key: str, digits: int = 1) -> str:
    if not s or key not in s:
        return "-"
    m, lo, hi = s[key]["median"], s[key]["min"], s[key]["max"]
    if digits == 0:
        return f"{m:,.0f} ({lo:,.0f}-{hi:,.0f})"
    return f"{m:.{digits}f} ({lo:.{digits}f}-{hi:.{digits}f})"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--events", type=int, default=1 << 20, help="events per cell")
    parser.add_argument("--batch-sizes", default="64,512")
    parser.add_argument("--brokers", default="redis,nats")
    parser.add_argument("--window", type=int, default=16, help="publishes in flight")
    parser.add_argument("--fetch", type=int, default=16, help="messages per consumer read")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "broker")
    # internal: the client processes
    parser.add_argument("--role", choices=["publish", "consume"], help=argparse.SUPPRESS)
    parser.add_argument("--broker", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--pool", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        child(args)
        return

    started = time.time()
    brokers = args.brokers.split(",")
    skipped: dict[str, str] = {}
    if "nats" in brokers and (why := nats_missing()):
        print(f"skipping NATS JetStream: {why}", file=sys.stderr)
        skipped["nats"] = why
        brokers.remove("nats")
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    cells: dict[str, dict[str, Any]] = {f"{b} x{s}": {"rounds": []} for s in sizes for b in brokers}
    with (
        tempfile.TemporaryDirectory(prefix="bench-broker-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        work = Path(tmp)
        pools = {}
        event_bytes = {}
        for size in sizes:
            pool = build_pool(size, 8, seed=size)
            pools[size] = work / f"pool-{size}.bin"
            write_pool(pools[size], pool)
            event_bytes[size] = round(statistics.mean(len(p) for p in pool) / size)
        servers: dict[str, tuple[int, int]] = {}
        for broker in brokers:
            (work / broker).mkdir()
            port = free_port()
            command = {"redis": redis_command, "nats": nats_command}[broker](work / broker, port)
            proc = stack.enter_context(server(command, port, work / f"{broker}.log"))
            servers[broker] = (proc.pid, port)
        for broker in brokers:  # a short cell each, discarded: first connections, files
            for size in sizes:
                pid, port = servers[broker]
                cell(broker, pid, port, pools[size], size, max(1, 16384 // size), args)
        for r in range(args.rounds):
            for size in sizes:
                order = brokers if r % 2 == 0 else brokers[::-1]
                for broker in order:
                    pid, port = servers[broker]
                    batches = max(1, args.events // size)
                    result = cell(broker, pid, port, pools[size], size, batches, args)
                    cells[f"{broker} x{size}"]["rounds"].append(result)
                    print(
                        f"round {r} {broker:5} x{size}: {result['events_per_s']:>8} ev/s, "
                        f"cpu us/ev pub {result['publisher_cpu_us_per_event']} con "
                        f"{result['consumer_cpu_us_per_event']} server "
                        f"{result['server_cpu_us_per_event']}, ack p50/p99 "
                        f"{result['publish_ack_ms_p50']}/{result['publish_ack_ms_p99']} ms",
                        flush=True,
                    )
    for entry in cells.values():
        entry["median"] = summarize(entry["rounds"])

    meta: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "python": platform.python_version(),
        "git": git_commit(),
        "minutes": round((time.time() - started) / 60, 1),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "redis": server_version(shutil.which("redis-server") or "/usr/bin/redis-server"),
        "nats": server_version(shutil.which("nats-server") or "/usr/sbin/nats-server")
        if "nats" in brokers
        else None,
        "settings": {
            "rounds": args.rounds,
            "events_per_cell": args.events,
            "window": args.window,
            "fetch": args.fetch,
            "event_bytes_mean": event_bytes,
            "redis": "appendonly yes, appendfsync everysec, save '' (XADD * / XREADGROUP /"
            " XACK+XDEL)",
            "nats": "JetStream file storage, server default sync (2.9: periodic, no"
            " sync_interval), R1, work-queue retention, pull consumer, explicit ack",
        },
        "skipped": skipped,
    }
    results = {"meta": meta, **cells}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")

    md = ["# Broker benchmark: Redis Streams vs NATS JetStream", "", f"`{json.dumps(meta)}`", ""]
    if skipped:
        md += [*(f"Skipped: {k}: {v}" for k, v in skipped.items()), ""]
    settings = meta["settings"]
    md += [
        f"Redis: {settings['redis']}. NATS: {settings['nats']}. Publisher: one connection,"
        f" up to {args.window} batches in flight, each awaiting the server's reply (XADD /"
        f" publish ack); consumer: {args.fetch} messages per read, acked after the read."
        f" {args.events} events per cell (~{event_bytes[sizes[0]]} B each, real EventBatch"
        f" bytes), {args.rounds} alternating rounds; medians over rounds (range). CPU in"
        " microseconds per event: each client's own process time, the server's from /proc"
        " (utime+stime, with reaped children). Events/s: publisher's first send -> consumer's"
        " last ack; three busy processes on two cores.",
        "",
        "| broker x events/batch | bytes/batch | events/s end to end | publisher CPU us/ev |"
        " consumer CPU us/ev | server CPU us/ev | server bytes written/ev |"
        " publish ack p50 ms | p99 ms |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, entry in cells.items():
        s = entry["median"]
        md.append(
            f"| {name} | {fmt(s, 'bytes_per_batch', 0).split(' ')[0]} | "
            f"{fmt(s, 'events_per_s', 0)} | {fmt(s, 'publisher_cpu_us_per_event', 2)} | "
            f"{fmt(s, 'consumer_cpu_us_per_event', 2)} | {fmt(s, 'server_cpu_us_per_event', 2)} | "
            f"{fmt(s, 'server_write_bytes_per_event', 0)} | {fmt(s, 'publish_ack_ms_p50', 2)} | "
            f"{fmt(s, 'publish_ack_ms_p99', 2)} |"
        )
    args.out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
