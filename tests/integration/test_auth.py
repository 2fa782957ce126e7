"""The trust boundary on the inference port: tenants from keys and client certificates, TLS,
guarded repository calls and their audit log. Real gateways, real clients (tritonclient and
raw grpc), real certificates made here."""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import tritonclient.grpc as triton_grpc
import yaml
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException

from gateway.api.v1 import admin_pb2
from gateway.auth import key_digest
from tests.auth import ADMIN_TOKEN, wait_until, write_keys
from tests.certs import Authority, authority
from tests.conftest import GatewayProcess, demo_input

pytestmark = pytest.mark.integration

INFERENCE = "/inference.GRPCInferenceService/"
KEYS = {
    "team-a": "key-a-7f1c2e",
    "team-b": "key-b-91d0aa",
    "team-c": "key-c-4b2e77",
    "team-c2": "key-c2-0d9f13",
    "expired": "key-old-55e3",
    "ops": "key-ops-c0ffee",
}


def entry(name: str, **fields: object) -> dict[str, object]:
    return {"name": name, "key_sha256": key_digest(KEYS[name]), **fields}


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def status(err: InferenceServerException) -> str:
    return str(err.status()).removeprefix("StatusCode.")


def refused(call: Callable[[], object]) -> tuple[str, str]:
    with pytest.raises(InferenceServerException) as caught:
        call()
    return status(caught.value), caught.value.message()


