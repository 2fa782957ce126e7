"""The ONNX Runtime wrapper: signature from the graph, provider choice, load errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from gateway.errors import ModelLoadError
from gateway.runtime.session import (
    CUDA,
    OnnxRuntimeSession,
    SessionOptions,
    installed_flavours,
    resolve_device,
)
from tests.models import write_echo_model

CUDA_WORKS = resolve_device("auto") == "cuda"


@pytest.fixture(scope="module")
def echo_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("echo")
    write_echo_model(root)
    return root / "1" / "model.onnx"


def test_signature_comes_from_the_graph(echo_path: Path):
    session = OnnxRuntimeSession(echo_path, SessionOptions(device="cpu"))
    specs = {s.name: s for s in session.inputs}
    assert specs["in_FP16"].datatype == "FP16"
    assert specs["in_BYTES"].datatype == "BYTES"
    assert specs["in_FP32"].shape == (-1, 2)  # symbolic batch dimension -> -1
    assert [s.name for s in session.outputs][:2] == ["out_BOOL", "out_UINT8"]
    assert session.provider == "CPUExecutionProvider"
    x = np.arange(6, dtype=np.int32).reshape(3, 2)
    assert session.run({**_zeros(session), "in_INT32": x}, ["out_INT32"])[0].tolist() == x.tolist()


def _zeros(session: OnnxRuntimeSession) -> dict[str, np.ndarray]:
    from gateway.types import NUMPY_DTYPES

    return {
        s.name: np.full((3, 2), "", object)
        if s.datatype == "BYTES"
        else np.zeros((3, 2), NUMPY_DTYPES[s.datatype])
        for s in session.inputs
    }


def test_exactly_one_onnxruntime_flavour_is_installed():
    assert len(installed_flavours()) == 1


def test_cpu_is_always_cpu():
    assert resolve_device("cpu") == "cpu"


def test_auto_follows_what_a_session_really_gets():
    expected = "cuda" if CUDA in ort.get_available_providers() and CUDA_WORKS else "cpu"
    assert resolve_device("auto") == expected


@pytest.mark.skipif(CUDA_WORKS, reason="a working GPU is present: the CPU-only error cannot occur")
def test_cuda_without_a_gpu_is_a_clear_load_error():
    with pytest.raises(ModelLoadError, match=r"runtime\.device is 'cuda' but"):
        resolve_device("cuda")


def test_a_file_that_is_not_onnx_is_a_load_error(tmp_path: Path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"not a model")
    with pytest.raises(ModelLoadError, match="ONNX Runtime cannot load it"):
        OnnxRuntimeSession(path, SessionOptions(device="cpu"))
