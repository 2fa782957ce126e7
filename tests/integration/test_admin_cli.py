"""The admin commands (``gateway routes``, ``gateway costs``) as an operator runs them, in a
process of their own, against a real gateway serving TLS: the key comes from a 0600 file or
the environment, never from a flag (command lines show in ``ps``); the gateway is verified
against ``--ca-file``; with mTLS a client certificate holding admin rights stands for the key.
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from tests.auth import secret_file, write_keys
from tests.certs import Authority, authority
from tests.conftest import GatewayProcess

pytestmark = pytest.mark.integration

TOKEN = secrets.token_urlsafe(24)


def gateway_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m gateway <args>``, with no admin key in its environment unless ``env`` has
    one."""
    base = {k: v for k, v in os.environ.items() if k != "GATEWAY_ADMIN_TOKEN"}
    command = [sys.executable, "-m", "gateway", *args]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=120, env={**base, **(env or {})}
    )


def tls_gateway(
    start_gateway: Callable[..., GatewayProcess],
    workdir: Path,
    repository: Path,
    ca: Authority,
    mutual: bool = False,
    **sections: object,
) -> GatewayProcess:
    """The demo's settings (its route and budget) over TLS (``mutual``: clients show a
    certificate ``ca`` signed), with ``sections`` replacing the demo's; grpcio serves TLS, so
    the transport is auto whatever the environment names."""
    server = ca.issue("gateway", server=True)
    settings = yaml.safe_load((repository / "gateway.yaml").read_text())
    settings["tls"] = {"cert_file": str(server.cert), "key_file": str(server.key)}
    if mutual:
        settings["tls"]["client_ca_file"] = str(ca.cert)
    settings.update(sections)
    config = workdir / "gateway.yaml"
    config.write_text(yaml.safe_dump(settings))
    return start_gateway(repository, "--config", str(config), "--transport", "auto")


def failed_plainly(result: subprocess.CompletedProcess[str], code: int) -> bool:
    """The command exited ``code``, its last line an error (``gateway: error: ...``, or
    argparse's ``gateway routes: error: ...``), and no traceback."""
    last = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ""
    return (
        result.returncode == code
        and "Traceback" not in result.stderr
        and re.match(r"gateway( [a-z-]+)?: error: ", last) is not None
    )


def test_routes_and_costs_verify_the_gateway_and_read_the_key_from_a_file(
    demo_repo: Path, start_gateway, tmp_path: Path
):
    ca, other = authority(tmp_path / "ca"), authority(tmp_path / "other", "other-ca")
    token = secret_file(tmp_path / "admin.token", TOKEN)
    proc = tls_gateway(start_gateway, tmp_path, demo_repo, ca, admin={"token_file": str(token)})
    assert "transport: grpcio" in proc.stderr()
    where = ("--url", proc.url, "--ca-file", str(ca.cert))

    routes = gateway_cli("routes", *where, "--token-file", str(token))
    assert routes.returncode == 0, routes.stderr
    assert "fraud-live" in yaml.safe_load(routes.stdout)
    costs = gateway_cli("costs", *where, "--token-file", str(token))
    assert costs.returncode == 0, costs.stderr
    assert "demo-tenant" in costs.stdout  # the budgets table
    by_env = gateway_cli("costs", *where, env={"GATEWAY_ADMIN_TOKEN": TOKEN})
    assert by_env.returncode == 0, by_env.stderr

    plain = gateway_cli("routes", "--url", proc.url, "--token-file", str(token))
    assert failed_plainly(plain, 1) and "--ca-file" in plain.stderr, plain.stderr
    assert f"gateway at {proc.url}" in plain.stderr and plain.stdout == ""
    untrusted = gateway_cli("costs", "--url", proc.url, "--ca-file", str(other.cert))
    assert failed_plainly(untrusted, 1), untrusted.stderr
    keyless = gateway_cli("costs", *where)
    assert failed_plainly(keyless, 1), keyless.stderr
    assert "--token-file" in keyless.stderr and "$GATEWAY_ADMIN_TOKEN" in keyless.stderr
    absent_ca = gateway_cli("routes", "--url", proc.url, "--ca-file", str(tmp_path / "no.pem"))
    assert failed_plainly(absent_ca, 2) and "cannot read" in absent_ca.stderr

    flag = gateway_cli("routes", *where, "--token", TOKEN)  # the flag it no longer has
    assert failed_plainly(flag, 2) and "--token-file" in flag.stderr
    token.chmod(0o644)
    loose = gateway_cli("routes", *where, "--token-file", str(token))
    assert failed_plainly(loose, 2) and "chmod 600" in loose.stderr

    helps = [gateway_cli(c, "--help") for c in ("routes", "promote", "rollback", "costs", "cache")]
    for text in (h.stdout for h in helps):
        assert "--token-file" in text and "--ca-file" in text
        assert not re.search(r"--token(?!-file)", text)
    runs = [routes, costs, by_env, plain, untrusted, keyless, absent_ca, flag, loose, *helps]
    assert not [r.args for r in runs if TOKEN in r.stdout + r.stderr]
    assert TOKEN not in proc.stderr() + proc.stdout()


def test_a_client_certificate_with_admin_rights_stands_for_the_key(
    demo_repo: Path, start_gateway, tmp_path: Path
):
    ca = authority(tmp_path / "ca")
    keys = write_keys(
        tmp_path / "keys.yaml",
        [{"name": "ops", "subject": "ops", "admin": True}, {"name": "viewer", "subject": "viewer"}],
    )
    auth = {"mode": "mtls", "keys_file": str(keys)}
    proc = tls_gateway(start_gateway, tmp_path, demo_repo, ca, mutual=True, auth=auth, admin={})
    where = ("--url", proc.url, "--ca-file", str(ca.cert))

    def holding(common_name: str) -> tuple[str, ...]:
        issued = ca.issue(common_name)
        return ("--cert-file", str(issued.cert), "--key-file", str(issued.key))

    ops = gateway_cli("routes", *where, *holding("ops"))
    assert ops.returncode == 0, ops.stderr
    assert "fraud-live" in yaml.safe_load(ops.stdout)
    viewer = gateway_cli("costs", *where, *holding("viewer"))
    assert failed_plainly(viewer, 1) and "'viewer' has no admin rights" in viewer.stderr
    anonymous = gateway_cli("costs", *where)  # no certificate: the handshake fails
    assert failed_plainly(anonymous, 1), anonymous.stderr
    half = gateway_cli("costs", *where, *holding("ops")[:2])
    assert failed_plainly(half, 2) and "--cert-file and --key-file go together" in half.stderr
