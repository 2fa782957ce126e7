"""Remote variants end to end: a front gateway whose routes send requests to a second gateway
process (any OIP gRPC server would do) over the network, with local fallbacks.

The remote serves the demo's fraud model, and ``dense``: fraud version 2's network without
a feature contract, which takes only the assembled ``features`` matrix.
"""

from __future__ import annotations

import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import duckdb
import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import yaml
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from gateway.auth import key_digest
from gateway.demo import synthetic_transactions
from gateway.server.admin_client import AdminClient
from tests.auth import ADMIN_ENV, ADMIN_TOKEN, secret_file, wait_until, write_keys
from tests.conftest import (
    DEMO_WIDTH,
    GatewayProcess,
    SidecarProcess,
    demo_features,
    demo_input,
    free_port,
)
from tests.integration.test_events import acked_all, events_args

pytestmark = pytest.mark.integration

PRICE = {"compute_second": 2.0, "request": 0.25}


def remote_repo(root: Path, demo_repo: Path) -> Path:
    shutil.copytree(demo_repo, root)
    dense = root / "dense"
    (dense / "1").mkdir(parents=True)
    shutil.copy(root / "fraud" / "2" / "model.onnx", dense / "1" / "model.onnx")
    (dense / "config.yaml").write_text(yaml.safe_dump({"max_batch_size": 1024}))
    return root


def routes(endpoint: str) -> dict:
    local = {"name": "local", "model": "fraud", "version": "1"}
    return {
        "remote-fraud": {
            "variants": [
                {
                    "name": "remote",
                    "endpoint": endpoint,
                    "model": "fraud",
                    "version": "2",
                    "weight": 1,
                    "price": PRICE,
                },
                local,
            ],
            "fallbacks": ["local"],
            "timeout_ms": 2000,
        },
        "assembled": {
            "variants": [
                {
                    "name": "remote",
                    "endpoint": endpoint,
                    "model": "dense",
                    "contract": "fraud@2",
                    "weight": 1,
                },
            ],
        },
        "cached-remote": {
            "variants": [
                {
                    "name": "remote",
                    "endpoint": endpoint,
                    "model": "fraud",
                    "version": "2",
                    "weight": 1,
                    "deterministic": True,
                    "price": PRICE,
                },
            ],
        },
    }


