"""PyTriton serving the MLP: Triton's dynamic batcher in front of one ``@batch`` ONNX Runtime
call (run by ``bench_transport.py --peers`` under the PyTriton venv; see __init__.py).

    .bench/peers/pytriton-venv/bin/python benchmarks/peers/pytriton_mlp.py --model M.onnx

Triton's own gRPC front serves the OIP (ModelConfig and ModelStatistics included), so
``--model-config`` is accepted and not needed. ModelStatistics is opened (PyTriton restricts
it to a token by default), for perf_analyzer and the benchmark's request count.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import sysconfig
import threading
from typing import Any

import numpy as np
import onnxruntime as ort
from pytriton.decorators import batch  # type: ignore[import-not-found,unused-ignore]
from pytriton.model_config import (  # type: ignore[import-not-found,unused-ignore]
    DynamicBatcher,
    ModelConfig,
    Tensor,
)
from pytriton.triton import (  # type: ignore[import-not-found,unused-ignore]
    DEFAULT_PROTECTED_ENDPOINTS,
    Triton,
    TritonConfig,
    TritonSecurityConfig,
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--name", default="mlp")
    parser.add_argument("--model-config", help="unused: Triton has ModelConfig")
    parser.add_argument("--max-queue-delay-us", type=int, default=0)
    args = parser.parse_args()

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(args.model, options, providers=["CPUExecutionProvider"])
    width = int(session.get_inputs()[0].shape[1])

    @batch  # type: ignore[untyped-decorator,unused-ignore]
    def infer(features: np.ndarray) -> dict[str, Any]:
        (probability,) = session.run(None, {"features": features.astype(np.float32, copy=False)})
        return {"probability": probability}

    grpc_port = free_port()
    config = TritonConfig(
        grpc_address="127.0.0.1",
        grpc_port=grpc_port,
        http_address="127.0.0.1",
        http_port=free_port(),
        metrics_address="127.0.0.1",
        metrics_port=free_port(),
        allow_sagemaker=False,
        allow_vertex_ai=False,
    )
    # Triton's Python backend stub loads libpython by name: this interpreter's, not another
    # build of the same version the system may have (a mismatch breaks multiprocessing).
    libdir = sysconfig.get_config_var("LIBDIR")
    os.environ["LD_LIBRARY_PATH"] = ":".join(
        p for p in (libdir, os.environ.get("LD_LIBRARY_PATH")) if p
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    # perf_analyzer (and the benchmark's request count) read ModelStatistics, which PyTriton
    # restricts to a token by default; the rest stays restricted.
    security = TritonSecurityConfig(
        restricted_endpoints=[e for e in DEFAULT_PROTECTED_ENDPOINTS if e != "statistics"]
    )
    with Triton(config=config, security_config=security) as triton:
        triton.bind(
            model_name=args.name,
            infer_func=infer,
            inputs=[Tensor(name="features", dtype=np.float32, shape=(width,))],
            outputs=[Tensor(name="probability", dtype=np.float32, shape=(1,))],
            config=ModelConfig(
                max_batch_size=1024,
                batcher=DynamicBatcher(max_queue_delay_microseconds=args.max_queue_delay_us),
            ),
            strict=False,
        )
        triton.run()
        print(f"ready grpc=127.0.0.1:{grpc_port}", file=sys.stderr, flush=True)
        stop.wait()


if __name__ == "__main__":
    main()