@pytest.fixture(scope="module")
def two_models(demo_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo repository with a second model, `other` (a copy of `fraud`)."""
    root = tmp_path_factory.mktemp("auth-repo") / "repo"
    shutil.copytree(demo_repo, root)
    shutil.copytree(root / "fraud", root / "other")
    return root


def api_key_settings(workdir: Path, entries: list[dict[str, object]]) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    keys = write_keys(workdir / "keys.yaml", entries)
    settings = {
        "auth": {"mode": "api_key", "keys_file": str(keys), "reload_interval_s": 0.05},
        "admin": {"token": ADMIN_TOKEN},
        "audit": {"path": str(workdir / "audit.jsonl")},
    }
    path = workdir / "gateway.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


ROTATED_BUDGET = {"limit": 2.5e-6, "window_s": 3600}
ENTRIES = [
    entry("team-a", tenant="alpha", models=["fraud"], rate_limit={"rate": 0.001, "burst": 3}),
    entry("team-b", tenant="beta"),
    entry("team-c", tenant="gamma", models=["fraud"], budget=ROTATED_BUDGET),
    entry("expired", tenant="alpha", expires="2020-01-01T00:00:00Z"),
    entry("ops", admin=True),
]


@pytest.fixture(scope="module")
def keyed(two_models: Path, tmp_path_factory: pytest.TempPathFactory):
    workdir = tmp_path_factory.mktemp("keyed")
    config = api_key_settings(workdir, ENTRIES)
    proc = GatewayProcess(two_models, workdir / "gateway", "--config", str(config))
    yield proc
    proc.stop()
    proc.kill_all()


@pytest.fixture
def keyed_client(keyed: GatewayProcess):
    with keyed.client() as client:
        yield client


# -- api_key: who may call what ---------------------------------------------------------------


def test_a_call_without_a_key_or_with_an_unknown_or_expired_one_is_unauthenticated(keyed_client):
    infer = keyed_client.infer
    for headers in (None, bearer("not-a-key"), bearer(KEYS["expired"]), {"x-api-key": "nope"}):
        code, message = refused(functools.partial(infer, "fraud", [demo_input(2)], headers=headers))
        assert code == "UNAUTHENTICATED", (headers, message)
        for key in KEYS.values():
            assert key not in message
    code, message = refused(
        lambda: infer("fraud", [demo_input(2)], headers=bearer(KEYS["expired"]))
    )
    assert "expired" in message
    # Metadata and listings need a key too; liveness does not.
    for call in (
        lambda: keyed_client.get_model_metadata("fraud"),
        lambda: keyed_client.get_model_config("fraud"),
        lambda: keyed_client.get_model_repository_index(),
        lambda: keyed_client.get_inference_statistics("fraud"),
    ):
        assert refused(call)[0] == "UNAUTHENTICATED"
    assert keyed_client.is_server_live()


def test_a_known_key_serves_the_models_it_names_and_no_others(keyed_client):
    result = keyed_client.infer("fraud", [demo_input(2)], headers=bearer(KEYS["team-a"]))
    assert result.as_numpy("probability").shape == (2, 1)
    also = keyed_client.infer("fraud", [demo_input(2)], headers={"x-api-key": KEYS["team-b"]})
    assert also.as_numpy("probability").shape == (2, 1)
    # Not allowed, served or not: the same refusal, so a key cannot learn what exists.
    for model in ("other", "no-such-model"):
        code, message = refused(
            functools.partial(
                keyed_client.infer, model, [demo_input(2)], headers=bearer(KEYS["team-a"])
            )
        )
        assert code == "PERMISSION_DENIED"
        assert message == f"'team-a' may not call model '{model}'"
        code, _ = refused(
            functools.partial(
                keyed_client.get_model_metadata, model, headers=bearer(KEYS["team-a"])
            )
        )
        assert code == "PERMISSION_DENIED"
    # Listings show a key the models it may call.
    index = keyed_client.get_model_repository_index(headers=bearer(KEYS["team-a"]))
    assert {m.name for m in index.models} == {"fraud"}
    index = keyed_client.get_model_repository_index(headers=bearer(KEYS["team-b"]))
    assert {m.name for m in index.models} == {"fraud", "other"}
    stats = keyed_client.get_inference_statistics(headers=bearer(KEYS["team-a"]))
    assert {s.name for s in stats.model_stats} == {"fraud"}


def test_a_lying_tenant_parameter_changes_nothing(keyed: GatewayProcess, keyed_client):
    """team-a's key names tenant alpha, limited to 3 requests: a `tenant` parameter naming
    someone else each time neither escapes the limit nor moves the cost to them."""
    answered = 0
    codes = []
    for i in range(6):
        try:
            keyed_client.infer(
                "fraud",
                [demo_input(2)],
                headers=bearer(KEYS["team-a"]),
                parameters={"tenant": f"someone-else-{i}"},
            )
            answered += 1
        except InferenceServerException as err:
            codes.append(status(err))
    # Earlier tests of this module spent some of alpha's burst of 3 (rate ~0).
    assert answered <= 3 and codes and set(codes) == {"RESOURCE_EXHAUSTED"}
    tenants = {line.tenant for line in costs(keyed.url).lines}
    assert "alpha" in tenants and not any(t.startswith("someone-else") for t in tenants)


def costs(url: str) -> admin_pb2.CostsResponse:
    with grpc.insecure_channel(url) as channel:
        reply = channel.unary_unary("/gateway.v1.GatewayAdmin/Costs")(
            admin_pb2.CostsRequest().SerializeToString(),
            metadata=[("authorization", f"Bearer {ADMIN_TOKEN}")],
        )
    return admin_pb2.CostsResponse.FromString(reply)


def test_a_keys_budget_is_its_tenants(two_models: Path, start_gateway, tmp_path):
    """team-c's key gives tenant gamma a budget of 2.5 requests' price: the third request is
    refused, whatever tenant the requests name."""
    config = api_key_settings(tmp_path / "cfg", ENTRIES)
    proc = start_gateway(two_models, "--config", str(config))
    (budget,) = [b for b in costs(proc.url).budgets if b.name == "tenant.gamma"]
    assert (budget.subject, budget.value, budget.policy) == ("tenant", "gamma", "reject")
    codes = []
    with proc.client() as client:
        for i in range(6):
            try:
                client.infer(
                    "fraud",
                    [demo_input(2)],
                    headers=bearer(KEYS["team-c"]),
                    parameters={"tenant": f"not-gamma-{i}", "cache": "false"},
                )
                codes.append("OK")
            except InferenceServerException as err:
                codes.append(status(err))
    assert codes[:2] == ["OK", "OK"] and codes[-1] == "RESOURCE_EXHAUSTED", codes
    (budget,) = [b for b in costs(proc.url).budgets if b.name == "tenant.gamma"]
    assert budget.spent >= budget.limit
    # The key rotated (a new key, a new name, the same tenant): the spend stays the tenant's.
    rotated = [e for e in ENTRIES if e["name"] != "team-c"]
    rotated.append(entry("team-c2", tenant="gamma", models=["fraud"], budget=ROTATED_BUDGET))
    write_keys(tmp_path / "cfg" / "keys.yaml", rotated)
    with proc.client() as client:

        def rotated_key_refused() -> bool:
            try:
                client.infer("fraud", [demo_input(2)], headers=bearer(KEYS["team-c2"]))
            except InferenceServerException as err:
                return status(err) == "RESOURCE_EXHAUSTED"
            return False

        wait_until(rotated_key_refused)


def test_streams_authenticate_once_and_check_each_request(keyed_client):
    answers: list[tuple[Any, Any]] = []
    keyed_client.start_stream(
        callback=lambda result, error: answers.append((result, error)),
        headers=bearer(KEYS["team-c"]),
    )
    keyed_client.async_stream_infer("fraud", [demo_input(2)], request_id="1")
    keyed_client.async_stream_infer("no-such-model", [demo_input(2)], request_id="2")
    wait_until(lambda: len(answers) == 2)
    keyed_client.stop_stream()
    by_id = {}
    for result, error in answers:
        if error is None:
            by_id[result.get_response().id] = "ok"
        else:
            by_id["error"] = str(error)
    assert by_id.get("1") == "ok"
    assert "PERMISSION" in by_id["error"] or "may not call model" in by_id["error"]
    # No key: the stream is refused before any request is read.
    failures: list[object] = []
    keyed_client.start_stream(callback=lambda result, error: failures.append(error))
    with contextlib.suppress(InferenceServerException):  # the stream may have ended already
        keyed_client.async_stream_infer("fraud", [demo_input(2)])
    wait_until(lambda: len(failures) >= 1)
    keyed_client.stop_stream()
    assert "UNAUTHENTICATED" in str(failures[0]) or "needs a key" in str(failures[0])


# -- the control plane ------------------------------------------------------------------------


def audit_lines(workdir: Path) -> list[dict[str, object]]:
    path = workdir / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_unload_and_load_need_admin_rights_and_are_audited(keyed: GatewayProcess, keyed_client):
    started = time.monotonic()
    workdir = keyed.workdir.parent
    unload = keyed_client.unload_model
    assert refused(lambda: unload("other"))[0] == "UNAUTHENTICATED"
    assert refused(lambda: unload("other", headers=bearer("wrong")))[0] == "UNAUTHENTICATED"
    code, message = refused(lambda: unload("other", headers=bearer(KEYS["team-b"])))
    assert code == "PERMISSION_DENIED" and "no admin rights" in message
    assert keyed_client.is_model_ready("other", headers=bearer(KEYS["team-b"]))
    # An admin key, then the admin token.
    unload("other", headers=bearer(KEYS["ops"]))
    assert not keyed_client.is_model_ready("other", headers=bearer(KEYS["team-b"]))
    keyed_client.load_model("other", headers=bearer(ADMIN_TOKEN))
    assert keyed_client.is_model_ready("other", headers=bearer(KEYS["team-b"]))
    lines = audit_lines(workdir)
    done = [(line["actor"], line["rpc"], line["outcome"]) for line in lines]
    assert ("ops", "RepositoryModelUnload", "OK") in done
    assert ("admin-token", "RepositoryModelLoad", "OK") in done
    assert ("team-b", "RepositoryModelUnload", "PERMISSION_DENIED") in done
    assert ("unauthenticated", "RepositoryModelUnload", "UNAUTHENTICATED") in done
    unloaded = next(line for line in lines if line["actor"] == "ops")
    assert unloaded["target"] == "other"
    assert unloaded["before"] == ["1", "2"]  # the versions it served (version_policy: all)
    assert unloaded["after"] == []
    # A flood of refused calls is counted whole and written at most once a second.
    counted = keyed.metric("gateway_admin_actions_total", rpc="RepositoryModelUnload")
    for _ in range(20):
        assert refused(lambda: unload("other"))[0] == "UNAUTHENTICATED"
    assert keyed.metric("gateway_admin_actions_total", rpc="RepositoryModelUnload") == counted + 20
    strangers = [
        line
        for line in audit_lines(workdir)
        if line["actor"] == "unauthenticated" and line["rpc"] == "RepositoryModelUnload"
    ]
    # At most one line a second (a line then says how many it stands for).
    assert len(strangers) <= 1 + (time.monotonic() - started), len(strangers)
    text = (workdir / "audit.jsonl").read_text()
    assert not any(key in text for key in (*KEYS.values(), ADMIN_TOKEN))
    assert keyed.metric("gateway_admin_actions_total", rpc="RepositoryModelUnload") >= 4
    assert keyed.metric("gateway_auth_refused_total", reason="missing") >= 1


def test_a_repository_rpc_can_be_opened_or_restricted_per_rpc(
    two_models: Path, start_gateway, tmp_path
):
    settings = {
        "auth": {"rpc_access": {"RepositoryIndex": "admin", "ModelStatistics": "admin"}},
        "admin": {"token": ADMIN_TOKEN},
        "audit": {"path": None},
    }
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump(settings))
    proc = start_gateway(two_models, "--config", str(config))
    with proc.client() as client:
        assert refused(client.get_model_repository_index)[0] == "UNAUTHENTICATED"
        assert refused(client.get_inference_statistics)[0] == "UNAUTHENTICATED"
        assert client.get_model_repository_index(headers=bearer(ADMIN_TOKEN)).models
        # auth.mode none: inference stays open, and the start-up says so.
        assert client.infer("fraud", [demo_input(2)]).as_numpy("probability").shape == (2, 1)
    assert "auth.mode none" in proc.stderr() and "WARNING" in proc.stderr()


def test_keys_reload_without_a_restart(two_models: Path, start_gateway, tmp_path):
    config = api_key_settings(tmp_path / "cfg", [entry("team-a", tenant="alpha")])
    proc = start_gateway(two_models, "--config", str(config))
    keys = tmp_path / "cfg" / "keys.yaml"
    with proc.client() as client:

        def serves(name: str) -> bool:
            try:
                client.infer("fraud", [demo_input(2)], headers=bearer(KEYS[name]))
                return True
            except InferenceServerException as err:
                assert status(err) == "UNAUTHENTICATED"
                return False

        assert serves("team-a") and not serves("team-b")
        write_keys(keys, [entry("team-b", tenant="beta")])
        wait_until(lambda: serves("team-b"))
        assert not serves("team-a")
        # A broken file keeps the keys loaded before, and says so.
        keys.write_text("keys: [{name: broken}]")
        # (The file is checked at a call, at most every reload_interval_s.)
        failed = "gateway_auth_keys_reloads_total"
        wait_until(lambda: serves("team-b") and proc.metric(failed, outcome="failed") >= 1)
    assert "keeping the keys loaded before" in proc.stderr()


# -- TLS and mTLS -----------------------------------------------------------------------------


def tls_settings(path: Path, ca: Authority, *, mtls: bool = False, **extra: object) -> Path:
    server = ca.issue("gateway", server=True)
    tls: dict[str, str] = {"cert_file": str(server.cert), "key_file": str(server.key)}
    if mtls:
        tls["client_ca_file"] = str(ca.cert)
    path.write_text(yaml.safe_dump({"tls": tls, "audit": {"path": None}, **extra}))
    return path


def tls_client(url: str, ca: Authority, cert: Path | None = None, key: Path | None = None):
    return triton_grpc.InferenceServerClient(
        url,
        ssl=True,
        root_certificates=str(ca.cert),
        certificate_chain=str(cert) if cert else None,
        private_key=str(key) if key else None,
    )


def live_over_tls(url: str, ca: Authority, cert: Path | None = None, key: Path | None = None):
    with grpc.secure_channel(
        url,
        grpc.ssl_channel_credentials(
            ca.cert.read_bytes(),
            key.read_bytes() if key else None,
            cert.read_bytes() if cert else None,
        ),
    ) as channel:
        reply = channel.unary_unary(INFERENCE + "ServerLive")(
            service_pb2.ServerLiveRequest().SerializeToString(), timeout=5
        )
        return service_pb2.ServerLiveResponse.FromString(reply).live


def test_tls_handshakes_with_the_right_ca_only(two_models: Path, start_gateway, tmp_path):
    ca, other = authority(tmp_path / "ca"), authority(tmp_path / "other-ca", "other-ca")
    config = tls_settings(tmp_path / "gateway.yaml", ca)
    proc = start_gateway(two_models, "--config", str(config), "--transport", "auto")
    assert "transport: grpcio" in proc.stderr() and "tls.cert_file" in proc.stderr()
    with tls_client(proc.url, ca) as client:
        assert client.infer("fraud", [demo_input(2)]).as_numpy("probability").shape == (2, 1)
    with pytest.raises(grpc.RpcError) as wrong_ca:
        live_over_tls(proc.url, other)
    assert wrong_ca.value.code() == grpc.StatusCode.UNAVAILABLE
    with grpc.insecure_channel(proc.url) as plain, pytest.raises(grpc.RpcError):
        plain.unary_unary(INFERENCE + "ServerLive")(b"", timeout=5)
    # A renewed certificate, from another CA, is served at the next handshake.
    renewed = other.issue("gateway", server=True, file_name="renewed")
    server_cert = Path(yaml.safe_load(config.read_text())["tls"]["cert_file"])
    server_key = Path(yaml.safe_load(config.read_text())["tls"]["key_file"])
    server_key.write_bytes(renewed.key.read_bytes())
    server_cert.write_bytes(renewed.cert.read_bytes())

    def other_ca_works() -> bool:
        try:
            return bool(live_over_tls(proc.url, other))
        except grpc.RpcError:
            return False

    wait_until(other_ca_works)


def test_the_native_transport_refuses_tls_naming_the_setting(two_models, start_gateway, tmp_path):
    config = tls_settings(tmp_path / "gateway.yaml", authority(tmp_path / "ca"))
    with pytest.raises(RuntimeError) as failed:
        start_gateway(two_models, "--config", str(config), "--transport", "native")
    assert "tls.cert_file" in str(failed.value)


def test_mtls_maps_client_certificates_to_tenants(two_models: Path, start_gateway, tmp_path):
    ca, stranger = authority(tmp_path / "ca"), authority(tmp_path / "stranger", "stranger-ca")
    keys = write_keys(
        tmp_path / "keys.yaml",
        [
            {"name": "alpha-svc", "subject": "alpha-svc", "tenant": "alpha", "models": ["fraud"]},
            {"name": "beta-svc", "subject": "spiffe://acme/beta", "tenant": "beta"},
        ],
    )
    auth = {"mode": "mtls", "keys_file": str(keys)}
    admin = {"token": ADMIN_TOKEN}
    config = tls_settings(tmp_path / "gateway.yaml", ca, mtls=True, auth=auth, admin=admin)
    proc = start_gateway(two_models, "--config", str(config), "--transport", "auto")
    alpha = ca.issue("alpha-svc")
    beta = ca.issue("some-host", uri="spiffe://acme/beta")
    nobody = ca.issue("nobody")
    expired = ca.issue("alpha-svc", expired=True, file_name="alpha-expired")
    forged = stranger.issue("alpha-svc")
    with tls_client(proc.url, ca, alpha.cert, alpha.key) as client:
        lying = {"tenant": "beta"}
        result = client.infer("fraud", [demo_input(2)], parameters=lying)
        assert result.as_numpy("probability").shape == (2, 1)
        assert refused(lambda: client.infer("other", [demo_input(2)]))[0] == "PERMISSION_DENIED"
    # The certificate's tenant was charged, not the one the request named.
    credentials = grpc.ssl_channel_credentials(
        *map(Path.read_bytes, (ca.cert, alpha.key, alpha.cert))
    )
    with grpc.secure_channel(proc.url, credentials) as channel:
        reply = channel.unary_unary("/gateway.v1.GatewayAdmin/Costs")(
            admin_pb2.CostsRequest().SerializeToString(),
            metadata=[("authorization", f"Bearer {ADMIN_TOKEN}")],
        )
    assert {line.tenant for line in admin_pb2.CostsResponse.FromString(reply).lines} == {"alpha"}
    with tls_client(proc.url, ca, beta.cert, beta.key) as client:  # by its SAN URI
        assert client.infer("other", [demo_input(2)]).as_numpy("probability").shape == (2, 1)
    with tls_client(proc.url, ca, nobody.cert, nobody.key) as client:
        assert refused(lambda: client.infer("fraud", [demo_input(2)]))[0] == "UNAUTHENTICATED"
    for cert in (None, expired, forged):  # no certificate, an expired one, another CA's
        with pytest.raises(grpc.RpcError) as failed:
            live_over_tls(proc.url, ca, cert.cert if cert else None, cert.key if cert else None)
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE


def test_an_expired_key_by_date_is_refused_from_that_date(tmp_path):
    """The keys file's `expires` needs a time zone; a naive date is refused with its key."""
    from gateway.auth import KeyRing
    from gateway.errors import SettingsError

    path = write_keys(tmp_path / "keys.yaml", [entry("team-a", expires="2030-01-01T00:00:00")])
    with pytest.raises(SettingsError, match="time zone"):
        KeyRing(path, "auth.keys_file")
    later = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
    path = write_keys(path, [entry("team-a", expires=later.isoformat())])
    ring = KeyRing(path, "auth.keys_file")
    found = ring.by_key(KEYS["team-a"])
    assert found is not None and found.expired(later) and not found.expired(later - dt.timedelta(1))
    assert ring.by_key(KEYS["team-b"]) is None


# -- every RPC, every kind of credential ------------------------------------------------------

ADMIN_API = "/gateway.v1.GatewayAdmin/"
# Each unary RPC with a request naming `other`, a model team-a's key does not list.
RPCS: dict[str, tuple[str, bytes]] = {
    "ServerLive": (INFERENCE, service_pb2.ServerLiveRequest().SerializeToString()),
    "ServerReady": (INFERENCE, service_pb2.ServerReadyRequest().SerializeToString()),
    "ServerMetadata": (INFERENCE, service_pb2.ServerMetadataRequest().SerializeToString()),
    "ModelReady": (INFERENCE, service_pb2.ModelReadyRequest(name="other").SerializeToString()),
    "ModelMetadata": (
        INFERENCE,
        service_pb2.ModelMetadataRequest(name="other").SerializeToString(),
    ),
    "ModelConfig": (INFERENCE, service_pb2.ModelConfigRequest(name="other").SerializeToString()),
    "ModelInfer": (
        INFERENCE,
        service_pb2.ModelInferRequest(model_name="other").SerializeToString(),
    ),
    "ModelStatistics": (
        INFERENCE,
        service_pb2.ModelStatisticsRequest(name="other").SerializeToString(),
    ),
    "RepositoryIndex": (INFERENCE, service_pb2.RepositoryIndexRequest().SerializeToString()),
    "RepositoryModelLoad": (
        INFERENCE,
        service_pb2.RepositoryModelLoadRequest(model_name="other").SerializeToString(),
    ),
    "RepositoryModelUnload": (
        INFERENCE,
        service_pb2.RepositoryModelUnloadRequest(model_name="other").SerializeToString(),
    ),
    "GetRoutes": (ADMIN_API, admin_pb2.GetRoutesRequest().SerializeToString()),
    "SetRoutes": (ADMIN_API, admin_pb2.SetRoutesRequest(yaml="").SerializeToString()),
    "Promote": (ADMIN_API, admin_pb2.PromoteRequest(route="r", variant="v").SerializeToString()),
    "Rollback": (ADMIN_API, admin_pb2.RollbackRequest(route="r").SerializeToString()),
    "Costs": (ADMIN_API, admin_pb2.CostsRequest().SerializeToString()),
    "Cache": (ADMIN_API, admin_pb2.CacheRequest().SerializeToString()),
}
OPEN = {"ServerLive", "ServerReady", "ServerMetadata"}
CREDENTIALS = {
    "none": [],
    "wrong": [("authorization", "Bearer wrong-key")],
    "expired": [("authorization", f"Bearer {KEYS['expired']}")],
    "other-tenant": [("x-api-key", KEYS["team-a"])],
}


def code_of(channel: grpc.Channel, rpc: str, metadata: list[tuple[str, str]]) -> grpc.StatusCode:
    prefix, payload = RPCS[rpc]
    try:
        channel.unary_unary(prefix + rpc)(payload, metadata=metadata, timeout=10)
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize("credential", list(CREDENTIALS))
def test_every_rpc_refuses_what_each_credential_may_not_do(keyed: GatewayProcess, credential):
    metadata = CREDENTIALS[credential]
    with grpc.insecure_channel(keyed.url) as channel:
        for rpc in RPCS:
            code = code_of(channel, rpc, metadata)
            if rpc in OPEN:
                expected = grpc.StatusCode.OK
            elif credential != "other-tenant":
                expected = grpc.StatusCode.UNAUTHENTICATED
            elif rpc == "RepositoryIndex":  # a listing: filtered, not refused
                expected = grpc.StatusCode.OK
            else:  # a model it may not call, or admin rights it does not have
                expected = grpc.StatusCode.PERMISSION_DENIED
            assert code == expected, (rpc, credential, code)
    assert keyed.metric("gateway_auth_refused_total") > 0
