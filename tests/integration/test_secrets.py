"""Secrets stay secret: real gateway and sidecar processes, their logs, metrics, traces, stores.

The key that hashes sensitive feature values lives apart from the event log (never beside it,
0600, checked at start), stays the same across restarts, and may come from the environment.
No secret (admin token, hash key, the sidecar credential, the API keys clients present, right
or wrong) and no sensitive feature value is found in anything the processes write or serve.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import duckdb
import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import yaml
from tritonclient.utils import InferenceServerException

from gateway.auth import key_digest
from gateway.demo import synthetic_transactions
from gateway.features import redact
from gateway.server.admin_client import AdminClient
from tests.auth import wait_until, write_keys
from tests.conftest import GatewayProcess, SidecarProcess, free_port

ADMIN_TOKEN = "admin-token-5b1f0c7e9d2a"
HASH_KEY = "hash-key-0a8e4c2d6f1b3a5c7e9d"
EVENTS_TOKEN = "events-token-7c3e1a9b5d"
WRONG_TOKEN = "wrong-token-e4d2c0b8a6"  # what a client sent: not echoed either
SENSITIVE = "ZZ-sensitive-3f9a1c"  # a value of the demo's sensitive feature, country
SECRETS = (ADMIN_TOKEN, HASH_KEY, EVENTS_TOKEN, WRONG_TOKEN, SENSITIVE)
API_KEY = "api-key-2e8c4a6f0b1d3e5a"  # a tenant's key (auth.mode api_key)
OPS_KEY = "ops-key-9a7c5e3b1d0f2e4c"  # a key with admin rights


def transactions(rows: int, country: str) -> list[triton_grpc.InferInput]:
    """The demo's raw columns (its feature contract applies), every row from ``country``."""
    columns, _ = synthetic_transactions(rows, seed=5)
    columns["country"] = np.array([country] * rows, dtype=object)
    inputs = []
    for name, values in columns.items():
        if values.dtype == object:
            array = np.array([v.encode() for v in values], dtype=object)
            datatype = "BYTES"
        else:
            array = values
            datatype = triton_grpc.np_to_triton_dtype(array.dtype)
        tensor = triton_grpc.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def infer(gateway: GatewayProcess, request_id: str, country: str = "NG", rows: int = 2) -> None:
    client = gateway.client()
    try:
        client.infer("fraud", transactions(rows, country), request_id=request_id)
    finally:
        client.close()


def acked_all(gateway: GatewayProcess) -> bool:
    return (
        gateway.metric("gateway_events_total", outcome="recorded") > 0
        and gateway.metric("gateway_events_backlog", where="memory") == 0
        and gateway.metric("gateway_events_backlog", where="disk") == 0
    )


def stored_countries(sidecar: SidecarProcess) -> dict[str, list[str]]:
    """Stop the sidecar (it must exit 0) and read each request's hashed countries."""
    assert sidecar.stop() == 0, sidecar.stderr()
    with duckdb.connect(str(sidecar.store / "events.duckdb"), read_only=True) as db:
        rows = db.execute("SELECT request_id, strings['country'] FROM events").fetchall()
    return dict(rows)


@pytest.fixture
def start_sidecar_with(tmp_path: Path) -> Iterator[Callable[..., SidecarProcess]]:
    """Sidecars with an environment of their own; killed at teardown if still running."""
    started: list[SidecarProcess] = []

    def start(store: Path, port: int, *args: str, env: Mapping[str, str]) -> SidecarProcess:
        proc = SidecarProcess(store, port, tmp_path / "sidecar-logs", *args, env=dict(env))
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop(signal.SIGKILL, timeout_s=10)


def events_args(port: int, directory: Path) -> tuple[str, ...]:
    return ("--sidecar", f"127.0.0.1:{port}", "--events-dir", str(directory))


def refused_start(start: Callable[[], GatewayProcess]) -> str:
    with pytest.raises(RuntimeError, match="gateway exited with 2") as refused:
        start()
    return str(refused.value)


def test_a_hash_key_file_inside_the_events_directory_fails_the_start(
    demo_repo: Path, start_gateway, tmp_path: Path
):
    log_dir = tmp_path / "events"
    log_dir.mkdir()
    key = log_dir / "keys" / "hash.key"
    key.parent.mkdir()
    key.write_bytes(b"k" * 32)
    key.chmod(0o600)
    env = {"XDG_STATE_HOME": str(tmp_path / "state"), "GATEWAY_EVENTS__HASH_KEY_FILE": str(key)}
    message = refused_start(
        lambda: start_gateway(demo_repo, *events_args(free_port(), log_dir), env=env)
    )
    assert f"gateway: error: events.hash_key_file: {key} is inside events.directory" in message
    assert [p.name for p in log_dir.iterdir()] == ["keys"]  # the log was never opened


