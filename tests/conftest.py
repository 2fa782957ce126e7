"""Shared fixtures: the demo repository, a real gateway process on 127.0.0.1, real clients.

tritonclient registers its own ``inference.*`` protobuf messages, so this process must never
import the gateway's generated ``inference`` modules: the gateway always runs in a child
process here, which is how a real client meets it anyway. Importing tritonclient first makes
an accidental in-process import fail loudly ("duplicate symbol") instead of passing by luck.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from prometheus_client.parser import text_string_to_metric_families

from gateway.demo import build_demo_repository

READY = re.compile(r"gateway ready grpc=(\S+) metrics=(\S+)(?: http=(\S+))?")
SIDECAR_READY = re.compile(r"sidecar ready grpc=(\S+) metrics=(\S+) http=(\S+)")


def stop_process(process: subprocess.Popen[bytes], sig: int, timeout_s: float) -> int:
    """Signal a child, wait for it (killing it after ``timeout_s``); its exit code."""
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


def _stat(pid: int | str) -> list[str] | None:
    """Fields of ``/proc/PID/stat`` after the command name (state first), None if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def start_time(pid: int) -> str | None:
    """When ``pid`` started (ticks since boot): tells it from a later process of that number."""
    fields = _stat(pid)
    return fields[19] if fields else None


def parent_pid(pid: int) -> int | None:
    fields = _stat(pid)
    return int(fields[1]) if fields else None


def process_alive(pid: int, started: str | None = None) -> bool:
    """Whether ``pid`` runs (a zombie does not) and, given its ``start_time``, is that one."""
    fields = _stat(pid)
    return fields is not None and fields[0] not in "ZXx" and started in (None, fields[19])


def wait_gone(pids: Mapping[int, str | None], timeout_s: float) -> list[int]:
    """Poll until none of ``pids`` (pid -> start_time) runs, or ``timeout_s`` passes: the pids
    still running."""
    deadline = time.monotonic() + timeout_s
    while alive := [pid for pid, started in pids.items() if process_alive(pid, started)]:
        if time.monotonic() > deadline:
            return alive
        time.sleep(0.01)
    return []


def _group_members(pgid: int) -> list[int] | None:
    """Running processes of process group ``pgid`` (None: no ``/proc`` here to tell)."""
    if not Path("/proc/self/stat").exists():
        return None
    members = []
    for entry in Path("/proc").iterdir():
        fields = _stat(entry.name) if entry.name.isdigit() else None
        if fields and int(fields[2]) == pgid and fields[0] not in "ZXx":
            members.append(int(entry.name))
    return members


def kill_group(process: subprocess.Popen[bytes], timeout_s: float = 10.0) -> None:
    """SIGKILL ``process`` (started with ``start_new_session``) and every process still in its
    process group, whoever their parent is now, and wait until they are gone."""
    if process.poll() is None:
        process.kill()
        process.wait()
    if _group_members(process.pid) == []:
        return  # nothing left (and the group's number may go to someone else later)
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while members := _group_members(process.pid) or []:
        assert time.monotonic() < deadline, f"processes {members} survived SIGKILL"
        time.sleep(0.01)


