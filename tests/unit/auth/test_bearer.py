"""What a client presents: the bearer metadata and the credentials' channel."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from gateway.auth import bearer, bearer_metadata
from gateway.auth.bearer import ClientCredentials
from gateway.errors import SettingsError
from gateway.settings import ClientTlsSettings


def test_bearer_metadata_is_what_the_server_reads():
    metadata = bearer_metadata("k-123")
    assert metadata == (("authorization", "Bearer k-123"),)
    assert bearer(metadata) == "k-123"
    assert bearer_metadata(None) == () and bearer_metadata("") == ()


@pytest.mark.parametrize("token", ["line\nbreak", "café", "tab\there"])
def test_a_key_no_header_can_carry_is_refused_without_repeating_it(token):
    with pytest.raises(SettingsError) as refused:
        bearer_metadata(token, "--token-file")
    assert "--token-file" in str(refused.value) and token not in str(refused.value)
    with pytest.raises(SettingsError):
        ClientCredentials(token)


def test_credentials_keep_their_key_out_of_their_repr():
    assert "s3cr3t" not in repr(ClientCredentials("s3cr3t"))


def test_a_tls_channel_reads_its_files_and_names_them(tmp_path: Path):
    plain = ClientCredentials().channel("127.0.0.1:1", "gateway")
    plain.close()
    missing = ClientCredentials(tls=ClientTlsSettings(ca_file=tmp_path / "absent.pem"))
    with pytest.raises(SettingsError, match=r"gateway\.ca_file: cannot read"):
        missing.channel("127.0.0.1:1", "gateway")
    not_pem = tmp_path / "ca.pem"
    not_pem.write_text("not a certificate")
    with pytest.raises(SettingsError, match="no PEM"):
        ClientCredentials(tls=ClientTlsSettings(ca_file=not_pem)).channel("127.0.0.1:1", "x")
    assert isinstance(plain, grpc.Channel)
