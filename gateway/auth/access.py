"""Who is calling, and may they: a call's credential -> a Principal (its tenant, its models,
admin rights), checked against the access each RPC needs (``auth.rpc_access``).

With ``auth.mode: none`` every caller is the anonymous principal, whose tenant is whatever the
request's ``tenant`` parameter says; RPCs needing admin rights still need the admin token.
With ``api_key`` the key is found in the keys file by its hash; with ``mtls`` the client
certificate's names are. Refusals never say which models exist: a model the caller may not
call is PERMISSION_DENIED whether the gateway serves it or not.
"""

from __future__ import annotations

import datetime as dt
import hmac
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field

from gateway.auth.keys import KeyEntry, KeyRing, bearer, peer_names
from gateway.errors import GatewayError, PermissionDenied, Unauthenticated
from gateway.settings import RPC_ACCESS, Access, AuthSettings
from gateway.types import DEFAULT_OPTIONS, RequestOptions

__all__ = ["ADMIN_TOKEN", "ANONYMOUS", "STRANGER", "Gatekeeper", "Principal", "current_principal"]

log = logging.getLogger(__name__)

Metadata = Iterable[tuple[str, str | bytes]] | None
AuthContext = Mapping[str, Sequence[bytes]] | None


@dataclass(frozen=True, slots=True)
class Principal:
    """A caller. ``tenant`` None: believe the request's ``tenant`` parameter (auth.mode none)."""

    name: str
    tenant: str | None
    admin: bool = False
    models: frozenset[str] = field(default_factory=lambda: frozenset({"*"}))
    # A request without parameters, as this caller's: made once, shared (options never change).
    options: RequestOptions = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        options = (
            DEFAULT_OPTIONS if self.tenant is None else DEFAULT_OPTIONS.for_tenant(self.tenant)
        )
        object.__setattr__(self, "options", options)

    def allows(self, model: str) -> bool:
        return "*" in self.models or model in self.models

    def require(self, model: str) -> None:
        """PermissionDenied unless this caller may call ``model`` (a model or a route)."""
        if not self.allows(model):
            raise PermissionDenied(f"'{self.name}' may not call model '{model}'", self.name)

    def options_of(self, options: RequestOptions) -> RequestOptions:
        """A request's options, as this caller's (its tenant, not the parameter's)."""
        if self.tenant is None:
            return options
        return self.options if options is DEFAULT_OPTIONS else options.for_tenant(self.tenant)

    @classmethod
    def of(cls, entry: KeyEntry) -> Principal:
        return cls(entry.name, entry.tenant_name, entry.admin, frozenset(entry.models))


ANONYMOUS = Principal("anonymous", None)  # auth.mode none: the request names its tenant
# With api_key or mtls, a caller without a credential on an RPC opened to anyone.
STRANGER = Principal("anonymous", "anonymous")
# The admin token's holder is trusted to say which tenant it acts for (the `tenant` parameter).
ADMIN_TOKEN = Principal("admin-token", None, admin=True)
# The caller of the RPC running in this task (set by the transport's guard).
current_principal: ContextVar[Principal] = ContextVar("current_principal", default=ANONYMOUS)


class Gatekeeper:
    """Checks each call's credential against what its RPC needs; ``on_refused(rpc, reason)``
    counts refusals, ``on_reload(outcome)`` keys-file reloads."""

    def __init__(
        self,
        settings: AuthSettings,
        admin_token: str | None,
        on_refused: Callable[[str, str], None] | None = None,
        on_reload: Callable[[str], None] | None = None,
        now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        self.mode = settings.mode
        self.access: dict[str, Access] = {rpc: settings.access(rpc) for rpc in RPC_ACCESS}
        self._admin_token = admin_token.encode() if admin_token else None
        self._on_refused = on_refused
        self._now = now
        self.keys: KeyRing | None = None
        self._principals: dict[str, Principal] = {}
        if settings.mode != "none":
            assert settings.keys_file is not None  # AuthSettings checks it
            self.keys = KeyRing(
                settings.keys_file, "auth.keys_file", settings.reload_interval_s, on_reload
            )
            self.keys.on_change.append(lambda _entries: self._principals.clear())

    def describe(self) -> str:
        """One line for the start-up log."""
        if self.mode == "none":
            return (
                "auth.mode none: callers are not authenticated and the `tenant` request "
                "parameter is believed (rate limits, budgets and costs follow what clients "
                "write); admin RPCs need admin.token. Set auth.mode api_key or mtls in production"
            )
        assert self.keys is not None
        return f"auth.mode {self.mode}: {len(self.keys.entries)} keys from auth.keys_file"

    def _refuse(self, rpc: str, reason: str, err: GatewayError) -> GatewayError:
        """``err``, counted under ``reason``."""
        if self._on_refused is not None:
            self._on_refused(rpc, reason)
        return err

    def identify(self, rpc: str, metadata: Metadata, auth_context: AuthContext = None) -> Principal:
        """The caller of ``rpc``, or Unauthenticated / PermissionDenied (admin rights).

        An RPC opened to anyone (``open``) still knows a caller that presents a credential;
        one that does not is, with api_key or mtls, the tenant "anonymous", never whatever
        its request says."""
        access = self.access[rpc]
        if self.mode == "none" and access != "admin":
            return ANONYMOUS  # the admin token would change nothing here: not even read
        presented = bearer(metadata)
        if presented and self._is_admin_token(presented):
            return ADMIN_TOKEN
        if self.mode == "none":
            if access == "admin":
                raise self._admin_refusal(rpc, presented)
            return ANONYMOUS
        assert self.keys is not None
        try:
            if self.mode == "api_key":
                entry = self.keys.admit(presented, now=self._now)
            else:
                entry = self.keys.admit(names=peer_names(auth_context), now=self._now)
        except Unauthenticated as err:
            if access == "open":
                return STRANGER
            raise self._refuse(rpc, err.reason, err) from None
        principal = self._principals.get(entry.name)
        if principal is None:
            principal = self._principals[entry.name] = Principal.of(entry)
        if access == "admin" and not principal.admin:
            raise self._refuse(
                rpc,
                "not_admin",
                PermissionDenied(f"'{entry.name}' has no admin rights ({rpc})", entry.name),
            )
        return principal

    def _is_admin_token(self, presented: str) -> bool:
        return self._admin_token is not None and hmac.compare_digest(
            presented.encode(), self._admin_token
        )

    def _admin_refusal(self, rpc: str, presented: str | None) -> GatewayError:
        if self._admin_token is None:
            reason, message = "admin_off", f"{rpc} needs admin rights, and this gateway has no "
            message += "admin.token"
        elif presented:
            reason, message = "unknown", "wrong admin bearer token"
        else:
            reason = "missing"
            message = f"{rpc} needs metadata 'authorization: Bearer <admin.token>'"
        return self._refuse(rpc, reason, Unauthenticated(message, reason))
