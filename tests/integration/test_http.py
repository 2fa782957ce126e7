"""KServe v2 REST beside gRPC, through ``tritonclient.http`` unmodified and plain HTTP: the same
answers as gRPC for JSON and binary tensors (Triton's binary tensor extension), raw features
under the demo's contract and the dense pass-through input, the metadata, config, statistics
and repository calls, request and response parameters, compression both ways; and bad input
answered with ``{"error": ...}`` naming the field, at the HTTP status gRPC's maps to."""

from __future__ import annotations

import gzip
import http.client
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

from gateway.demo import synthetic_transactions
from tests.auth import ADMIN_ENV, ADMIN_TOKEN
from tests.conftest import DEMO_WIDTH, GatewayProcess, demo_features, demo_json
from tests.integration.test_evaluation import raw_inputs

pytestmark = pytest.mark.integration

ADMIN = {"authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture(scope="module", params=["uvicorn", "aiohttp"])
def gateway(request, demo_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    workdir = tmp_path_factory.mktemp(f"http-{request.param}")
    proc = GatewayProcess(
        demo_repo,
        workdir,
        "--http-port",
        "0",
        env={**ADMIN_ENV, "GATEWAY_SERVER__HTTP_TRANSPORT": request.param},
    )
    assert f"({request.param})" in proc.stderr()
    yield proc
    assert proc.stop() == 0, proc.stderr()


@pytest.fixture
def client(gateway: GatewayProcess) -> Iterator[triton_http.InferenceServerClient]:
    client = triton_http.InferenceServerClient(gateway.http_url)
    yield client
    client.close()


def request(
    gateway: GatewayProcess, method: str, path: str, body: bytes = b"", **headers: str
) -> tuple[int, dict[str, str], bytes]:
    host, port = gateway.http_url.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        connection.request(method, path, body=body, headers=headers)
        reply = connection.getresponse()
        return reply.status, {k.lower(): v for k, v in reply.getheaders()}, reply.read()
    finally:
        connection.close()


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_raw_features_answer_as_over_grpc(gateway, client, binary: bool):
    columns, _ = synthetic_transactions(8, seed=5)
    wanted = [triton_http.InferRequestedOutput("probability", binary_data=binary)]
    result = client.infer(
        "fraud",
        raw_inputs(columns, triton_http, binary_data=binary),
        outputs=wanted,
        request_id="h-1",
        parameters={"tenant": "acme", "surface": "web"},
    )
    over_grpc = gateway.client().infer("fraud", raw_inputs(columns))
    assert np.array_equal(result.as_numpy("probability"), over_grpc.as_numpy("probability"))
    response = result.get_response()
    assert response["id"] == "h-1" and response["model_name"] == "fraud"
    assert response["model_version"] == over_grpc.get_response().model_version
    assert response["parameters"]["cached_rows"] == 0 and "cost" in response["parameters"]


def test_the_dense_input_in_binary_with_every_output_binary(gateway, client):
    features = triton_http.InferInput("features", [4, DEMO_WIDTH], "FP32")
    features.set_data_from_numpy(demo_features(4), binary_data=True)
    result = client.infer("fraud", [features])  # no outputs named: all, binary by default
    tensor = triton_grpc.InferInput("features", [4, DEMO_WIDTH], "FP32")
    tensor.set_data_from_numpy(demo_features(4))
    over_grpc = gateway.client().infer("fraud", [tensor])
    assert np.array_equal(result.as_numpy("probability"), over_grpc.as_numpy("probability"))


def test_metadata_config_readiness_and_statistics(gateway, client):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("fraud") and not client.is_model_ready("nosuchmodel")
    server = client.get_server_metadata()
    assert "binary_tensor_data" in server["extensions"] and "statistics" in server["extensions"]
    metadata = client.get_model_metadata("fraud")
    over_grpc = gateway.client().get_model_metadata("fraud", as_json=True)
    assert metadata["name"] == "fraud" and metadata["versions"] == over_grpc["versions"]
    assert [i["name"] for i in metadata["inputs"]] == [i["name"] for i in over_grpc["inputs"]]
    config = client.get_model_config("fraud")
    assert config["name"] == "fraud" and isinstance(config["max_batch_size"], int)
    assert all(isinstance(d, int) for i in config["input"] for d in i["dims"])  # not strings
    stats = client.get_inference_statistics("fraud")["model_stats"]
    assert stats and all(isinstance(s["inference_stats"]["success"]["count"], int) for s in stats)
    assert sum(s["inference_stats"]["success"]["count"] for s in stats) >= 1


def test_repository_index_load_and_unload_need_the_admin_token(gateway, client):
    index = client.get_model_repository_index()
    assert {"name": "fraud"}.items() <= index[0].items() or any(
        entry["name"] == "fraud" for entry in index
    )
    with pytest.raises(InferenceServerException) as refused:
        client.load_model("fraud")
    assert refused.value.status() == "401"
    client.load_model("fraud", headers=ADMIN)
    assert client.is_model_ready("fraud")


def test_bad_requests_get_an_error_naming_the_field(gateway, client):
    with pytest.raises(InferenceServerException) as unknown:
        columns = synthetic_transactions(1, seed=1)[0]
        client.infer("nosuchmodel", raw_inputs(columns, triton_http, binary_data=False))
    assert unknown.value.status() == "404" and "nosuchmodel" in unknown.value.message()
    body = json.dumps(
        {"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 2], "data": [1.0]}]}
    ).encode()
    status, _, reply = request(gateway, "POST", "/v2/models/fraud/infer", body)
    assert status == 400 and "input 'features' has 1 values" in json.loads(reply)["error"]
    status, _, reply = request(gateway, "POST", "/v2/models/fraud/infer", b"{not json")
    assert status == 400 and "not JSON" in json.loads(reply)["error"]
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "features",
                    "datatype": "FP32",
                    "shape": [1, DEMO_WIDTH],
                    "parameters": {"binary_data_size": 4 * DEMO_WIDTH},
                }
            ]
        }
    ).encode()
    short = header + b"\0" * 8  # far fewer bytes than it says
    length = {"Inference-Header-Content-Length": str(len(header))}
    status, _, reply = request(gateway, "POST", "/v2/models/fraud/infer", short, **length)
    assert status == 400 and "binary_data_size is 88" in json.loads(reply)["error"]
    status, _, reply = request(gateway, "GET", "/v2/models/fraud/infer")
    assert status == 405 and json.loads(reply) == {"error": "Method Not Allowed"}
    status, _, reply = request(gateway, "GET", "/v2/nowhere")
    assert status == 404 and json.loads(reply) == {"error": "Not Found"}
    status, _, reply = request(
        gateway, "POST", "/v2/models/fraud/infer", body, **{"Content-Encoding": "br"}
    )
    assert status == 501 and "Content-Encoding" in json.loads(reply)["error"]


