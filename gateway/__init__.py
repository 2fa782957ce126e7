"""An Open Inference Protocol (KServe v2) gRPC gateway on ONNX Runtime.

``Gateway`` is imported lazily: it pulls in the generated ``inference`` protobuf package, which
must not share a process with another definition of it (tritonclient registers its own).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gateway._version import __version__
from gateway.errors import (
    DeadlineExceeded,
    GatewayError,
    InvalidRequest,
    ModelLoadError,
    ModelNotFound,
    ModelNotReady,
    Overloaded,
    RuntimeFailure,
    SettingsError,
)
from gateway.settings import Settings, load_settings

if TYPE_CHECKING:
    from gateway.app import Gateway

__all__ = [
    "DeadlineExceeded",
    "Gateway",
    "GatewayError",
    "InvalidRequest",
    "ModelLoadError",
    "ModelNotFound",
    "ModelNotReady",
    "Overloaded",
    "RuntimeFailure",
    "Settings",
    "SettingsError",
    "__version__",
    "load_settings",
]


def __getattr__(name: str) -> Any:
    if name == "Gateway":
        from gateway.app import Gateway

        return Gateway
    raise AttributeError(f"module 'gateway' has no attribute {name!r}")
