"""Stage 6, the runtime: one ONNX Runtime session per loaded model version.

The execution provider is decided by what a created session actually got, not by what
``get_available_providers`` lists: onnxruntime-gpu lists CUDA even on a machine with no GPU.
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import onnxruntime as ort
from numpy.typing import NDArray

from gateway.errors import ModelLoadError
from gateway.settings import Device, GraphOptimization
from gateway.types import TensorSpec

__all__ = [
    "OnnxRuntimeSession",
    "SessionOptions",
    "installed_flavours",
    "resolve_device",
]

log = logging.getLogger(__name__)

CPU: Final = "CPUExecutionProvider"
CUDA: Final = "CUDAExecutionProvider"

_ORT_TYPES: Final[dict[str, str]] = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}

_OPTIMIZATION: Final = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}

# ORT's default logger prints warnings (and, for a CUDA provider with no GPU, a loud error)
# straight to stderr. Errors that matter reach us as exceptions, so keep its log at ERROR.
_ORT_LOG_ERROR: Final = 3
_ORT_LOG_FATAL: Final = 4
ort.set_default_logger_severity(_ORT_LOG_ERROR)


@dataclass(frozen=True, slots=True)
class SessionOptions:
    device: Device = "auto"
    intra_op_threads: int = 1
    inter_op_threads: int = 1
    graph_optimization: GraphOptimization = "all"


_probe_lock = threading.Lock()


@functools.cache
def _cuda_works() -> tuple[bool, str]:
    """Create a one-node session on CUDA and see whether it really runs there (once)."""
    if CUDA not in ort.get_available_providers():
        return False, "this onnxruntime build has no CUDA provider"
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "cuda_probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    options = ort.SessionOptions()
    options.log_severity_level = _ORT_LOG_FATAL
    # NOTE: the CUDA provider logs its load failure through the default logger, not the
    # session's; silence it for the probe only.
    with _probe_lock:
        ort.set_default_logger_severity(_ORT_LOG_FATAL)
        try:
            session = ort.InferenceSession(
                model.SerializeToString(), options, providers=[CUDA, CPU]
            )
            got = session.get_providers()
        except Exception as err:
            return False, f"CUDA session failed: {err}"
        finally:
            ort.set_default_logger_severity(_ORT_LOG_ERROR)
    if got and got[0] == CUDA:
        return True, "CUDA session created"
    return False, "CUDA provider listed but the session fell back to CPU (no usable GPU)"


def resolve_device(device: Device) -> Device:
    """Turn ``auto`` into ``cuda`` or ``cpu``; ``cuda`` without a working GPU is an error."""
    if device == "cpu":
        return "cpu"
    works, why = _cuda_works()
    if device == "cuda" and not works:
        raise ModelLoadError(f"runtime.device is 'cuda' but {why}")
    return "cuda" if works else "cpu"


def installed_flavours() -> list[str]:
    """The ONNX Runtime distributions installed; more than one share (and break) one module."""
    found = []
    for name in ("onnxruntime", "onnxruntime-gpu"):
        try:
            importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        found.append(name)
    return found


def _dims(shape: Sequence[int | str | None]) -> tuple[int, ...]:
    return tuple(d if isinstance(d, int) and d >= 0 else -1 for d in shape)


class OnnxRuntimeSession:
    """A model version's ONNX Runtime session; ``run`` is blocking and thread-safe."""

    def __init__(self, path: Path, options: SessionOptions) -> None:
        device = resolve_device(options.device)
        session_options = ort.SessionOptions()
        session_options.intra_op_num_threads = options.intra_op_threads
        session_options.inter_op_num_threads = options.inter_op_threads
        session_options.graph_optimization_level = _OPTIMIZATION[options.graph_optimization]
        session_options.log_severity_level = _ORT_LOG_ERROR
        providers = [CUDA, CPU] if device == "cuda" else [CPU]
        try:
            self._session = ort.InferenceSession(str(path), session_options, providers=providers)
        except Exception as err:
            raise ModelLoadError(f"{path}: ONNX Runtime cannot load it: {err}") from err
        self.provider: str = self._session.get_providers()[0]
        if device == "cuda" and self.provider != CUDA:
            raise ModelLoadError(f"{path}: session did not get the CUDA provider")
        self.inputs = tuple(self._spec(arg) for arg in self._session.get_inputs())
        self.outputs = tuple(self._spec(arg) for arg in self._session.get_outputs())

    @staticmethod
    def _spec(arg: ort.NodeArg) -> TensorSpec:
        datatype = _ORT_TYPES.get(arg.type)
        if datatype is None:
            raise ModelLoadError(f"tensor '{arg.name}' has type {arg.type}, which OIP cannot carry")
        return TensorSpec(arg.name, datatype, _dims(arg.shape))

    def run(
        self, feeds: Mapping[str, NDArray[np.generic]], output_names: Sequence[str]
    ) -> list[NDArray[np.generic]]:
        return list(self._session.run(list(output_names), dict(feeds)))