def test_a_hash_key_file_others_may_read_fails_the_start(
    demo_repo: Path, start_gateway, tmp_path: Path
):
    key = tmp_path / "keys" / "hash.key"
    key.parent.mkdir()
    key.write_bytes(b"k" * 32)
    key.chmod(0o644)
    env = {"XDG_STATE_HOME": str(tmp_path / "state"), "GATEWAY_EVENTS__HASH_KEY_FILE": str(key)}
    message = refused_start(
        lambda: start_gateway(demo_repo, *events_args(free_port(), tmp_path / "events"), env=env)
    )
    assert f"events.hash_key_file: {key} has mode 0644" in message
    assert f"chmod 600 {key}" in message


def test_the_hash_key_lives_apart_from_the_log_and_survives_a_restart(
    demo_repo: Path, start_gateway, start_sidecar, tmp_path: Path
):
    port, log_dir, state = free_port(), tmp_path / "events", tmp_path / "state"
    sidecar = start_sidecar(tmp_path / "store", port)

    def serve_one(request_id: str, env: dict[str, str]) -> None:
        gateway = start_gateway(demo_repo, *events_args(port, log_dir), env=env)
        infer(gateway, request_id)
        wait_until(lambda: acked_all(gateway), "the event acknowledged")
        assert gateway.stop() == 0

    serve_one("first-run", {"XDG_STATE_HOME": str(state)})
    serve_one("second-run", {"XDG_STATE_HOME": str(state)})  # the same gateway, restarted
    key_file = state / "gateway" / "hash.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(key_file.parent.stat().st_mode) == 0o700
    assert not list(log_dir.rglob("hash.key"))
    # a key from the environment replaces the file's, and no file is made for it
    other_state = tmp_path / "other-state"
    serve_one("env-key", {"XDG_STATE_HOME": str(other_state), "GATEWAY_EVENTS__HASH_KEY": HASH_KEY})
    assert not other_state.exists()

    countries = stored_countries(sidecar)
    key = key_file.read_bytes()
    assert countries["first-run"] == countries["second-run"] == [redact("NG", key)] * 2
    assert countries["env-key"] == [redact("NG", HASH_KEY.encode())] * 2


def test_no_secret_reaches_a_log_metric_trace_store_or_help_text(
    demo_repo: Path, start_gateway, start_sidecar_with, tmp_path: Path
):
    env = {
        "XDG_STATE_HOME": str(tmp_path / "state"),
        "GATEWAY_ADMIN__TOKEN": ADMIN_TOKEN,
        "GATEWAY_EVENTS__HASH_KEY": HASH_KEY,
        "GATEWAY_EVENTS__TOKEN": EVENTS_TOKEN,
        "GATEWAY_EVALUATION__METRICS_PORT": "0",
        "GATEWAY_AUDIT__PATH": str(tmp_path / "audit.jsonl"),
    }
    port, store = free_port(), tmp_path / "store"
    sidecar = start_sidecar_with(store, port, "--http-port", "0", "--log-level", "DEBUG", env=env)
    args = (*events_args(port, tmp_path / "events"), "--tracing", "console", "--log-level", "DEBUG")
    gateway = start_gateway(demo_repo, *args, env=env)

    infer(gateway, "known-country", country="NG")
    try:  # out of the vocabulary: refused or counted, never shown
        infer(gateway, "secret-country", country=SENSITIVE)
    except InferenceServerException as err:
        assert SENSITIVE not in str(err)
    with AdminClient(gateway.url, WRONG_TOKEN) as admin:
        with pytest.raises(grpc.RpcError) as refused:
            admin.routes()
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert WRONG_TOKEN not in (refused.value.details() or "")
    with AdminClient(gateway.url, ADMIN_TOKEN) as admin:
        admin.routes()
        admin.costs()
        admin.cache()
    client = gateway.client()
    client.infer("fraud", transactions(1, "NG"), headers={"authorization": f"Bearer {WRONG_TOKEN}"})
    with pytest.raises(InferenceServerException):  # a token where none is wanted, a bad model
        client.infer("no-such-model", transactions(1, "NG"), headers={"x-api-key": ADMIN_TOKEN})
    client.close()
    wait_until(lambda: acked_all(gateway), "every event acknowledged")

    served = served_pages(gateway, sidecar)
    assert gateway.stop() == 0
    assert sidecar.stop() == 0, sidecar.stderr()
    assert "GRPCInferenceService/ModelInfer" in gateway.stdout(), "no spans were traced"
    assert_nowhere(SECRETS, tmp_path, served + help_texts(env))


