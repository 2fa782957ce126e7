"""The guard every unary RPC passes before its request is parsed: who is calling
(``auth.Gatekeeper``), may they call this RPC and the model it names, and, for an RPC that
needs admin rights, an audit line with the outcome and the state before and after.

The caller is left in ``auth.current_principal`` for the RPC's own body (listings filtered to
the models the caller may see).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from gateway.auth import AuditLog, Gatekeeper, Principal, current_principal
from gateway.errors import GatewayError, PermissionDenied, Unauthenticated

__all__ = ["Guard", "State"]

# The state an admin RPC changes, read before and after it runs (from its request message).
State = Callable[[Any], Any]


class Guard:
    def __init__(
        self, gate: Gatekeeper, audit: AuditLog, states: dict[str, State] | None = None
    ) -> None:
        self.gate = gate
        self._audit = audit
        self._states = states or {}
        self._audited = {rpc for rpc in gate.access if gate.access[rpc] == "admin"}

    def identify(self, rpc: str, context: grpc.aio.ServicerContext) -> Principal:
        """The caller of ``rpc`` on a grpc.aio call (its metadata, its TLS peer), or the
        GatewayError refusing it; a refused admin call is audited."""
        auth_context = context.auth_context() if self.gate.mode == "mtls" else None
        try:
            return self.gate.identify(rpc, context.invocation_metadata(), auth_context)
        except (Unauthenticated, PermissionDenied) as err:
            if rpc in self._audited:
                self._audit.refused(err.actor, rpc, err.grpc_status.name, context.peer() or "")
            raise

    async def run(
        self,
        rpc: str,
        context: grpc.aio.ServicerContext,
        message: Any,
        principal: Principal,
        body: Callable[[], Awaitable[Any]],
    ) -> Any:
        """``body`` for ``principal``, after checking the model ``message`` names; audited
        when ``rpc`` needs admin rights."""
        model = _model_named(message)
        if model:
            try:
                principal.require(model)
            except PermissionDenied as err:
                if rpc in self._audited:
                    self._audit.refused(err.actor, rpc, err.grpc_status.name, context.peer() or "")
                raise
        current_principal.set(principal)
        if rpc not in self._audited:
            return await body()
        state = self._states.get(rpc)
        before = state(message) if state is not None else None
        outcome = "OK"
        try:
            return await body()
        except asyncio.CancelledError:
            outcome = "CANCELLED"
            raise
        except Exception as err:
            # An abort left its status on the context; a GatewayError carries its own.
            code = context.code() if isinstance(err, grpc.aio.AbortError) else None
            outcome = (
                code.name
                if isinstance(code, grpc.StatusCode)
                else err.grpc_status.name
                if isinstance(err, GatewayError)
                else "UNKNOWN"
            )
            raise
        finally:
            after = state(message) if state is not None else None
            self._audit.record(
                principal.name,
                rpc,
                outcome,
                model or _route_named(message),
                before,
                after,
                peer=context.peer() or "",
            )


def _model_named(message: Any) -> str:
    """The model (or route) a request names, where its message has that field."""
    for name in ("name", "model_name"):
        value = getattr(message, name, None)
        if isinstance(value, str):
            return value
    return ""


def _route_named(message: Any) -> str:
    value = getattr(message, "route", None)
    return value if isinstance(value, str) else ""
