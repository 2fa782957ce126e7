"""Multi-process mode: N gateway processes share one port through SO_REUSEPORT.

The kernel spreads incoming connections over the workers; each worker is a whole gateway with
its own scheduler, model sessions and metrics port: worker ``i`` serves metrics on
``metrics_port + i`` (``--metrics-port 9100``: 9100, 9101, ...), or any free port when it is
0; the ready line lists them in worker order.
Trade-off: N processes use N times the model memory and batch independently (a batch only
merges requests that reached the same worker), and gRPC keeps a connection on one worker, so
a client with a single channel talks to a single worker. Worth it when one process's event
loop is the bottleneck and the host has cores to spare; on two cores, one process is better.

The supervisor (this module) runs no event loop: it starts the workers, waits until each has
written its ready file, forwards SIGTERM/SIGINT to them, and if one dies, stops the rest.
Workers die with their supervisor however it ends, SIGKILL included (gateway.lifeline).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from gateway.errors import SettingsError
from gateway.events.recorder import hash_key
from gateway.lifeline import Lifeline
from gateway.settings import Settings, read_secret

__all__ = ["READY_FILE_ENV", "supervise"]

log = logging.getLogger(__name__)

READY_FILE_ENV = "GATEWAY_READY_FILE"
_START_TIMEOUT_S = 120.0


def _reserve_port(host: str, port: int, what: str = "server.port") -> socket.socket:
    """Bind (without listening) so the port stays ours and port 0 becomes a real number."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise SettingsError(f"{what}: cannot bind {host}:{port}: {err.strerror}") from None
    return sock


def supervise(settings: Settings, argv: Sequence[str]) -> int:
    """Run ``settings.server.workers`` worker processes of ``gateway serve`` until signalled."""
    if settings.events.enabled:
        # Checked (and the default key made) here, once: each worker checks the key against
        # its own log directory only, and would race the others to make it.
        hash_key(settings.events)
        read_secret(settings.events.token, settings.events.token_file, "events.token_file")
    workers = settings.server.workers
    metrics_port = settings.telemetry.metrics_port
    if metrics_port and metrics_port + workers - 1 > 65535:
        raise SettingsError(
            f"telemetry.metrics_port: {workers} workers serve metrics on {metrics_port} to "
            f"{metrics_port + workers - 1}, past port 65535"
        )
    host = settings.server.host
    reserved = _reserve_port(host, settings.server.port)
    port = reserved.getsockname()[1]
    # KServe v2 REST shared the same way: one port, SO_REUSEPORT, every worker listening on it.
    http = None
    if settings.server.http_port is not None:
        http = _reserve_port(host, settings.server.http_port, "server.http_port")
    stop_requested = False

    def request_stop(signum: int, _frame: object) -> None:
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)

    lifeline = Lifeline()  # the workers stop once this process is gone, however it ends
    processes: list[subprocess.Popen[bytes]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="gateway-workers-") as tmp:
            ready_files = []
            for index in range(workers):
                ready = Path(tmp) / f"worker-{index}.json"
                ready_files.append(ready)
                env = {
                    **lifeline.env(os.environ),
                    READY_FILE_ENV: str(ready),
                    "GATEWAY_SERVER__WORKERS": "1",
                    "GATEWAY_SERVER__REUSE_PORT": "true",
                    "GATEWAY_SERVER__PORT": str(port),
                }
                if settings.audit.path is not None:
                    # One audit log per worker: a rotating file has one writer.
                    audit = settings.audit.path
                    env["GATEWAY_AUDIT__PATH"] = str(
                        audit.with_name(f"{audit.name}.worker-{index}")
                    )
                command = [sys.executable, "-m", "gateway", *argv, "--port", str(port)]
                if http is not None:
                    command += ["--http-port", str(http.getsockname()[1])]
                if metrics_port is not None:
                    # A flag, as the port: it outranks the settings file and the environment
                    # (and a --metrics-port in argv, which would give every worker one port).
                    worker_metrics = metrics_port + index if metrics_port else 0
                    command += ["--metrics-port", str(worker_metrics)]
                if settings.events.enabled:
                    # One write-ahead log per worker: a log has one writer (it is locked).
                    worker_log = Path(settings.events.directory) / f"worker-{index}"
                    command += ["--events-dir", str(worker_log)]
                processes.append(subprocess.Popen(command, env=env, pass_fds=(lifeline.fd,)))
            lifeline.started()

            deadline = time.monotonic() + _START_TIMEOUT_S
            while not all(f.exists() for f in ready_files):
                dead = [p for p in processes if p.poll() is not None]
                if dead or stop_requested or time.monotonic() > deadline:
                    _stop_all(processes)
                    return 0 if stop_requested and not dead else 2
                time.sleep(0.05)
            metrics_host = settings.telemetry.metrics_host
            metrics = [
                f"{metrics_host}:{port}" if port else "off"
                for port in (json.loads(f.read_text()).get("metrics") for f in ready_files)
            ]
            log.info(
                "gateway ready grpc=%s:%d metrics=%s workers=%d pids=%s http=%s",
                host,
                port,
                ",".join(metrics),
                workers,
                ",".join(str(p.pid) for p in processes),
                f"{host}:{http.getsockname()[1]}" if http is not None else "off",
            )
            while not stop_requested:
                if any(p.poll() is not None for p in processes):
                    log.error("a worker exited unexpectedly; stopping the others")
                    _stop_all(processes)
                    return 1
                time.sleep(0.2)
            codes = _stop_all(processes)
        return 0 if all(code == 0 for code in codes) else 1
    finally:
        _stop_all(processes)  # a no-op unless something above failed with workers running
        lifeline.close()
        reserved.close()


def _stop_all(processes: list[subprocess.Popen[bytes]]) -> list[int]:
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    codes = []
    for process in processes:
        try:
            codes.append(process.wait(60))
        except subprocess.TimeoutExpired:
            process.kill()
            codes.append(process.wait())
    return codes
