"""The sidecar as a service of its own: keys and roles (evaluation.auth), TLS and mTLS
(evaluation.tls), on a real sidecar process called by real gRPC clients, by the ``gateway``
commands, and by the gateway's event publisher streaming a real write-ahead log.

Every RPC is tried with no key, an unknown key, an expired key, a key without the RPC's role
and the right key; the keys file is edited while the sidecar runs; certificates come from a
CA the test makes (and from a second CA the sidecar does not trust).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import secrets
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import grpc
import pytest
import yaml

from gateway.api.v1 import events_pb2 as ev
from gateway.api.v1 import events_pb2_grpc as ev_grpc
from gateway.auth import key_digest
from gateway.evaluation.access import ROLES, SERVICE
from gateway.events.publisher import Publisher
from gateway.events.wal import WriteAheadLog
from gateway.settings import ClientTlsSettings
from gateway.telemetry import GatewayMetrics
from tests.auth import secret_file, wait_until, write_keys
from tests.certs import Authority, Issued, authority
from tests.conftest import GatewayProcess, SidecarProcess, demo_input, free_port

pytestmark = pytest.mark.integration

MODEL = "fraud"
EXPIRED = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)


@dataclass(frozen=True)
class Pki:
    ca: Authority
    other_ca: Authority  # one the sidecar does not trust
    server: Issued
    analyst: Issued  # CN analyst: read
    publisher: Issued  # SAN URI spiffe://acme/publisher: publish
    stranger: Issued  # CN stranger, from the trusted CA, in no keys file
    outsider: Issued  # from the other CA
    expired: Issued  # CN analyst, expired


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    ca = authority(root / "ca")
    other = authority(root / "other", "other-ca")
    return Pki(
        ca=ca,
        other_ca=other,
        server=ca.issue("sidecar", server=True),
        analyst=ca.issue("analyst"),
        publisher=ca.issue("gateway-7", uri="spiffe://acme/publisher"),
        stranger=ca.issue("stranger"),
        outsider=other.issue("analyst", file_name="outsider"),
        expired=ca.issue("analyst", expired=True, file_name="analyst-expired"),
    )


def entry(name: str, key: str, *roles: str, expires: dt.datetime | None = None) -> dict:
    item = {"name": name, "key_sha256": key_digest(key), "roles": list(roles)}
    if expires is not None:
        item["expires"] = expires.isoformat()
    return item


def sidecar_env(keys: Path | None, mode: str = "api_key", **more: str) -> dict[str, str]:
    env = {"GATEWAY_EVALUATION__METRICS_PORT": "0", **more}
    if keys is not None:
        env |= {
            "GATEWAY_EVALUATION__AUTH__MODE": mode,
            "GATEWAY_EVALUATION__AUTH__KEYS_FILE": str(keys),
        }
    return env


def tls_env(pki: Pki, mutual: bool = False) -> dict[str, str]:
    env = {
        "GATEWAY_EVALUATION__TLS__CERT_FILE": str(pki.server.cert),
        "GATEWAY_EVALUATION__TLS__KEY_FILE": str(pki.server.key),
    }
    if mutual:
        env["GATEWAY_EVALUATION__TLS__CLIENT_CA_FILE"] = str(pki.ca.cert)
    return env


def channel(
    sidecar: SidecarProcess, ca: Authority | None = None, cert: Issued | None = None
) -> grpc.Channel:
    if ca is None:
        return grpc.insecure_channel(sidecar.address)
    key, chain = (cert.key.read_bytes(), cert.cert.read_bytes()) if cert else (None, None)
    credentials = grpc.ssl_channel_credentials(ca.cert.read_bytes(), key, chain)
    return grpc.secure_channel(sidecar.address, credentials)


def metadata(key: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),) if key is not None else ()


def batch(sequence: int, *ids: str) -> ev.EventBatch:
    events = [ev.PredictionEvent(event_id=i, model=MODEL, rows=1) for i in ids]
    return ev.EventBatch(sequence=sequence, events=events)


def call(stub: ev_grpc.EvaluationServiceStub, rpc: str, md: tuple) -> object:
    """One call of ``rpc`` that the sidecar answers OK once it admits the caller."""
    if rpc == "Publish":
        acks = list(stub.Publish(iter([batch(1, secrets.token_hex(8))]), metadata=md, timeout=30))
        assert [a.sequence for a in acks] == [1]
        return acks
    if rpc == "PutLabels":
        labels = [ev.Label(request_id="r-1", value=1.0)]
        return stub.PutLabels(ev.PutLabelsRequest(labels=labels), metadata=md, timeout=30)
    if rpc == "Report":
        return stub.Report(ev.ReportRequest(model=MODEL), metadata=md, timeout=30)
    if rpc == "Verdict":
        return stub.Verdict(ev.VerdictRequest(model=MODEL), metadata=md, timeout=30)
    if rpc == "Export":
        request = ev.ExportRequest(model=MODEL, path=f"{secrets.token_hex(4)}.parquet")
        return stub.Export(request, metadata=md, timeout=30)
    if rpc == "Actions":
        return stub.Actions(ev.ActionsRequest(model=MODEL), metadata=md, timeout=30)
    if rpc == "Reviews":
        return stub.Reviews(ev.ReviewsRequest(model=MODEL), metadata=md, timeout=30)
    if rpc == "RunTrigger":  # the model has no trigger: admitted, it answers NOT_FOUND
        try:
            stub.RunTrigger(ev.RunTriggerRequest(model=MODEL), metadata=md, timeout=30)
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.NOT_FOUND:
                raise
            return err
        raise AssertionError("RunTrigger of a model without triggers answered OK")
    if rpc == "ResolveReview":  # no review is open: admitted, it answers NOT_FOUND
        try:
            stub.ResolveReview(ev.ResolveReviewRequest(id=1), metadata=md, timeout=30)
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.NOT_FOUND:
                raise
            return err
        raise AssertionError("ResolveReview of no open review answered OK")
    assert rpc == "ExportFile"
    return list(stub.ExportFile(ev.ExportRequest(model=MODEL), metadata=md, timeout=30))


def refused(thunk: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        thunk()
    return caught.value


def succeeds(thunk: Callable[[], object]) -> bool:
    try:
        thunk()
    except grpc.RpcError:
        return False
    return True


def gateway_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


# --- api_key: every RPC, every kind of credential ----------------------------------------------

KEYS = {name: secrets.token_urlsafe(24) for name in ("publisher", "writer", "reader", "old", "x")}
RIGHT = {  # else reader
    "Publish": "publisher",
    "PutLabels": "writer",
    "ResolveReview": "writer",
    "RunTrigger": "writer",
}
# The rest: writer (write is not read).
WRONG_ROLE = {
    "Publish": "reader",
    "PutLabels": "reader",
    "ResolveReview": "reader",
    "RunTrigger": "reader",
}


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SidecarProcess]:
    """A sidecar with api_key auth, canaries and an export directory (so that each RPC
    admitted answers OK)."""
    work = tmp_path_factory.mktemp("keyed")
    keys = write_keys(
        work / "keys.yaml",
        [
            entry("publisher", KEYS["publisher"], "publish"),
            entry("writer", KEYS["writer"], "write"),
            entry("reader", KEYS["reader"], "read"),
            entry("old", KEYS["old"], "publish", "write", "read", expires=EXPIRED),
        ],
    )
    config = work / "sidecar.yaml"
    canary = {"model": MODEL, "stable": "1", "candidate": "2"}
    config.write_text(yaml.safe_dump({"evaluation": {"canaries": [canary]}}))
    env = sidecar_env(keys, GATEWAY_EVALUATION__EXPORT_DIRECTORY=str(work / "exports"))
    proc = SidecarProcess(work / "store", free_port(), work, "--config", str(config), env=env)
    yield proc
    assert proc.stop() == 0, proc.stderr()


def test_every_rpc_of_the_service_has_exactly_one_role():
    methods = ev.DESCRIPTOR.services_by_name["EvaluationService"].methods_by_name
    assert sorted(ROLES) == sorted(methods)
    assert f"{ev.DESCRIPTOR.package}.EvaluationService" == SERVICE


@pytest.mark.parametrize("rpc", list(ROLES))
def test_each_rpc_refuses_a_missing_unknown_or_expired_key(keyed: SidecarProcess, rpc: str):
    stub = ev_grpc.EvaluationServiceStub(channel(keyed))
    for kind, key in [("missing", None), ("unknown", KEYS["x"]), ("expired", KEYS["old"])]:
        before = keyed.metric("sidecar_auth_refused_total", rpc=rpc, reason=kind)
        err = refused(partial(call, stub, rpc, metadata(key)))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED, (kind, err.details())
        assert key is None or key not in err.details()
        assert keyed.metric("sidecar_auth_refused_total", rpc=rpc, reason=kind) == before + 1


@pytest.mark.parametrize("rpc", list(ROLES))
def test_each_rpc_refuses_a_key_without_its_role_and_takes_one_with_it(
    keyed: SidecarProcess, rpc: str
):
    stub = ev_grpc.EvaluationServiceStub(channel(keyed))
    wrong = KEYS[WRONG_ROLE.get(rpc, "writer")]
    err = refused(lambda: call(stub, rpc, metadata(wrong)))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED, err.details()
    assert f"needs the '{ROLES[rpc]}' role" in err.details() and wrong not in err.details()
    call(stub, rpc, metadata(KEYS[RIGHT.get(rpc, "reader")]))


def test_a_read_only_key_cannot_publish_and_the_publisher_cannot_read(keyed: SidecarProcess):
    stub = ev_grpc.EvaluationServiceStub(channel(keyed))
    err = refused(lambda: call(stub, "Publish", metadata(KEYS["reader"])))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    err = refused(lambda: call(stub, "Report", metadata(KEYS["publisher"])))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert keyed.metric("sidecar_auth_refused_total", rpc="Publish", reason="role") >= 1


def test_the_key_may_come_as_x_api_key(keyed: SidecarProcess):
    stub = ev_grpc.EvaluationServiceStub(channel(keyed))
    call(stub, "Report", (("x-api-key", KEYS["reader"]),))


def test_the_credential_is_checked_before_the_request_is_read(keyed: SidecarProcess):
    """Bytes that parse as no message, sent without a key: refused, never INTERNAL; and a
    request the servicer would call invalid is refused for its missing key first."""
    with channel(keyed) as open_channel:
        raw = open_channel.unary_unary(f"/{SERVICE}/PutLabels")
        err = refused(lambda: raw(b"\xff\xff\xff\xff", timeout=30))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED, err.details()
        stub = ev_grpc.EvaluationServiceStub(open_channel)
        invalid = ev.PutLabelsRequest(labels=[ev.Label(value=1.0)])  # nothing to join it on
        err = refused(lambda: stub.PutLabels(invalid, timeout=30))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        err = refused(
            lambda: stub.PutLabels(invalid, metadata=metadata(KEYS["writer"]), timeout=30)
        )
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_method_no_rpc_has_is_refused_to_every_key_and_counted_as_other(
    keyed: SidecarProcess,
):
    with channel(keyed) as open_channel:
        for name in ("Nope", "Drop"):
            unknown = open_channel.unary_unary(f"/{SERVICE}/{name}")
            err = refused(partial(unknown, b"", metadata=metadata(KEYS["reader"]), timeout=30))
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED, err.details()
    assert keyed.metric("sidecar_auth_refused_total", rpc="other", reason="role") == 2
    assert keyed.metric("sidecar_auth_refused_total", rpc="Nope") == 0


def test_health_and_other_services_are_not_guarded(keyed: SidecarProcess):
    """Only the EvaluationService is guarded: an unknown service answers UNIMPLEMENTED."""
    with channel(keyed) as open_channel:
        check = open_channel.unary_unary("/grpc.health.v1.Health/Check")
        err = refused(lambda: check(b"", timeout=30))
        assert err.code() == grpc.StatusCode.UNIMPLEMENTED


# --- the keys file, edited while the sidecar runs ----------------------------------------------


def test_keys_file_edits_take_effect_without_a_restart(start_sidecar, tmp_path: Path):
    first, second = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    keys = write_keys(tmp_path / "keys.yaml", [entry("first", first, "read")])
    sidecar = start_sidecar(tmp_path / "store", free_port(), env=sidecar_env(keys))
    stub = ev_grpc.EvaluationServiceStub(channel(sidecar))
    call(stub, "Report", metadata(first))
    assert refused(lambda: call(stub, "Report", metadata(second))).code() == (
        grpc.StatusCode.UNAUTHENTICATED
    )

    write_keys(keys, [entry("first", first, "read"), entry("second", second, "read")])
    wait_until(lambda: succeeds(lambda: call(stub, "Report", metadata(second))), "a key added")

    write_keys(keys, [entry("second", second, "write")])  # first revoked, second's role changed
    wait_until(lambda: not succeeds(lambda: call(stub, "Report", metadata(first))), "a revocation")
    err = refused(lambda: call(stub, "Report", metadata(second)))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert sidecar.metric("sidecar_keys_reloads_total", outcome="loaded") >= 2

    keys.write_text("keys: [not, a, mapping")  # broken: the keys before stay in use
    wait_until(
        lambda: (
            succeeds(lambda: call(stub, "PutLabels", metadata(second)))
            and sidecar.metric("sidecar_keys_reloads_total", outcome="failed") >= 1
        ),
        "the broken file noticed",
    )
    assert second not in sidecar.stderr() and first not in sidecar.stderr()


def test_mode_none_says_so_at_start_up(start_sidecar, tmp_path: Path):
    sidecar = start_sidecar(tmp_path / "store", free_port())
    assert "WARNING" in sidecar.stderr() and "evaluation.auth.mode is none" in sidecar.stderr()
    call(ev_grpc.EvaluationServiceStub(channel(sidecar)), "Report", ())


def test_a_bad_keys_file_or_html_pages_with_auth_stop_the_start(tmp_path: Path):
    store, logs = tmp_path / "store", tmp_path / "logs"
    with pytest.raises(RuntimeError, match=r"evaluation.auth.keys_file: cannot read"):
        SidecarProcess(store, free_port(), logs, env=sidecar_env(tmp_path / "absent.yaml"))
    keys = write_keys(tmp_path / "keys.yaml", [])
    with pytest.raises(RuntimeError, match=r"evaluation.http_port: the HTML report pages"):
        SidecarProcess(store, free_port(), logs, "--http-port", "0", env=sidecar_env(keys))


# --- TLS and mTLS ------------------------------------------------------------------------------


def test_tls_handshake_succeeds_with_the_right_ca_only(start_sidecar, pki: Pki, tmp_path: Path):
    key = secrets.token_urlsafe(24)
    keys = write_keys(tmp_path / "keys.yaml", [entry("reader", key, "read")])
    sidecar = start_sidecar(tmp_path / "store", free_port(), env=sidecar_env(keys) | tls_env(pki))
    assert "tls=on" in sidecar.stderr()
    call(ev_grpc.EvaluationServiceStub(channel(sidecar, pki.ca)), "Report", metadata(key))
    for other in (channel(sidecar, pki.other_ca), channel(sidecar)):  # another CA; no TLS
        err = refused(partial(call, ev_grpc.EvaluationServiceStub(other), "Report", ()))
        assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()
    # TLS is not a credential: no key, no report.
    err = refused(
        lambda: call(ev_grpc.EvaluationServiceStub(channel(sidecar, pki.ca)), "Report", ())
    )
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.fixture
def mutual(start_sidecar, pki: Pki, tmp_path: Path, demo_repo: Path) -> SidecarProcess:
    keys = write_keys(
        tmp_path / "keys.yaml",
        [
            {"name": "analyst", "subject": "analyst", "roles": ["read"]},
            {"name": "gateway", "subject": "spiffe://acme/publisher", "roles": ["publish"]},
        ],
    )
    env = sidecar_env(keys, mode="mtls") | tls_env(pki, mutual=True)
    # The demo's reference profiles: a report on MODEL, which has no events here, is one the
    # sidecar can give (on a model it knows nothing of, `gateway report` fails).
    known = ("--repository", str(demo_repo))
    return start_sidecar(tmp_path / "store", free_port(), *known, env=env)


def test_mtls_maps_a_certificate_subject_to_its_roles(mutual: SidecarProcess, pki: Pki):
    analyst = ev_grpc.EvaluationServiceStub(channel(mutual, pki.ca, pki.analyst))
    call(analyst, "Report", ())
    call(analyst, "ExportFile", ())
    assert refused(lambda: call(analyst, "Publish", ())).code() == (
        grpc.StatusCode.PERMISSION_DENIED
    )
    publisher = ev_grpc.EvaluationServiceStub(channel(mutual, pki.ca, pki.publisher))
    call(publisher, "Publish", ())  # by its SAN URI
    assert refused(lambda: call(publisher, "Verdict", ())).code() == (
        grpc.StatusCode.PERMISSION_DENIED
    )
    stranger = channel(mutual, pki.ca, pki.stranger)
    err = refused(lambda: call(ev_grpc.EvaluationServiceStub(stranger), "Report", ()))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    err = refused(lambda: stranger.unary_unary(f"/{SERVICE}/Report")(b"\xff\xff", timeout=30))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED  # before the bytes are parsed
    assert mutual.metric("sidecar_auth_refused_total", rpc="Report", reason="unknown") == 2


def test_mtls_refuses_no_certificate_another_cas_and_an_expired_one(
    mutual: SidecarProcess, pki: Pki
):
    for name, conn in [
        ("none", channel(mutual, pki.ca)),
        ("other CA", channel(mutual, pki.ca, pki.outsider)),
        ("expired", channel(mutual, pki.ca, pki.expired)),
    ]:
        err = refused(partial(call, ev_grpc.EvaluationServiceStub(conn), "Report", ()))
        assert err.code() == grpc.StatusCode.UNAVAILABLE, (name, err.details())


# --- the gateway commands ------------------------------------------------------------------------


def test_commands_present_a_token_file_or_the_environment_over_tls(
    start_sidecar, pki: Pki, tmp_path: Path, demo_repo: Path
):
    reader, writer = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    keys = write_keys(
        tmp_path / "keys.yaml", [entry("reader", reader, "read"), entry("writer", writer, "write")]
    )
    env = sidecar_env(keys) | tls_env(pki)
    known = ("--repository", str(demo_repo))  # MODEL's reference profile: a report to give
    sidecar = start_sidecar(tmp_path / "store", free_port(), *known, env=env)
    where = ("--sidecar", sidecar.address, "--ca-file", str(pki.ca.cert))
    token = secret_file(tmp_path / "reader.token", reader)

    ok = gateway_cli("report", MODEL, *where, "--token-file", str(token), "--json")
    assert ok.returncode == 0, ok.stderr
    by_env = gateway_cli("report", MODEL, *where, env={"GATEWAY_SIDECAR_TOKEN": reader})
    assert by_env.returncode == 0, by_env.stderr

    labels = tmp_path / "labels.csv"
    labels.write_text("request_id,label\nr-1,1\n")
    wrong_role = gateway_cli("labels", str(labels), *where, "--token-file", str(token))
    assert wrong_role.returncode == 1 and "may not call PutLabels" in wrong_role.stderr
    writes = gateway_cli("labels", str(labels), *where, env={"GATEWAY_SIDECAR_TOKEN": writer})
    assert writes.returncode == 0, writes.stderr

    missing = gateway_cli("verdict", MODEL, *where)
    assert missing.returncode == 1 and "--token-file" in missing.stderr
    out = tmp_path / "out.parquet"
    other_ca = ("--sidecar", sidecar.address, "--ca-file", str(pki.other_ca.cert))
    untrusted = gateway_cli(
        "export", MODEL, "--out", str(out), *other_ca, "--token-file", str(token)
    )
    assert untrusted.returncode == 1 and not out.exists()

    token.chmod(0o644)
    loose = gateway_cli("report", MODEL, *where, "--token-file", str(token))
    assert loose.returncode == 2 and "chmod 600" in loose.stderr
    helps = [gateway_cli(c, "--help").stdout for c in ("report", "verdict", "labels", "export")]
    for result in (ok, by_env, wrong_role, writes, missing, untrusted, loose):
        assert reader not in result.stdout + result.stderr
    assert all("--token-file" in h and reader not in h for h in helps)


def test_commands_present_a_client_certificate(mutual: SidecarProcess, pki: Pki):
    where = ("--sidecar", mutual.address, "--ca-file", str(pki.ca.cert))
    cert = ("--cert-file", str(pki.analyst.cert), "--key-file", str(pki.analyst.key))
    ok = gateway_cli("report", MODEL, *where, *cert)
    assert ok.returncode == 0, ok.stderr
    half = gateway_cli("report", MODEL, *where, "--cert-file", str(pki.analyst.cert))
    assert half.returncode == 2 and "--cert-file and --key-file go together" in half.stderr


# --- the gateway's event stream ----------------------------------------------------------------


async def publish(
    sidecar: SidecarProcess,
    wal_dir: Path,
    events: int,
    token: str,
    tls: ClientTlsSettings,
    until: Callable[[WriteAheadLog], bool],
    timeout_s: float = 60,
) -> WriteAheadLog:
    """Stream ``events`` new events from a write-ahead log in ``wal_dir`` until ``until``."""
    wal = WriteAheadLog(wal_dir, 1 << 20, 64 << 20)
    first = wal.last + 1
    ids = [f"e-{first + i}" for i in range(events)]
    wal.append(ev.PredictionEvent(event_id=i, model=MODEL, rows=1).SerializeToString() for i in ids)
    publisher = Publisher(
        sidecar.address, wal, GatewayMetrics(), 16, 4, 1 << 20, tls=tls, token=token
    )
    publisher.start()
    publisher.notify()
    try:
        await asyncio.to_thread(wait_until, lambda: until(wal), "the publisher", timeout_s)
    finally:
        await publisher.close()
        wal.close()
    return wal


async def test_the_publisher_streams_over_tls_with_its_token(
    start_sidecar, pki: Pki, tmp_path: Path
):
    key = secrets.token_urlsafe(24)
    keys = write_keys(tmp_path / "keys.yaml", [entry("gateway", key, "publish")])
    sidecar = start_sidecar(tmp_path / "store", free_port(), env=sidecar_env(keys) | tls_env(pki))
    tls = ClientTlsSettings(ca_file=pki.ca.cert)
    await publish(sidecar, tmp_path / "wal", 100, key, tls, lambda w: w.acked == w.last)
    assert sidecar.metric("sidecar_events_total", outcome="stored") == 100


async def test_a_refused_publisher_keeps_its_events_until_its_key_is_accepted(
    start_sidecar, pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    key, other = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    keys = write_keys(tmp_path / "keys.yaml", [entry("reader", key, "read")])
    sidecar = start_sidecar(tmp_path / "store", free_port(), env=sidecar_env(keys) | tls_env(pki))
    tls = ClientTlsSettings(ca_file=pki.ca.cert)
    wal_dir = tmp_path / "wal"

    def refused_again(wal: WriteAheadLog) -> bool:
        return sidecar.metric("sidecar_auth_refused_total", rpc="Publish") >= seen + 2

    with caplog.at_level(logging.DEBUG, logger="gateway.events.publisher"):
        seen = 0
        wal = await publish(sidecar, wal_dir, 60, key, tls, refused_again)  # a read-only key
        assert wal.acked == 0
        seen = sidecar.metric("sidecar_auth_refused_total", rpc="Publish")
        await publish(sidecar, wal_dir, 0, other, tls, refused_again)  # an unknown key
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("refused the event stream (PERMISSION_DENIED" in m for m in errors), errors
    assert any("refused the event stream (UNAUTHENTICATED" in m for m in errors), errors
    assert all(key not in r.getMessage() and other not in r.getMessage() for r in caplog.records)
    assert not any("broken" in r.getMessage() for r in caplog.records)  # each told as refused
    assert sidecar.metric("sidecar_events_total", outcome="stored") == 0

    write_keys(keys, [entry("reader", key, "read"), entry("gateway", other, "publish")])
    wal = await publish(sidecar, wal_dir, 40, other, tls, lambda w: w.acked == w.last)
    assert wal.last == 100
    assert sidecar.metric("sidecar_events_total", outcome="stored") == 100  # nothing lost


# --- a real gateway ------------------------------------------------------------------------------


def infer(gateway: GatewayProcess, ids: list[str]) -> None:
    client = gateway.client()
    try:
        for request_id in ids:
            client.infer("fraud", [demo_input(2)], request_id=request_id)
    finally:
        client.close()


def test_a_gateway_streams_its_events_over_tls_once_the_sidecar_takes_its_token(
    demo_repo: Path, start_gateway, start_sidecar, pki: Pki, tmp_path: Path
):
    """A refused stream costs nothing: the gateway serves, says why (not with what key), and
    its log keeps the events until the sidecar's keys file takes the gateway's token."""
    token = secrets.token_urlsafe(24)
    keys = write_keys(tmp_path / "keys.yaml", [])
    sidecar = start_sidecar(tmp_path / "store", free_port(), env=sidecar_env(keys) | tls_env(pki))
    env = {
        "GATEWAY_EVENTS__TOKEN_FILE": str(secret_file(tmp_path / "gateway.token", token)),
        "GATEWAY_EVENTS__TLS__CA_FILE": str(pki.ca.cert),
    }
    where = ("--sidecar", sidecar.address, "--events-dir", str(tmp_path / "events"))
    gateway = start_gateway(demo_repo, *where, env=env)
    ids = [f"r-{i}" for i in range(50)]
    infer(gateway, ids[:30])
    wait_until(
        lambda: sidecar.metric("sidecar_auth_refused_total", rpc="Publish", reason="unknown") >= 2,
        "the stream refused, and tried again",
    )
    infer(gateway, ids[30:])  # refused streams never fail a prediction
    assert "refused the event stream (UNAUTHENTICATED" in gateway.stderr()
    assert gateway.metric("gateway_events_total", outcome="acked") == 0

    write_keys(keys, [entry("gateway", token, "publish")])
    wait_until(lambda: gateway.metric("gateway_events_total", outcome="acked") == 50, "acks")
    assert sidecar.metric("sidecar_events_total", outcome="stored") == 50
    assert gateway.metric("gateway_events_total", outcome="dropped") == 0
    assert token not in gateway.stderr() + sidecar.stderr()


def test_a_gateway_refuses_to_start_with_a_token_file_others_can_read(
    demo_repo: Path, tmp_path: Path
):
    token = secret_file(tmp_path / "gateway.token", secrets.token_urlsafe(24))
    token.chmod(0o640)
    env = {"GATEWAY_EVENTS__TOKEN_FILE": str(token)}
    where = ("--sidecar", f"127.0.0.1:{free_port()}", "--events-dir", str(tmp_path / "events"))
    with pytest.raises(RuntimeError, match=r"events.token_file: .* chmod 600"):
        GatewayProcess(demo_repo, tmp_path / "gateway", *where, env=env)
