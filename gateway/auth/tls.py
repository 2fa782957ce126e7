"""TLS material for servers and channels: credentials built from PEM files named in settings,
read again when the files change (a renewed certificate needs no restart)."""

from __future__ import annotations

import logging
from pathlib import Path

import grpc

from gateway.auth.keys import file_signature
from gateway.errors import SettingsError
from gateway.settings import ClientTlsSettings, TlsSettings

__all__ = ["channel_credentials", "channel_options", "server_credentials"]

log = logging.getLogger(__name__)


def _read_pem(path: Path, where: str, marker: bytes) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as err:
        raise SettingsError(f"{where}: cannot read {path}: {err.strerror}") from None
    if b"-----BEGIN " not in data or marker not in data:
        raise SettingsError(f"{where}: {path} holds no PEM {marker.decode().strip('- ')}")
    return data


def _server_config(tls: TlsSettings, where: str) -> object:
    assert tls.cert_file is not None and tls.key_file is not None
    cert = _read_pem(tls.cert_file, f"{where}.cert_file", b"CERTIFICATE-----")
    key = _read_pem(tls.key_file, f"{where}.key_file", b"PRIVATE KEY-----")
    ca = (
        _read_pem(tls.client_ca_file, f"{where}.client_ca_file", b"CERTIFICATE-----")
        if tls.client_ca_file is not None
        else None
    )
    return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)


def server_credentials(tls: TlsSettings, where: str) -> grpc.ServerCredentials:
    """TLS (mTLS with ``client_ca_file``) for a server port; ``where`` names the settings
    section in errors. The files are checked at each new handshake and read again once they
    change; a set that no longer reads keeps the one before (logged)."""
    files = [tls.cert_file, tls.key_file, tls.client_ca_file]
    seen = {"signature": file_signature(files)}  # before the read: a change during it is seen
    initial = _server_config(tls, where)

    def fetch() -> object | None:
        signature = file_signature(files)
        if signature == seen["signature"]:
            return None
        seen["signature"] = signature
        try:
            config = _server_config(tls, where)
        except SettingsError as err:
            log.error("%s: keeping the certificate loaded before: %s", where, err)
            return None
        log.info("%s: certificate files changed; new handshakes use them", where)
        return config

    return grpc.dynamic_ssl_server_credentials(
        initial, fetch, require_client_authentication=tls.client_ca_file is not None
    )


def channel_credentials(tls: ClientTlsSettings, where: str) -> grpc.ChannelCredentials:
    """TLS for a channel: the server must present a certificate ``ca_file`` signed; with
    ``cert_file``, this side presents its own (mTLS). Read at each call (each connection)."""
    assert tls.ca_file is not None
    ca = _read_pem(tls.ca_file, f"{where}.ca_file", b"CERTIFICATE-----")
    cert = key = None
    if tls.cert_file is not None and tls.key_file is not None:
        cert = _read_pem(tls.cert_file, f"{where}.cert_file", b"CERTIFICATE-----")
        key = _read_pem(tls.key_file, f"{where}.key_file", b"PRIVATE KEY-----")
    return grpc.ssl_channel_credentials(ca, key, cert)


def channel_options(tls: ClientTlsSettings) -> list[tuple[str, str]]:
    """Channel options a TLS channel needs (the name to verify, when not the host's)."""
    if tls.server_name:
        return [("grpc.ssl_target_name_override", tls.server_name)]
    return []
