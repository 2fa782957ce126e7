"""Keys, bearer metadata and the gatekeeper's decisions, without a server."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
from pathlib import Path

import pytest
import yaml

from gateway.auth import ADMIN_TOKEN, ANONYMOUS, Gatekeeper, KeyRing, bearer, key_digest
from gateway.auth.access import STRANGER, Principal
from gateway.errors import PermissionDenied, SettingsError, Unauthenticated
from gateway.settings import AuthSettings

KEY_A, KEY_OPS = "key-a-123", "key-ops-456"


def write_keys(path: Path, entries: list[dict[str, object]]) -> Path:
    path.write_text(yaml.safe_dump({"keys": entries}))
    return path


def entries() -> list[dict[str, object]]:
    return [
        {"name": "a", "key_sha256": key_digest(KEY_A), "tenant": "alpha", "models": ["fraud"]},
        {"name": "ops", "key_sha256": key_digest(KEY_OPS), "admin": True},
        {"name": "svc", "subject": "spiffe://acme/svc", "tenant": "svc"},
    ]


@pytest.mark.parametrize(
    ("metadata", "found"),
    [
        ([("authorization", "Bearer k1")], "k1"),
        ([("authorization", " Bearer k1 ")], "k1"),  # what `-H 'authorization: Bearer k1'` sends
        ([("authorization", "bearer k1")], "k1"),
        ([("authorization", b"Bearer k1")], "k1"),
        ([("x-api-key", " k1")], "k1"),
        ([("authorization", "Basic dXNlcg==")], None),
        ([("user-agent", "x")], None),
        (None, None),
    ],
)
def test_bearer_reads_the_key_a_call_presents(metadata, found):
    assert bearer(metadata) == found


def test_the_ring_finds_keys_by_hash_and_subjects_by_any_name(tmp_path: Path):
    ring = KeyRing(write_keys(tmp_path / "keys.yaml", entries()), "auth.keys_file")
    found = ring.by_key(KEY_A)
    assert found is not None and found.tenant_name == "alpha"
    assert Principal.of(found).allows("fraud") and not Principal.of(found).allows("other")
    assert ring.by_key("nope") is None and ring.by_key("x" * 5000) is None
    subject = ring.by_subject(["some-cn", "spiffe://acme/svc"])
    assert subject is not None and subject.name == "svc"
    assert ring.by_subject(["some-cn"]) is None
    assert KEY_A not in (tmp_path / "keys.yaml").read_text()  # only its hash is stored


def test_the_ring_reloads_a_changed_file_and_keeps_the_old_keys_on_a_broken_one(tmp_path: Path):
    now = [0.0]
    outcomes: list[str] = []
    path = write_keys(tmp_path / "keys.yaml", entries()[:1])
    ring = KeyRing(path, "auth.keys_file", 1.0, outcomes.append, clock=lambda: now[0])
    assert ring.by_key(KEY_OPS) is None
    write_keys(path, entries())
    os.utime(path, ns=(1, 10**18))  # a different mtime, whatever the clock's resolution
    assert ring.by_key(KEY_OPS) is None  # not checked again within the interval
    now[0] = 1.5
    assert ring.by_key(KEY_OPS) is not None and outcomes == ["loaded"]
    path.write_text("keys: [{name: broken}]")
    now[0] = 3.0
    assert ring.by_key(KEY_OPS) is not None and outcomes == ["loaded", "failed"]
    path.write_text("")  # caught half written: not "no one may call"
    now[0] = 4.5
    assert ring.by_key(KEY_OPS) is not None and outcomes == ["loaded", "failed", "failed"]
    write_keys(path, [])
    now[0] = 6.0
    assert ring.by_key(KEY_OPS) is None and outcomes[-1] == "loaded"  # `keys: []` says so


async def test_on_an_event_loop_the_ring_reloads_in_a_thread_serving_the_old_keys_meanwhile(
    tmp_path: Path,
):
    now = [0.0]
    path = write_keys(tmp_path / "keys.yaml", entries()[:1])
    ring = KeyRing(path, "auth.keys_file", 1.0, clock=lambda: now[0])
    reloaded = asyncio.Event()
    ring.on_change.append(lambda _entries: reloaded.set())
    write_keys(path, entries())
    os.utime(path, ns=(1, 10**18))
    now[0] = 1.5
    assert ring.by_key(KEY_OPS) is None  # the read runs in a thread; the old keys answer
    await asyncio.wait_for(reloaded.wait(), 10)
    assert ring.by_key(KEY_OPS) is not None


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        ([{"name": "a", "subject": "x"}], "name given twice"),
        ([{"name": "b", "key_sha256": key_digest(KEY_A)}], "key_sha256 given twice"),
        ([{"name": "c"}], "exactly one of key_sha256, subject"),
        ([{"name": "d", "subject": "d", "expires": "2030-01-01T00:00:00"}], "time zone"),
        (
            [
                {"name": "e", "subject": "e", "tenant": "t", "rate_limit": {"rate": 1, "burst": 1}},
                {"name": "f", "subject": "f", "tenant": "t", "rate_limit": {"rate": 2, "burst": 1}},
            ],
            "different rate_limits",
        ),
    ],
)
def test_a_keys_file_that_contradicts_itself_is_refused(tmp_path: Path, extra, words):
    path = write_keys(tmp_path / "keys.yaml", entries() + extra)
    with pytest.raises(SettingsError, match=words) as refused:
        KeyRing(path, "auth.keys_file")
    assert "auth.keys_file" in str(refused.value)
    assert key_digest(KEY_A) not in str(refused.value)


def gate(tmp_path: Path, mode: str = "api_key", **access: str) -> Gatekeeper:
    keys = write_keys(tmp_path / "keys.yaml", entries())
    settings = AuthSettings(
        mode=mode,
        keys_file=keys if mode != "none" else None,
        rpc_access=access,
    )
    return Gatekeeper(settings, "the-admin-token")


def test_mode_none_believes_the_tenant_parameter_but_guards_admin_rpcs(tmp_path: Path):
    keeper = gate(tmp_path, "none")
    assert keeper.identify("ModelInfer", None) is ANONYMOUS
    with pytest.raises(Unauthenticated, match="needs metadata"):
        keeper.identify("RepositoryModelUnload", None)
    with pytest.raises(Unauthenticated, match="wrong admin bearer token"):
        keeper.identify("RepositoryModelUnload", [("authorization", "Bearer guess")])
    admin = keeper.identify("RepositoryModelUnload", [("authorization", "Bearer the-admin-token")])
    assert admin is ADMIN_TOKEN and admin.tenant is None
    no_token = Gatekeeper(AuthSettings(), None)
    with pytest.raises(Unauthenticated, match=r"no admin\.token"):
        no_token.identify("SetRoutes", [("authorization", "Bearer the-admin-token")])


def test_api_key_mode_names_tenants_and_rights(tmp_path: Path):
    keeper = gate(tmp_path, RepositoryIndex="open")
    with pytest.raises(Unauthenticated, match="needs a key"):
        keeper.identify("ModelInfer", None)
    caller = keeper.identify("ModelInfer", [("x-api-key", KEY_A)])
    assert caller.tenant == "alpha"
    caller.require("fraud")
    with pytest.raises(PermissionDenied, match="may not call model 'other'"):
        caller.require("other")
    with pytest.raises(PermissionDenied, match="no admin rights"):
        keeper.identify("RepositoryModelLoad", [("x-api-key", KEY_A)])
    assert keeper.identify("RepositoryModelLoad", [("x-api-key", KEY_OPS)]).admin
    # Opened by rpc_access: a caller without a credential is a stranger, never the tenant its
    # request names; one with a key is still known by it.
    assert keeper.identify("RepositoryIndex", None) is STRANGER
    assert STRANGER.tenant == "anonymous"
    assert keeper.identify("RepositoryIndex", [("x-api-key", KEY_A)]).tenant == "alpha"
    assert keeper.identify("RepositoryIndex", [("x-api-key", "wrong")]) is STRANGER


def test_an_expired_key_is_refused_from_its_date(tmp_path: Path):
    moment = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
    keys = write_keys(
        tmp_path / "keys.yaml",
        [{"name": "a", "key_sha256": key_digest(KEY_A), "expires": moment.isoformat()}],
    )
    now = [moment - dt.timedelta(seconds=1)]
    keeper = Gatekeeper(AuthSettings(mode="api_key", keys_file=keys), None, now=lambda: now[0])
    assert keeper.identify("ModelInfer", [("x-api-key", KEY_A)]).name == "a"
    now[0] = moment
    with pytest.raises(Unauthenticated, match="expired"):
        keeper.identify("ModelInfer", [("x-api-key", KEY_A)])


def test_mtls_mode_finds_the_caller_by_its_certificate(tmp_path: Path):
    keeper = gate(tmp_path, "mtls")
    context = {"x509_common_name": [b"host"], "peer_uri": [b"spiffe://acme/svc"]}
    assert keeper.identify("ModelInfer", None, context).tenant == "svc"
    # A DNS name (or any SAN but a URI) names a host, not a caller: it matches no subject.
    dns = {"x509_common_name": [b"host"], "x509_subject_alternative_name": [b"spiffe://acme/svc"]}
    with pytest.raises(Unauthenticated):
        keeper.identify("ModelInfer", None, dns)
    with pytest.raises(Unauthenticated, match="unknown client certificate"):
        keeper.identify("ModelInfer", None, {"x509_common_name": [b"stranger"]})