@pytest.fixture(scope="module")
def repo(demo_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return remote_repo(tmp_path_factory.mktemp("remote") / "repo", demo_repo)


@pytest.fixture(scope="module")
def remote(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    proc = GatewayProcess(repo, tmp_path_factory.mktemp("remote-gateway"))
    yield proc
    proc.kill_all()


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SidecarProcess]:
    workdir = tmp_path_factory.mktemp("remote-sidecar")
    proc = SidecarProcess(workdir / "store", free_port(), workdir)
    yield proc
    proc.stop(signal.SIGKILL, timeout_s=10)


@pytest.fixture(scope="module")
def gateway(
    demo_repo: Path,
    remote: GatewayProcess,
    sidecar: SidecarProcess,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[GatewayProcess]:
    """The front: the demo repository (fraud 1 and 2, locally), routes to the remote."""
    workdir = tmp_path_factory.mktemp("front-gateway")
    config = workdir / "gateway.yaml"
    config.write_text(yaml.safe_dump({"routing": {"routes": routes(remote.url)}}))
    port = int(sidecar.address.rsplit(":", 1)[1])
    proc = GatewayProcess(
        demo_repo,
        workdir,
        "--config",
        str(config),
        *events_args(port, workdir / "events"),
        env=ADMIN_ENV,
    )
    yield proc
    proc.kill_all()


def params(result: triton_grpc.InferResult) -> dict:
    return {
        key: getattr(value, value.WhichOneof("parameter_choice"))
        for key, value in result.get_response().parameters.items()
    }


def transactions(rows: int, seed: int = 5) -> list[triton_grpc.InferInput]:
    """The demo's raw columns: what fraud's contract assembles into its ``features`` input."""
    columns, _ = synthetic_transactions(rows, seed=seed)
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


def test_a_remote_variant_answers_what_the_remote_model_answers_at_its_price(gateway, remote):
    front, behind = gateway.client(), remote.client()
    try:
        for rows, seed in ((1, 1), (5, 2), (64, 3)):
            result = front.infer("remote-fraud", [demo_input(rows, seed)], request_id=f"r{seed}")
            expected = behind.infer("fraud", [demo_input(rows, seed)], model_version="2")
            np.testing.assert_array_equal(
                result.as_numpy("probability"), expected.as_numpy("probability")
            )
            answered = params(result)
            assert answered["variant"] == "remote" and "fallback" not in answered
            assert result.get_response().model_name == "fraud"
            assert result.get_response().model_version == "2"
            assert result.get_response().id == f"r{seed}"
            assert answered["remote_us"] > 0 and answered["cached_rows"] == 0
            # Per request, plus the call's time (network included) per second.
            remote_s = answered["remote_us"] / 1e6
            assert answered["cost"] == pytest.approx(
                PRICE["request"] + PRICE["compute_second"] * remote_s, rel=0.05
            )
    finally:
        front.close()
        behind.close()
    endpoint = remote.url
    assert gateway.metric("gateway_remote_up", endpoint=endpoint) == 1
    assert gateway.metric("gateway_remote_requests_total", endpoint=endpoint, outcome="ok") >= 3
    assert gateway.metric("gateway_remote_duration_seconds_count", endpoint=endpoint) >= 3
    with AdminClient(gateway.url, ADMIN_TOKEN) as admin:
        lines = [
            line
            for line in admin.costs().lines
            if line.route == "remote-fraud" and line.variant == "remote"
        ]
    assert sum(line.requests for line in lines) >= 3
    assert sum(line.cost for line in lines) >= 3 * PRICE["request"]


def test_a_contract_variant_assembles_locally_and_sends_the_model_input(gateway, remote):
    front, behind = gateway.client(), remote.client()
    try:
        # dense has no contract: the raw columns themselves are no input of it.
        with pytest.raises(InferenceServerException) as info:
            behind.infer("dense", transactions(3))
        assert "INVALID_ARGUMENT" in str(info.value.status())
        result = front.infer("assembled", transactions(3))
        local = front.infer("fraud", transactions(3), model_version="2")  # assembled alike
        np.testing.assert_allclose(
            result.as_numpy("probability"), local.as_numpy("probability"), rtol=1e-6
        )
        answered = params(result)
        assert answered["contract_version"] == "v2" and answered["variant"] == "remote"
        assert result.get_response().model_name == "dense"
        # The model's own input passes through the contract, as on a local model.
        dense = front.infer("assembled", [demo_input(2)])
        np.testing.assert_array_equal(
            dense.as_numpy("probability"),
            behind.infer("dense", [demo_input(2)]).as_numpy("probability"),
        )
        assert "contract_version" not in params(dense)
    finally:
        front.close()
        behind.close()


def test_remote_rows_are_cached_once_its_outputs_are_known(gateway, remote):
    calls = lambda: gateway.metric(  # noqa: E731
        "gateway_remote_requests_total", endpoint=remote.url, outcome="ok"
    )
    client = gateway.client()
    try:
        client.infer("cached-remote", [demo_input(4, seed=41)])  # learns the outputs
        first = client.infer("cached-remote", [demo_input(4, seed=42)])
        assert params(first)["cached_rows"] == 0
        before = calls()
        again = client.infer("cached-remote", [demo_input(4, seed=42)])
        answered = params(again)
        assert answered["cached_rows"] == 4 and answered["remote_us"] == 0
        assert answered["cost"] < PRICE["request"]  # a lookup, never a request's price
        np.testing.assert_array_equal(again.as_numpy("probability"), first.as_numpy("probability"))
        assert calls() == before  # no call went out
        # Half the rows cached: only the others go to the remote.
        mixed = np.concatenate([demo_features(4, seed=42), demo_features(4, seed=43)])
        tensor = triton_grpc.InferInput("features", [8, DEMO_WIDTH], "FP32")
        tensor.set_data_from_numpy(mixed)
        result = client.infer("cached-remote", [tensor])
        assert params(result)["cached_rows"] == 4 and calls() == before + 1
        np.testing.assert_array_equal(
            result.as_numpy("probability")[:4], first.as_numpy("probability")
        )
        # Never a local model's rows: the same rows on local fraud 2 are computed there.
        local = client.infer("fraud", [demo_input(4, seed=42)], model_version="2")
        assert params(local)["cached_rows"] == 0
        # The same bytes as another datatype are another request: the remote judges it (it
        # takes FP32 only), the cache never answers it with the FP32 rows' outputs.
        as_int = triton_grpc.InferInput("features", [4, DEMO_WIDTH], "INT32")
        as_int.set_data_from_numpy(demo_features(4, seed=42).view(np.int32))
        with pytest.raises(InferenceServerException) as refused:
            client.infer("cached-remote", [as_int])
        assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
    finally:
        client.close()


def test_a_request_the_remote_refuses_as_invalid_fails_without_falling_back(gateway):
    with grpc.insecure_channel(gateway.url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        message = service_pb2.ModelInferRequest(model_name="remote-fraud")
        message.inputs.add(name="features", datatype="FP32", shape=[1, 3])  # too narrow
        message.raw_input_contents.append(np.zeros(3, np.float32).tobytes())
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(message, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "remote" in info.value.details() and "features" in info.value.details()


def test_a_bad_endpoint_is_refused_naming_the_field(gateway):
    bad = {"r": {"variants": [{"name": "v", "endpoint": "host:99999", "model": "m", "weight": 1}]}}
    with AdminClient(gateway.url, ADMIN_TOKEN) as admin, pytest.raises(grpc.RpcError) as info:
        admin.set_routes(yaml.safe_dump(bad))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "r.variants.0.endpoint" in info.value.details()
    assert "port must be 1-65535" in info.value.details()
    unserved = {
        "r": {
            "variants": [
                {"name": "v", "endpoint": "h:1", "model": "m", "contract": "nope", "weight": 1}
            ]
        }
    }
    with AdminClient(gateway.url, ADMIN_TOKEN) as admin, pytest.raises(grpc.RpcError) as info:
        admin.set_routes(yaml.safe_dump(unserved))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "r.v: model 'nope'" in info.value.details()


def test_remote_answers_reach_prediction_events_like_local_ones(gateway, sidecar):
    client = gateway.client()
    costs = {}
    try:
        for i in range(5):
            result = client.infer("remote-fraud", [demo_input(2, i)], request_id=f"event-{i}")
            costs[f"event-{i}"] = params(result)["cost"]
    finally:
        client.close()
    wait_until(lambda: acked_all(gateway), "the events acknowledged")
    assert sidecar.stop() == 0, sidecar.stderr()
    with duckdb.connect(str(sidecar.store / "events.duckdb"), read_only=True) as db:
        stored = db.execute(
            "SELECT request_id, route, model, version, arm, rows, cost FROM events "
            "WHERE request_id LIKE 'event-%' ORDER BY request_id"
        ).fetchall()
    assert [row[:6] for row in stored] == [
        (f"event-{i}", "remote-fraud", "fraud", "2", "primary", 2) for i in range(5)
    ]
    assert {row[0]: row[6] for row in stored} == pytest.approx(costs)


# -- a remote that is slow, then gone --------------------------------------------------------


def test_a_stalled_then_killed_remote_falls_back_within_the_route_timeout(
    repo: Path, demo_repo: Path, start_gateway, tmp_path: Path
):
    port = free_port()  # the remote comes back on it
    remote = start_gateway(repo, "--port", str(port))
    spec = routes(remote.url)["remote-fraud"]
    spec["timeout_ms"] = 500
    config = tmp_path / "front.yaml"
    config.write_text(yaml.safe_dump({"routing": {"routes": {"remote-fraud": spec}}}))
    front = start_gateway(demo_repo, "--config", str(config))
    client = front.client()
    local = client.infer("fraud", [demo_input(3)], model_version="1").as_numpy("probability")
    assert params(client.infer("remote-fraud", [demo_input(3)]))["variant"] == "remote"

    # Stalled: the connection holds, nothing answers. Only the call's deadline (the route's
    # timeout) ends the attempt; the client's own is far longer.
    remote.process.send_signal(signal.SIGSTOP)
    try:
        result = client.infer("remote-fraud", [demo_input(3)], client_timeout=30)
    finally:
        remote.process.send_signal(signal.SIGCONT)
    answered = params(result)
    assert answered["variant"] == "local" and answered["fallback"] == "local"
    assert answered["fallback_reason"].startswith("remote: DEADLINE_EXCEEDED")
    np.testing.assert_array_equal(result.as_numpy("probability"), local)
    assert front.metric("gateway_remote_up", endpoint=remote.url) == 0

    # Killed: refused at once, and the local model answers.
    remote.process.kill()
    remote.process.wait()
    for _ in range(3):
        result = client.infer("remote-fraud", [demo_input(3)], client_timeout=30)
        answered = params(result)
        assert answered["variant"] == "local"
        assert answered["fallback_reason"].startswith("remote: UNAVAILABLE"), answered
        np.testing.assert_array_equal(result.as_numpy("probability"), local)
    assert front.metric("gateway_remote_up", endpoint=remote.url) == 0
    assert front.metric("gateway_remote_requests_total", outcome="UNAVAILABLE") >= 3
    assert front.metric("gateway_fallbacks_total", route="remote-fraud", variant="remote") >= 4

    # Back: within a few seconds the remote answers again (no long reconnect backoff).
    start_gateway(repo, "--port", str(port))
    wait_until(
        lambda: params(client.infer("remote-fraud", [demo_input(3)]))["variant"] == "remote",
        "the remote variant answering again",
        timeout_s=30,
    )
    assert front.metric("gateway_remote_up", endpoint=remote.url) == 1
    client.close()
    assert front.stop() == 0, front.stderr()


def test_a_remote_gateway_with_keys_is_called_with_the_key_in_token_file(
    repo: Path, demo_repo: Path, start_gateway, tmp_path: Path
):
    key = "remote-key-5d1e9a"
    keys = write_keys(
        tmp_path / "keys.yaml", [{"name": "front", "key_sha256": key_digest(key), "tenant": "f"}]
    )
    behind = tmp_path / "remote.yaml"
    behind.write_text(yaml.safe_dump({"auth": {"mode": "api_key", "keys_file": str(keys)}}))
    remote = start_gateway(repo, "--config", str(behind))
    spec = routes(remote.url)["remote-fraud"]
    for token_file, answered_by in ((None, "local"), (secret_file(tmp_path / "t", key), "remote")):
        config = tmp_path / f"front-{answered_by}.yaml"
        remote_settings = {"token_file": str(token_file)} if token_file else {}
        routing = {"routes": {"remote-fraud": spec}, "remote": remote_settings}
        config.write_text(yaml.safe_dump({"routing": routing}))
        front = start_gateway(demo_repo, "--config", str(config))
        client = front.client()
        answered = params(client.infer("remote-fraud", [demo_input(2)]))
        client.close()
        assert answered["variant"] == answered_by, answered
        if token_file is None:  # the remote refused it: a misconfiguration, not the client's
            assert answered["fallback_reason"].startswith("remote: INTERNAL")
            assert "UNAUTHENTICATED" in answered["fallback_reason"]