def test_compressed_requests_and_responses(gateway, client):
    columns, _ = synthetic_transactions(64, seed=9)
    plain = client.infer("fraud", raw_inputs(columns, triton_http, binary_data=False))
    for algorithm in ("gzip", "deflate"):
        result = client.infer(
            "fraud",
            raw_inputs(columns, triton_http, binary_data=False),
            request_compression_algorithm=algorithm,
            response_compression_algorithm=algorithm,
        )
        assert np.array_equal(result.as_numpy("probability"), plain.as_numpy("probability"))
    bomb = gzip.compress(b"{" + b" " * (80 << 20) + b"}")  # inflates past max_message_bytes
    status, _, reply = request(
        gateway, "POST", "/v2/models/fraud/infer", bomb, **{"Content-Encoding": "gzip"}
    )
    assert status == 400 and "max_message_bytes" in json.loads(reply)["error"]


def test_keys_model_rights_and_rate_limits_hold_over_http(demo_repo: Path, tmp_path: Path):
    """The same credentials as gRPC (Bearer or x-api-key), model rights, and a tenant's rate
    limit answered 429 with Retry-After."""
    from gateway.auth import key_digest
    from tests.auth import write_keys

    keys = {"team-a": "key-a-" + "x" * 24, "team-b": "key-b-" + "y" * 24}
    entries: list[dict[str, object]] = [
        {
            "name": "team-a",
            "key_sha256": key_digest(keys["team-a"]),
            "tenant": "alpha",
            "models": ["fraud"],
            "rate_limit": {"rate": 0.001, "burst": 2},
        },
        {"name": "team-b", "key_sha256": key_digest(keys["team-b"]), "models": ["other"]},
    ]
    settings = {
        "auth": {"mode": "api_key", "keys_file": str(write_keys(tmp_path / "keys.yaml", entries))},
        "audit": {"path": None},
    }
    config = tmp_path / "gateway.yaml"
    config.write_text(json.dumps(settings))
    proc = GatewayProcess(demo_repo, tmp_path / "gw", "--config", str(config), "--http-port", "0")
    try:
        body = demo_json()
        infer = "/v2/models/fraud/infer"
        status, _, reply = request(proc, "POST", infer, body)
        assert status == 401 and "error" in json.loads(reply)
        status, _, reply = request(proc, "POST", infer, body, **{"x-api-key": keys["team-b"]})
        assert status == 403 and "fraud" in json.loads(reply)["error"]
        bearer = {"authorization": f"Bearer {keys['team-a']}"}
        statuses = [request(proc, "POST", infer, body, **bearer)[0] for _ in range(2)]
        assert statuses == [200, 200]
        status, headers, reply = request(proc, "POST", infer, body, **bearer)
        assert status == 429 and int(headers["retry-after"]) >= 1
        assert "alpha" in json.loads(reply)["error"]
        status, _, _ = request(proc, "GET", "/v2/health/live")
        assert status == 200  # liveness needs no key
    finally:
        assert proc.stop() == 0, proc.stderr()


def test_https_with_the_certificate_grpc_presents(demo_repo: Path, tmp_path: Path):
    import ssl

    from tests.certs import authority

    ca = authority(tmp_path / "ca")
    server = ca.issue("gateway", server=True)
    settings = {
        "tls": {"cert_file": str(server.cert), "key_file": str(server.key)},
        "audit": {"path": None},
    }
    config = tmp_path / "gateway.yaml"
    config.write_text(json.dumps(settings))
    proc = GatewayProcess(
        demo_repo, tmp_path / "gw", "--config", str(config), "--http-port", "0",
        "--transport", "auto",
    )  # fmt: skip
    try:
        port = proc.http_url.rsplit(":", 1)[1]
        context = ssl.create_default_context(cafile=str(ca.cert))
        connection = http.client.HTTPSConnection("localhost", int(port), context=context)
        try:
            connection.request("GET", "/v2/models/fraud")
            reply = connection.getresponse()
            assert reply.status == 200 and json.loads(reply.read())["name"] == "fraud"
        finally:
            connection.close()
        with pytest.raises((ConnectionError, http.client.HTTPException, OSError)):
            request(proc, "GET", "/v2/health/live")  # plain HTTP is not served beside it
    finally:
        assert proc.stop() == 0, proc.stderr()
