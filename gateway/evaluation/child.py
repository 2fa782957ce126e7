"""``gateway serve --with-sidecar STORE``: the evaluation sidecar as a child of the gateway's
command, so one command runs the whole loop (the sidecar stays its own process)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from gateway.errors import SettingsError
from gateway.lifeline import Lifeline

__all__ = ["SidecarChild", "start_sidecar"]

_READY_TIMEOUT_S = 60.0


class SidecarChild:
    def __init__(self, process: subprocess.Popen[str], lifeline: Lifeline) -> None:
        self.process = process
        self._lifeline = lifeline

    def stop(self, timeout_s: float = 30.0) -> None:
        self._lifeline.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_sidecar(
    store: Path,
    address: str,
    repository: Path | None,
    config: Path | None = None,
    http_port: bool = True,
) -> SidecarChild:
    """Start the sidecar on ``address`` and wait until it serves; its log lines go to this
    process's stderr. ``config``: the gateway's settings file, whose ``evaluation`` section
    (rules, canary policies, ports, auth) the sidecar reads; ``http_port``: HTML reports on the
    next port (unless the section names its own)."""
    host, _, port_text = address.rpartition(":")
    if not host or not (port_text.isascii() and port_text.isdigit()):
        raise SettingsError(f"events.sidecar: {address!r} is not HOST:PORT")
    port = int(port_text)
    command = [sys.executable, "-m", "gateway", "sidecar", "--store", str(store), "--host", host]
    command += ["--port", str(port)]
    if http_port:
        command += ["--http-port", str(port + 1)]
    if repository is not None:
        command += ["--repository", str(repository)]
    if config is not None:
        command += ["--config", str(config)]
    lifeline = Lifeline()  # the sidecar stops once this process is gone, however it ends
    process = subprocess.Popen(
        command,
        stderr=subprocess.PIPE,
        text=True,
        env=lifeline.env(os.environ),
        pass_fds=(lifeline.fd,),
    )
    lifeline.started()
    ready = threading.Event()

    def forward() -> None:  # the child's log, line by line, noting when it is ready
        assert process.stderr is not None
        for line in process.stderr:
            sys.stderr.write(line)
            if "sidecar ready" in line:
                ready.set()

    threading.Thread(target=forward, name="sidecar-log", daemon=True).start()
    child = SidecarChild(process, lifeline)
    waited = 0.0
    while not ready.wait(0.1):
        waited += 0.1
        if process.poll() is not None or waited > _READY_TIMEOUT_S:
            child.stop()
            raise SettingsError(
                f"the evaluation sidecar did not start on {address} (exit code "
                f"{process.returncode}); its log is above"
            )
    return child
