"""Who a caller is: the keys file (keys kept as SHA-256 hashes, mTLS subjects), re-read when
it changes, and the credential a call presents (a bearer key in its metadata, a certificate's
names).

The keys file (YAML) serves the gateway (tenants) and the sidecar (roles) alike::

    keys:
      - name: checkout-web            # shown in logs and the audit log; never the key
        key_sha256: 9f86d0...         # printf %s "$KEY" | sha256sum
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

A key is looked up by the SHA-256 of what the caller presents: how long the lookup takes
depends on that hash, never on how much of a real key the caller guessed; the file never
holds a key itself. The file is parsed off the event loop (a large one takes a while), and a
file that no longer parses, or is empty, keeps the keys loaded before.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from gateway.errors import SettingsError, Unauthenticated
from gateway.settings import RateLimit, describe_validation_error, describe_yaml_error

__all__ = [
    "KeyBudget",
    "KeyEntry",
    "KeyRing",
    "bearer",
    "file_signature",
    "key_digest",
    "peer_names",
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
    """The names a TLS client's certificate proves: its CN, then its URI SANs (a SPIFFE id).
    Other SANs (DNS names, addresses, e-mail) name hosts and mailboxes, not callers."""
    if not auth_context:
        return []
    names = [*auth_context.get("x509_common_name", ()), *auth_context.get("peer_uri", ())]
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

    def expired(self, now: dt.datetime) -> bool:
        return self.expires is not None and now >= self.expires


class _KeysFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    keys: tuple[KeyEntry, ...] = Field((), max_length=MAX_KEYS)

    @model_validator(mode="after")
    def _unique(self) -> _KeysFile:
        for field in ("name", "key_sha256", "subject"):
            counts = Counter(getattr(k, field) for k in self.keys if getattr(k, field) is not None)
            twice = sorted(v for v, n in counts.items() if n > 1)
            if twice:
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


def file_signature(paths: Sequence[Path | None]) -> tuple[tuple[int, int, int], ...]:
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
    """The keys file, looked up by presented key or certificate names, and read again (at
    most every ``interval_s``) when it changes: off the event loop when one runs, the keys
    loaded before serving meanwhile. A file that no longer reads, validates, or holds
    anything keeps the keys loaded before; ``on_reload`` hears "loaded" or "failed";
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
        self._signature = file_signature([path])
        self._reloading = False
        entries = self._read()
        if isinstance(entries, SettingsError):
            raise entries
        self._install(entries)
        self._next_check = clock() + interval_s

    @property
    def entries(self) -> tuple[KeyEntry, ...]:
        self.refresh()
        return self._entries

    def _read(self) -> tuple[KeyEntry, ...] | SettingsError:
        """The file's entries, or why they cannot be had (returned: this runs in a thread)."""
        where, path = self._where, self._path
        try:
            with path.open("rb") as handle:
                raw = handle.read(MAX_KEYS_FILE_BYTES + 1)
        except OSError as err:
            return SettingsError(f"{where}: cannot read {path}: {err.strerror}")
        if len(raw) > MAX_KEYS_FILE_BYTES:
            return SettingsError(f"{where}: {path} is over {MAX_KEYS_FILE_BYTES} bytes")
        try:
            tree = yaml.load(raw, Loader=_Loader)
        except yaml.YAMLError as err:
            return SettingsError(f"{where}: {path}: {describe_yaml_error(err)}")
        if tree is None:  # empty, or caught half written: never read as "no one may call"
            return SettingsError(f"{where}: {path} is empty (to admit no one: `keys: []`)")
        try:
            return _KeysFile.model_validate(tree).keys
        except ValidationError as err:
            return SettingsError(describe_validation_error(err, f"{where} ({path})"))

    def _install(self, entries: tuple[KeyEntry, ...]) -> None:
        self._entries = entries
        self._by_digest = {e.key_sha256: e for e in entries if e.key_sha256 is not None}
        self._by_subject = {e.subject: e for e in entries if e.subject is not None}

    def refresh(self) -> None:
        """Read the file again if it changed (checked at most every ``interval_s``)."""
        now = self._clock()
        if now < self._next_check or self._reloading:
            return
        self._next_check = now + self._interval_s
        signature = file_signature([self._path])
        if signature == self._signature:
            return
        self._signature = signature
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._reloaded(self._read())
            return
        self._reloading = True
        reading = loop.run_in_executor(None, self._read)
        reading.add_done_callback(lambda done: self._reloaded(done.result()))

    def _reloaded(self, entries: tuple[KeyEntry, ...] | SettingsError) -> None:
        self._reloading = False
        if isinstance(entries, SettingsError):
            log.error("%s: keeping the keys loaded before: %s", self._where, entries)
            if self._on_reload is not None:
                self._on_reload("failed")
            return
        self._install(entries)
        log.info("%s: %d keys loaded from %s", self._where, len(entries), self._path)
        if self._on_reload is not None:
            self._on_reload("loaded")
        for listener in self.on_change:
            try:
                listener(entries)
            except Exception:  # one listener's failure must not stop the others
                log.exception("%s: applying the reloaded keys failed", self._where)

    def by_key(self, presented: str) -> KeyEntry | None:
        """The entry of a presented key; None when no entry has it."""
        if len(presented) > MAX_CREDENTIAL_CHARS:
            return None
        self.refresh()
        return self._by_digest.get(key_digest(presented))

    def by_subject(self, names: Sequence[str]) -> KeyEntry | None:
        """The entry of the first of a certificate's names (CN, then URI SANs) the file lists."""
        self.refresh()
        for name in names:
            if (entry := self._by_subject.get(name)) is not None:
                return entry
        return None

    def admit(
        self,
        key: str | None = None,
        names: Sequence[str] | None = None,
        *,
        now: Callable[[], dt.datetime],
    ) -> KeyEntry:
        """The entry of a presented ``key`` (or of a certificate's ``names``), valid at
        ``now()`` (asked only of an entry that expires); Unauthenticated otherwise, its
        ``reason`` missing, unknown or expired."""
        by_key = names is None
        if not (key if by_key else names):
            what = (
                "a key: metadata 'authorization: Bearer <key>' or 'x-api-key: <key>'"
                if by_key
                else "a client certificate"
            )
            raise Unauthenticated(f"this service needs {what}", reason="missing")
        entry = self.by_key(key) if key is not None else self.by_subject(names or ())
        if entry is None:
            what = "key" if by_key else "client certificate"
            raise Unauthenticated(f"unknown {what}", reason="unknown")
        if entry.expires is not None and entry.expired(now()):
            raise Unauthenticated(
                f"the credential '{entry.name}' has expired", reason="expired", actor=entry.name
            )
        return entry


# libyaml's safe loader where PyYAML was built with it: a large keys file parses ~10x faster.
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