def test_no_api_key_reaches_a_log_metric_trace_store_or_audit_line(
    demo_repo: Path, start_gateway, start_sidecar_with, tmp_path: Path
):
    """auth.mode api_key: the keys clients present, right and wrong, on inference and admin
    calls, with every call logged at DEBUG and traced."""
    keys = write_keys(
        tmp_path / "keys.yaml",
        [
            {"name": "checkout", "key_sha256": key_digest(API_KEY), "models": ["fraud"]},
            {"name": "ops", "key_sha256": key_digest(OPS_KEY), "admin": True},
        ],
    )
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump({"auth": {"mode": "api_key", "keys_file": str(keys)}}))
    env = {
        "XDG_STATE_HOME": str(tmp_path / "state"),
        "GATEWAY_EVALUATION__METRICS_PORT": "0",
        "GATEWAY_AUDIT__PATH": str(tmp_path / "audit.jsonl"),
    }
    port, store = free_port(), tmp_path / "store"
    sidecar = start_sidecar_with(store, port, "--http-port", "0", "--log-level", "DEBUG", env=env)
    args = (*events_args(port, tmp_path / "events"), "--tracing", "console", "--log-level", "DEBUG")
    gateway = start_gateway(demo_repo, "--config", str(config), *args, env=env)

    client = gateway.client()
    for request_id, headers in [
        ("by-bearer", {"authorization": f"Bearer {API_KEY}"}),
        ("by-x-api-key", {"x-api-key": API_KEY}),
    ]:
        client.infer("fraud", transactions(2, "NG"), request_id=request_id, headers=headers)
    for headers, status in [
        ({"authorization": f"Bearer {WRONG_TOKEN}"}, "UNAUTHENTICATED"),
        ({"x-api-key": WRONG_TOKEN}, "UNAUTHENTICATED"),
        ({"x-api-key": API_KEY}, "PERMISSION_DENIED"),  # a model the key may not call
    ]:
        model = "fraud" if status == "UNAUTHENTICATED" else "no-such-model"
        with pytest.raises(InferenceServerException) as refused:
            client.infer(model, transactions(1, "NG"), headers=headers)
        assert refused.value.status() == f"StatusCode.{status}"
        assert API_KEY not in str(refused.value) and WRONG_TOKEN not in str(refused.value)
    client.close()
    for key, code in [
        (WRONG_TOKEN, grpc.StatusCode.UNAUTHENTICATED),
        (API_KEY, grpc.StatusCode.PERMISSION_DENIED),  # no admin rights
    ]:
        with AdminClient(gateway.url, key) as admin, pytest.raises(grpc.RpcError) as failed:
            admin.routes()
        assert failed.value.code() == code
        assert key not in (failed.value.details() or "")
    with AdminClient(gateway.url, OPS_KEY) as admin:
        admin.routes()
        admin.costs()
        admin.cache(flush=True)
    wait_until(lambda: acked_all(gateway), "every event acknowledged")

    served = served_pages(gateway, sidecar)
    assert gateway.stop() == 0
    assert sidecar.stop() == 0, sidecar.stderr()
    assert "GRPCInferenceService/ModelInfer" in gateway.stdout(), "no spans were traced"
    audit = (tmp_path / "audit.jsonl").read_text()
    assert '"ops"' in audit and '"checkout"' in audit  # who, by the key's name
    assert_nowhere((API_KEY, OPS_KEY, WRONG_TOKEN), tmp_path, served + help_texts(env))


def served_pages(gateway: GatewayProcess, sidecar: SidecarProcess) -> list[bytes]:
    """What the processes serve: both metrics pages and the sidecar's HTML report pages."""
    urls = [f"http://{gateway.metrics_url}/metrics", f"http://{sidecar.metrics_url}/metrics"]
    urls += [f"http://{sidecar.http_url}{page}" for page in ("/", "/report/fraud")]
    pages = []
    for url in urls:
        with urllib.request.urlopen(url, timeout=30) as reply:
            pages.append(reply.read())
    return pages


def help_texts(env: Mapping[str, str]) -> list[bytes]:
    """``gateway --help`` and the help of the commands that take a secret, in ``env``."""
    return [
        subprocess.run(
            [sys.executable, "-m", "gateway", *command, "--help"],
            capture_output=True,
            env={**os.environ, **env},
            timeout=60,
            check=True,
        ).stdout
        for command in ([], ["serve"], ["sidecar"], ["routes"], ["report"])
    ]


def assert_nowhere(secrets: tuple[str, ...], root: Path, served: list[bytes]) -> None:
    """No ``secrets`` in ``served`` nor in any file under ``root`` the processes wrote: logs
    (with the traces), the event log, the sidecar's DuckDB store and alert log, the audit log."""
    written = {path: path.read_bytes() for path in root.rglob("*") if path.is_file()}
    assert any(p.suffix == ".duckdb" for p in written) and any(
        p.is_relative_to(root / "events") for p in written
    )
    for secret in secrets:
        needle = secret.encode()
        assert not [p for p, data in written.items() if needle in data], secret
        assert not [text for text in served if needle in text], secret