def free_port() -> int:
    """A port free on 127.0.0.1 now, for a process that must come back on the same one."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def scrape(metrics_url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Scrape a Prometheus endpoint: {(sample name, labels): value}."""
    with urllib.request.urlopen(f"http://{metrics_url}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def scraped_metric(metrics_url: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in scrape(metrics_url).items() if n == name and wanted <= ls)


class SidecarProcess:
    """``python -m gateway sidecar`` in a child process, on a fixed port (restarts keep it)."""

    def __init__(
        self,
        store: Path,
        port: int,
        workdir: Path,
        *args: str,
        env: dict[str, str] | None = None,
    ) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.store = store
        self.stderr_path = workdir / f"sidecar-{time.monotonic_ns()}.log"
        command = [sys.executable, "-m", "gateway", "sidecar", "--store", str(store)]
        command += ["--port", str(port), *args]
        with self.stderr_path.open("wb") as err:
            self.process = subprocess.Popen(
                command, stdout=err, stderr=err, env={**os.environ, **(env or {})}
            )
        deadline = time.monotonic() + 60
        while not (ready := SIDECAR_READY.search(self.stderr())):
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"sidecar exited with {self.process.returncode}:\n{self.stderr()}"
                )
            assert time.monotonic() < deadline, f"sidecar not ready:\n{self.stderr()}"
            time.sleep(0.05)
        self.address = f"127.0.0.1:{port}"
        self.metrics_url = ready.group(2)  # "off" unless evaluation.metrics_port is set
        self.http_url = ready.group(3)  # "off" unless evaluation.http_port is set

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of ``name`` on its metrics port whose labels include ``labels``."""
        return scraped_metric(self.metrics_url, name, **labels)

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> int:
        return stop_process(self.process, sig, timeout_s)


class GatewayProcess:
    """``python -m gateway serve`` in a child process, logs to files, port chosen by the OS.

    It leads a process group of its own, so that ``kill_all`` also finds what it started (the
    workers of ``--workers``) even once they have another parent.
    """

    def __init__(
        self, repository: Path, workdir: Path, *args: str, env: dict[str, str] | None = None
    ):
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.stdout_path = workdir / "stdout.log"
        self.stderr_path = workdir / "stderr.log"
        command = [sys.executable, "-m", "gateway", "serve", "--repository", str(repository)]
        command += ["--port", "0", "--metrics-port", "0", *args]
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.process = subprocess.Popen(
                command,
                stdout=out,
                stderr=err,
                # TMPDIR: what a killed gateway leaves there (a supervisor's ready files) stays
                # with the test's files; so do files at default relative paths (the audit log).
                env={**os.environ, "TMPDIR": str(workdir), **(env or {})},
                cwd=workdir,
                start_new_session=True,
            )
        try:
            self.url, self.metrics_url, self.http_url = self._wait_ready()
        except BaseException:
            self.kill_all()
            raise

    def _wait_ready(self, timeout_s: float = 60.0) -> tuple[str, str, str]:
        """grpc, metrics and http addresses ("off" where not served)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            match = READY.search(self.stderr())
            if match:
                return match.group(1), match.group(2), match.group(3) or "off"
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"gateway exited with {self.process.returncode}:\n{self.stderr()}"
                )
            time.sleep(0.05)
        raise RuntimeError(f"gateway not ready in {timeout_s} s:\n{self.stderr()}")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def metrics(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        return scrape(self.metrics_url)

    def metric(self, name: str, **labels: str) -> float:
        return scraped_metric(self.metrics_url, name, **labels)

    def wait_in_flight(self, count: int, rpc: str = "ModelInfer", timeout_s: float = 30) -> None:
        """Block until the server holds ``count`` calls of ``rpc`` (it has really got them)."""
        deadline = time.monotonic() + timeout_s
        while self.metric("gateway_requests_in_flight", rpc=rpc) < count:
            assert time.monotonic() < deadline, f"{count} {rpc} calls never got in flight"
            time.sleep(0.005)

    def client(self) -> triton_grpc.InferenceServerClient:
        return triton_grpc.InferenceServerClient(self.url)

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> int:
        return stop_process(self.process, sig, timeout_s)

    def kill_all(self) -> None:
        """SIGKILL the gateway and anything it started that still runs; wait until all are gone."""
        kill_group(self.process)


@pytest.fixture(autouse=True, scope="session")
def _state_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """What gateways make on first use in the user's state directory (the events hash key)
    lands in the session's temporary directory, never in the real home."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_STATE_HOME", str(tmp_path_factory.mktemp("state")))
        yield


@pytest.fixture(scope="session")
def demo_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo repository, built once per session; tests copy it before changing it."""
    root = tmp_path_factory.mktemp("demo-repo")
    build_demo_repository(root, seed=7, rows=4000)
    return root


@pytest.fixture
def repo_copy(demo_repo: Path, tmp_path: Path) -> Path:
    """A private copy of the demo repository a test may change."""
    target = tmp_path / "repo"
    shutil.copytree(demo_repo, target)
    return target


@pytest.fixture
def start_gateway(tmp_path: Path) -> Iterator[Callable[..., GatewayProcess]]:
    """Start gateways for one test; any still running at teardown are killed (no leaks)."""
    started: list[GatewayProcess] = []

    def start(repository: Path, *args: str, env: dict[str, str] | None = None) -> GatewayProcess:
        proc = GatewayProcess(repository, tmp_path / f"gateway-{len(started)}", *args, env=env)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.kill_all()


@pytest.fixture
def start_sidecar(tmp_path: Path) -> Iterator[Callable[..., SidecarProcess]]:
    """Start sidecars for one test (the same store and port again is a restart)."""
    started: list[SidecarProcess] = []

    def start(
        store: Path, port: int, *args: str, env: dict[str, str] | None = None
    ) -> SidecarProcess:
        proc = SidecarProcess(store, port, tmp_path / "sidecar-logs", *args, env=env)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop(signal.SIGKILL, timeout_s=10)


def serving(repository: Path, workdir: Path, *args: str) -> Iterator[GatewayProcess]:
    """A gateway (``gateway serve`` ``args``) for a fixture's lifetime; it must exit cleanly
    (code 0) when that ends."""
    proc = GatewayProcess(repository, workdir, *args)
    try:
        yield proc
    finally:
        code = proc.stop()
        proc.kill_all()
    assert code == 0, proc.stderr()


@pytest.fixture(scope="module")
def gateway(demo_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """A gateway serving the demo repository, shared by one test module (a module may
    override this fixture to serve its own repository; ``client`` then talks to that)."""
    yield from serving(demo_repo, tmp_path_factory.mktemp("gateway"))


@pytest.fixture
def client(gateway: GatewayProcess) -> Iterator[triton_grpc.InferenceServerClient]:
    c = gateway.client()
    yield c
    c.close()


# Columns of the demo model's ``features`` input (its features.yaml: 5 numeric features and
# one-hot merchant_category, channel and country, each with an out-of-vocabulary column).
DEMO_WIDTH = 22


def demo_features(rows: int, seed: int = 11) -> np.ndarray:
    """Dense rows for the demo model's ``features`` input (sent as is: pass-through)."""
    return np.random.default_rng(seed).normal(size=(rows, DEMO_WIDTH)).astype(np.float32)


def demo_json(rows: int = 1, seed: int = 11) -> bytes:
    """``demo_features`` as a KServe v2 REST infer body (JSON tensors)."""
    tensor = {"name": "features", "datatype": "FP32", "shape": [rows, DEMO_WIDTH]}
    data = demo_features(rows, seed).reshape(-1).tolist()
    return json.dumps({"inputs": [tensor | {"data": data}]}).encode()


def demo_input(rows: int = 1, seed: int = 11) -> triton_grpc.InferInput:
    """``demo_features`` as the demo model's ``features`` input of a tritonclient call."""
    tensor = triton_grpc.InferInput("features", [rows, DEMO_WIDTH], "FP32")
    tensor.set_data_from_numpy(demo_features(rows, seed))
    return tensor
