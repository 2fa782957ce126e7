"""Credentials: the keys file (keys kept as SHA-256 hashes, mTLS subjects), bearer keys read
from call metadata, and TLS credentials for servers and channels whose files are read again
when they change.

The keys file (YAML) serves the gateway (tenants) and the sidecar (roles) alike::

    keys:
      - name: checkout-web            # shown in logs and the audit log; never the key
        key_sha256: 9f86d0...         # `gateway keygen` makes a key and prints this line
        tenant: checkout
        models: [fraud-live]          # models and routes it may call; default ["*"]
        rate_limit: {rate: 200, burst: 400}
        budget: {limit: 50.0, window_s: 3600, policy: reject}
        expires: 2027-06-30T00:00:00Z
      - name: ops
        key_sha256: 60303a...
        admin: true                   # admin rights (repository load/unload, the admin service)
      - name: billing-batch
        subject: spiffe://acme/billing    # mTLS: the client certificate's CN or a SAN
        tenant: billing
      - name: gateway-publisher       # the sidecar's file: roles instead of tenants
        key_sha256: 2c26b4...
        roles: [publish]

A key is looked up by the hash of what the caller presents, and the stored hash is compared
again in constant time (``hmac.compare_digest``); the file never holds a key itself.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Literal

import grpc
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from gateway.errors import SettingsError
from gateway.settings import (
    ClientTlsSettings,
    RateLimit,
    TlsSettings,
    describe_validation_error,
)

__all__ = [
    "KeyBudget",
    "KeyEntry",
    "KeyRing",
    "bearer",
    "channel_credentials",
    "channel_options",
    "key_digest",
    "peer_names",
    "server_credentials",
]

log = logging.getLogger(__name__)

MAX_KEYS_FILE_BYTES = 4 * 1024 * 1024
MAX_KEYS = 100_000
MAX_CREDENTIAL_CHARS = 1024  # a presented key longer than this is refused unhashed
_BEARER = "bearer "
_HEX64 = r"^[0-9a-f]{64}$"
Role = Literal["publish", "write", "read"]


def key_digest(key: str) -> str:
    """The SHA-256 of a key, as the keys file stores it (hex)."""
    return hashlib.sha256(key.encode()).hexdigest()


def bearer(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The key a call presents: ``authorization: Bearer <key>`` or ``x-api-key: <key>``."""
    for name, value in metadata or ():
        if name == "authorization":
            text = (value if isinstance(value, str) else value.decode(errors="replace")).lstrip()
            if text[: len(_BEARER)].lower() == _BEARER:
                return text[len(_BEARER) :].strip()
        elif name == "x-api-key":
            return (value if isinstance(value, str) else value.decode(errors="replace")).strip()
    return None


def peer_names(auth_context: Mapping[str, Sequence[bytes]] | None) -> list[str]:
    """The names a TLS client's certificate carries: its CN, then its SANs (DNS, URI, ...)."""
    if not auth_context:
        return []
    names = [*auth_context.get("x509_common_name", ())]
    names += auth_context.get("x509_subject_alternative_name", ())
    return [n.decode(errors="replace") for n in names]


class KeyBudget(BaseModel):
    """A key's own spend cap per window (its tenant's budget)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    limit: float = Field(gt=0)
    window_s: int = Field(3600, gt=0)
    policy: Literal["reject", "alert"] = "reject"


class KeyEntry(BaseModel):
    """One caller: a key (by its hash) or a certificate subject, and what it may do."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
    key_sha256: str | None = Field(None, pattern=_HEX64)
    subject: str | None = Field(None, min_length=1, max_length=1024)
    tenant: str = Field("", max_length=1024, description="Default: the entry's name.")
    models: tuple[str, ...] = ("*",)
    admin: bool = False
    roles: tuple[Role, ...] = ()
    rate_limit: RateLimit | None = None
    budget: KeyBudget | None = None
    expires: dt.datetime | None = None

    @model_validator(mode="after")
    def _one_credential(self) -> KeyEntry:
        if (self.key_sha256 is None) == (self.subject is None):
            raise ValueError(f"key '{self.name}': give exactly one of key_sha256, subject")
        if self.expires is not None and self.expires.tzinfo is None:
            raise ValueError(f"key '{self.name}': expires needs a time zone (e.g. ...Z)")
        return self

    @property
    def tenant_name(self) -> str:
        return self.tenant or self.name

    def allows(self, model: str) -> bool:
        return "*" in self.models or model in self.models

    def expired(self, now: dt.datetime) -> bool:
        return self.expires is not None and now >= self.expires


