"""Multi-process mode: N gateway processes share one port through SO_REUSEPORT.

The kernel spreads incoming connections over the workers; each worker is a whole gateway with
its own scheduler, model sessions and metrics port (``metrics_port + i``, or any free port).
Trade-off: N processes use N times the model memory and batch independently (a batch only
merges requests that reached the same worker), and gRPC keeps a connection on one worker, so
a client with a single channel talks to a single worker. Worth it when one process's event
loop is the bottleneck and the host has cores to spare; on two cores, one process is better.

The supervisor (this module) runs no event loop: it starts the workers, waits until each has
written its ready file, forwards SIGTERM/SIGINT to them, and if one dies, stops the rest.
Workers die with their supervisor however it ends, SIGKILL included (see watch_supervisor).
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from gateway.errors import SettingsError
from gateway.settings import Settings

__all__ = ["READY_FILE_ENV", "supervise", "watch_supervisor"]

log = logging.getLogger(__name__)

READY_FILE_ENV = "GATEWAY_READY_FILE"
# How a worker knows its supervisor: its pid, and the read end of the lifeline pipe.
SUPERVISOR_PID_ENV = "GATEWAY_SUPERVISOR_PID"
SUPERVISOR_FD_ENV = "GATEWAY_SUPERVISOR_FD"
_START_TIMEOUT_S = 120.0
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def _reserve_port(host: str, port: int) -> socket.socket:
    """Bind (without listening) so the port stays ours and port 0 becomes a real number."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise SettingsError(f"server.port: cannot bind {host}:{port}: {err.strerror}") from None
    return sock


def supervise(settings: Settings, argv: Sequence[str]) -> int:
    """Run ``settings.server.workers`` worker processes of ``gateway serve`` until signalled."""
    workers = settings.server.workers
    host = settings.server.host
    reserved = _reserve_port(host, settings.server.port)
    port = reserved.getsockname()[1]
    metrics_port = settings.telemetry.metrics_port
    stop_requested = False

    def request_stop(signum: int, _frame: object) -> None:
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)

    # The workers' lifeline: os.pipe's ends are not inherited and each worker is passed only
    # the read end, so the write end is this process's alone and they read EOF once it is gone.
    lifeline, lifeline_writer = os.pipe()
    processes: list[subprocess.Popen[bytes]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="gateway-workers-") as tmp:
            ready_files = []
            for index in range(workers):
                ready = Path(tmp) / f"worker-{index}.json"
                ready_files.append(ready)
                env = {
                    **os.environ,
                    READY_FILE_ENV: str(ready),
                    SUPERVISOR_PID_ENV: str(os.getpid()),
                    SUPERVISOR_FD_ENV: str(lifeline),
                    "GATEWAY_SERVER__WORKERS": "1",
                    "GATEWAY_SERVER__REUSE_PORT": "true",
                    "GATEWAY_SERVER__PORT": str(port),
                }
                if metrics_port:
                    env["GATEWAY_TELEMETRY__METRICS_PORT"] = str(metrics_port + index)
                command = [sys.executable, "-m", "gateway", *argv, "--port", str(port)]
                if settings.events.sidecar is not None:
                    # One write-ahead log per worker: a log has one writer (it is locked).
                    worker_log = Path(settings.events.directory) / f"worker-{index}"
                    command += ["--events-dir", str(worker_log)]
                processes.append(subprocess.Popen(command, env=env, pass_fds=(lifeline,)))
            os.close(lifeline)
            lifeline = -1

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
                "gateway ready grpc=%s:%d metrics=%s workers=%d pids=%s",
                host,
                port,
                ",".join(metrics),
                workers,
                ",".join(str(p.pid) for p in processes),
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
        if lifeline >= 0:
            os.close(lifeline)
        os.close(lifeline_writer)
        reserved.close()


def watch_supervisor() -> None:
    """In a worker process, stop it (as SIGTERM does: drain, then exit) once its supervisor
    is gone; a no-op in any other process. Call it first thing, before loading models.

    Two independent signs, so that neither a missed signal nor a platform without
    ``prctl`` leaves an orphan serving on the port: the kernel's parent-death signal (Linux),
    and EOF on the lifeline pipe (anywhere). A supervisor that died before this runs is
    noticed too: this process then has another parent, and the pipe is already at EOF.
    """
    pid_text = os.environ.pop(SUPERVISOR_PID_ENV, None)
    fd_text = os.environ.pop(SUPERVISOR_FD_ENV, None)  # not for this worker's own children
    if pid_text is None or fd_text is None:
        return
    supervisor, lifeline = int(pid_text), int(fd_text)
    os.set_inheritable(lifeline, False)
    if sys.platform.startswith("linux"):
        _set_parent_death_signal(signal.SIGTERM)
    if os.getppid() != supervisor:  # gone before the line above took effect
        raise SystemExit(f"gateway worker: the supervisor (pid {supervisor}) is gone")

    def watch() -> None:
        try:
            while os.read(lifeline, 1):  # the supervisor never writes: this waits for EOF
                pass
        except OSError as err:
            log.warning("supervisor lifeline unreadable (%s): taking it as gone", err)
        log.warning("the supervisor (pid %d) is gone: this worker stops", supervisor)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="supervisor-watch", daemon=True).start()


def _set_parent_death_signal(sig: int) -> None:
    """Ask Linux to send ``sig`` to this process when its parent exits. The parent *thread*,
    strictly: the supervisor starts its workers from its main thread, which lives as long as
    the supervisor does."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        failed = libc.prctl(_PR_SET_PDEATHSIG, ctypes.c_ulong(sig), 0, 0, 0) != 0
    except (OSError, AttributeError):  # no prctl here: the lifeline pipe is enough
        return
    if failed:
        log.warning("prctl(PR_SET_PDEATHSIG) failed: %s", os.strerror(ctypes.get_errno()))


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
