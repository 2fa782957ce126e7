"""Errors raised by the stages of the request path, each carrying the gRPC status it maps to.

::

    GatewayError
    ├── InvalidRequest      INVALID_ARGUMENT     bad tensor, datatype, shape, size, parameter
    ├── ModelNotFound       NOT_FOUND            unknown model or version
    ├── ModelNotReady       UNAVAILABLE          known but not loaded, or the server is draining
    ├── ModelLoadError      FAILED_PRECONDITION  the repository holds a model that cannot load
    ├── RevisionConflict    FAILED_PRECONDITION  a change based on a generation no longer current
    ├── FailedPrecondition  FAILED_PRECONDITION  what a change acts on does not allow it now
    ├── Overloaded          RESOURCE_EXHAUSTED   a bounded queue is full, a cap is reached
    │   ├── RateLimited                          a tenant is over its rate (carries retry_after_s)
    │   └── BudgetExceeded                       a tenant or surface spent its budget
    ├── DeadlineExceeded    DEADLINE_EXCEEDED    the request's deadline passed
    ├── EventLogFull        UNAVAILABLE          events are at their bound and on_full is shed
    ├── SharedStateDown     UNAVAILABLE          Redis does not answer and the concern fails closed
    ├── Unauthenticated     UNAUTHENTICATED      no credential, or one the gateway does not know
    ├── PermissionDenied    PERMISSION_DENIED    a known caller asks for what it may not do
    └── RuntimeFailure      INTERNAL             the model runtime failed on valid input

    SettingsError (ValueError)                   start-up only: a bad key or value in settings

Only ``gateway.server`` turns these into gRPC statuses.
"""

from __future__ import annotations

from typing import ClassVar

import grpc

__all__ = [
    "BudgetExceeded",
    "DeadlineExceeded",
    "EventLogFull",
    "FailedPrecondition",
    "GatewayError",
    "InvalidRequest",
    "ModelLoadError",
    "ModelNotFound",
    "ModelNotReady",
    "Overloaded",
    "PermissionDenied",
    "RateLimited",
    "RevisionConflict",
    "RuntimeFailure",
    "SettingsError",
    "SharedStateDown",
    "Unauthenticated",
]


class GatewayError(Exception):
    """Base of every error a request can end in; ``grpc_status`` is its wire status."""

    grpc_status: ClassVar[grpc.StatusCode] = grpc.StatusCode.INTERNAL


class InvalidRequest(GatewayError):
    grpc_status = grpc.StatusCode.INVALID_ARGUMENT


class ModelNotFound(GatewayError):
    grpc_status = grpc.StatusCode.NOT_FOUND


class ModelNotReady(GatewayError):
    grpc_status = grpc.StatusCode.UNAVAILABLE


class ModelLoadError(GatewayError):
    grpc_status = grpc.StatusCode.FAILED_PRECONDITION


class RevisionConflict(GatewayError):
    """A change asked to apply to a generation of the routes that is no longer current."""

    grpc_status = grpc.StatusCode.FAILED_PRECONDITION


class FailedPrecondition(GatewayError):
    """The request is well formed but what it acts on is not in a state that allows it."""

    grpc_status = grpc.StatusCode.FAILED_PRECONDITION


class Overloaded(GatewayError):
    grpc_status = grpc.StatusCode.RESOURCE_EXHAUSTED


class RateLimited(Overloaded):
    """Over a tenant's rate limit; ``retry_after_s`` goes to the client as a retry hint."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class BudgetExceeded(Overloaded):
    pass


class DeadlineExceeded(GatewayError):
    grpc_status = grpc.StatusCode.DEADLINE_EXCEEDED


class EventLogFull(GatewayError):
    """The prediction event log is at its bound: a prediction now would lose its event."""

    grpc_status = grpc.StatusCode.UNAVAILABLE


class SharedStateDown(GatewayError):
    """State shared with other replicas (state.backend: redis) cannot be read, and the
    concern's on_error is fail_closed."""

    grpc_status = grpc.StatusCode.UNAVAILABLE


class Unauthenticated(GatewayError):
    """``reason``: missing, unknown, expired (counted); ``actor``: who, where known (audit)."""

    grpc_status = grpc.StatusCode.UNAUTHENTICATED

    def __init__(
        self, message: str, reason: str = "unknown", actor: str = "unauthenticated"
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.actor = actor


class PermissionDenied(GatewayError):
    """``actor``: the known caller asking for what it may not do."""

    grpc_status = grpc.StatusCode.PERMISSION_DENIED

    def __init__(self, message: str, actor: str = "") -> None:
        super().__init__(message)
        self.actor = actor


class RuntimeFailure(GatewayError):
    grpc_status = grpc.StatusCode.INTERNAL


class SettingsError(ValueError):
    """A settings file, environment variable, flag or model config is invalid."""