class _KeysFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    keys: tuple[KeyEntry, ...] = Field((), max_length=MAX_KEYS)

    @model_validator(mode="after")
    def _unique(self) -> _KeysFile:
        for field in ("name", "key_sha256", "subject"):
            values = [getattr(k, field) for k in self.keys if getattr(k, field) is not None]
            if len(values) != len(set(values)):
                twice = sorted({v for v in values if values.count(v) > 1})
                shown = twice if field != "key_sha256" else [f"{v[:8]}..." for v in twice]
                raise ValueError(f"keys: {field} given twice: {shown}")
        # A rate limit or budget is its tenant's: the keys of one tenant must agree on it.
        for field in ("rate_limit", "budget"):
            seen: dict[str, object] = {}
            for key in self.keys:
                value = getattr(key, field)
                if value is None:
                    continue
                if seen.setdefault(key.tenant_name, value) != value:
                    raise ValueError(
                        f"keys: tenant '{key.tenant_name}' has keys with different {field}s"
                    )
        return self


def _signature(paths: Sequence[Path | None]) -> tuple[tuple[int, int, int], ...]:
    """What changes when any of ``paths`` is rewritten or replaced."""
    out = []
    for path in paths:
        if path is None:
            continue
        try:
            st = os.stat(path)
            out.append((st.st_ino, st.st_size, st.st_mtime_ns))
        except OSError:
            out.append((0, -1, 0))
    return tuple(out)


class KeyRing:
    """The keys file, looked up by presented key or certificate subject, and read again
    (at most every ``interval_s``) when it changes. A file that no longer reads or
    validates keeps the keys loaded before it; ``on_reload`` hears "loaded" or "failed";
    ``on_change`` gets the new entries after each good reload."""

    def __init__(
        self,
        path: Path,
        where: str,
        interval_s: float = 1.0,
        on_reload: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._path = path
        self._where = where
        self._interval_s = interval_s
        self._on_reload = on_reload
        self._clock = clock
        self.on_change: list[Callable[[tuple[KeyEntry, ...]], None]] = []
        self._signature = _signature([path])
        self._install(self._read())
        self._next_check = clock() + interval_s

    @property
    def entries(self) -> tuple[KeyEntry, ...]:
        self.refresh()
        return self._entries

    def _read(self) -> tuple[KeyEntry, ...]:
        try:
            with self._path.open("rb") as handle:
                raw = handle.read(MAX_KEYS_FILE_BYTES + 1)
        except OSError as err:
            raise SettingsError(
                f"{self._where}: cannot read {self._path}: {err.strerror}"
            ) from None
        if len(raw) > MAX_KEYS_FILE_BYTES:
            raise SettingsError(f"{self._where}: {self._path} is over {MAX_KEYS_FILE_BYTES} bytes")
        try:
            tree = yaml.safe_load(raw) or {}
            return _KeysFile.model_validate(tree).keys
        except yaml.YAMLError as err:
            raise SettingsError(f"{self._where}: {self._path} is not valid YAML: {err}") from None
        except ValidationError as err:
            raise SettingsError(
                describe_validation_error(err, f"{self._where} ({self._path})")
            ) from None

    def _install(self, entries: tuple[KeyEntry, ...]) -> None:
        self._entries = entries
        self._by_digest = {e.key_sha256: e for e in entries if e.key_sha256 is not None}
        self._by_subject = {e.subject: e for e in entries if e.subject is not None}

    def refresh(self) -> None:
        """Read the file again if it changed (checked at most every ``interval_s``)."""
        now = self._clock()
        if now < self._next_check:
            return
        self._next_check = now + self._interval_s
        signature = _signature([self._path])
        if signature == self._signature:
            return
        self._signature = signature
        try:
            entries = self._read()
        except SettingsError as err:
            log.error("%s: keeping the keys loaded before: %s", self._where, err)
            if self._on_reload is not None:
                self._on_reload("failed")
            return
        self._install(entries)
        log.info("%s: %d keys loaded from %s", self._where, len(entries), self._path)
        if self._on_reload is not None:
            self._on_reload("loaded")
        for listener in self.on_change:
            listener(entries)

    def by_key(self, presented: str) -> KeyEntry | None:
        """The entry of a presented key; None when no entry has it."""
        if len(presented) > MAX_CREDENTIAL_CHARS:
            return None
        self.refresh()
        digest = key_digest(presented)
        entry = self._by_digest.get(digest)
        if entry is None or entry.key_sha256 is None:
            return None
        return entry if hmac.compare_digest(entry.key_sha256, digest) else None

    def by_subject(self, names: Sequence[str]) -> KeyEntry | None:
        """The entry of the first of a certificate's names (CN, then SANs) the file lists."""
        self.refresh()
        for name in names:
            if (entry := self._by_subject.get(name)) is not None:
                return entry
        return None


# --- TLS ---------------------------------------------------------------------------------------


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
    initial = _server_config(tls, where)
    seen = {"signature": _signature(files)}

    def fetch() -> object | None:
        signature = _signature(files)
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
