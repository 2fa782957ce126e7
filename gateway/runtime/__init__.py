"""Stage 6: model repository and ONNX Runtime sessions."""

from gateway.runtime.repository import LoadedVersion, ModelRepository
from gateway.runtime.session import OnnxRuntimeSession, SessionOptions

__all__ = [
    "LoadedVersion",
    "ModelRepository",
    "OnnxRuntimeSession",
    "SessionOptions",
]
