"""Peer servers for ``bench_transport.py --peers``: PyTriton and MLServer serving the same MLP
(benchmarks/models.py ``write_mlp``, 32 -> 256 -> 256 -> 1) through ONNX Runtime, with dynamic
batching (PyTriton: Triton's dynamic batcher in front of a ``@batch`` function) or adaptive
batching (MLServer: ``max_batch_size`` 1024, ``max_batch_time`` 0.5 ms).

Neither is a dependency of the project, and their own dependencies clash with the gateway's
(grpcio, protobuf, fastapi): each runs under its own interpreter, this one when the package
imports here, else ``.bench/peers/<peer>-venv/bin/python`` (.bench/ is ignored by git):

    python3.11 -m venv .bench/peers/pytriton-venv
    .bench/peers/pytriton-venv/bin/pip install nvidia-pytriton onnxruntime numpy
    python3.11 -m venv .bench/peers/mlserver-venv
    .bench/peers/mlserver-venv/bin/pip install mlserver onnxruntime numpy

A runner binds 127.0.0.1 only, prints ``ready grpc=127.0.0.1:PORT`` once the model answers,
and stops on SIGTERM (its children, Triton's server and stubs, are in its process group, which
the benchmark stops as a whole).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
PACKAGES = {"pytriton": "pytriton", "mlserver": "mlserver"}


def peer_python(name: str) -> str | None:
    """An interpreter where peer ``name``'s package imports (None: no such interpreter)."""
    for python in (
        Path(sys.executable),
        ROOT / ".bench" / "peers" / f"{name}-venv" / "bin" / "python",
    ):
        if not python.exists():
            continue
        probe = [str(python), "-c", f"import {PACKAGES[name]}, onnxruntime"]
        if subprocess.run(probe, capture_output=True, timeout=120).returncode == 0:
            return str(python)
    return None


def peer_command(name: str, model: Path, model_config: Path) -> list[str]:
    """The command that serves ``model`` as ``mlp`` on peer ``name``; ``model_config``: a
    serialized ModelConfigResponse for the servers that have no ModelConfig RPC of their own."""
    python = peer_python(name)
    if python is None:
        raise RuntimeError(f"{name} is not installed (see benchmarks/peers/__init__.py)")
    command = [python, str(HERE / f"{name}_mlp.py"), "--model", str(model), "--name", "mlp"]
    return [*command, "--model-config", str(model_config)]
