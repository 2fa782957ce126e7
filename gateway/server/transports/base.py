"""What every transport is given and offers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from grpc_health.v1 import health

from gateway.server.admin import AdminServicer
from gateway.server.guard import Guard
from gateway.server.servicer import InferenceServicer

__all__ = ["Services", "Transport"]


@dataclass(frozen=True, slots=True)
class Services:
    """What a transport serves."""

    inference: InferenceServicer
    admin: AdminServicer
    health: health.aio.HealthServicer
    guard: Guard  # every RPC passes it (ModelInfer on the native front: guard.gate.identify)


class Transport(Protocol):
    name: str
    port: int  # bound by start()

    async def start(self) -> None: ...

    async def stop(self, grace_s: float) -> None:
        """No new calls; the running ones have ``grace_s`` to finish."""
