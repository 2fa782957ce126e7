"""MLServer serving the MLP: a custom ``MLModel`` calling ONNX Runtime, behind MLServer's
adaptive batching (run by ``bench_transport.py --peers`` under the MLServer venv; see
__init__.py).

    .bench/peers/mlserver-venv/bin/python benchmarks/peers/mlserver_mlp.py --model M.onnx \\
        --model-config CONFIG.pb

MLServer's gRPC front has no ModelConfig RPC (a Triton extension perf_analyzer reads), so this
runner adds one to MLServer's grpc.aio server: it answers with the bytes of ``--model-config``,
a ModelConfigResponse the benchmark serializes with the gateway's protos (MLServer registers
its own ``inference.*`` messages, so the two cannot share a process). Inference runs in the
server's process (``parallel_workers`` 0), as the gateway's does.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
from mlserver import MLModel, MLServer  # type: ignore[import-not-found,unused-ignore]
from mlserver.codecs import NumpyCodec  # type: ignore[import-not-found,unused-ignore]
from mlserver.grpc.server import GRPCServer  # type: ignore[import-not-found,unused-ignore]
from mlserver.settings import (  # type: ignore[import-not-found,unused-ignore]
    ModelParameters,
    ModelSettings,
    Settings,
)
from mlserver.types import (  # type: ignore[import-not-found,unused-ignore]
    InferenceRequest,
    InferenceResponse,
    MetadataTensor,
    ResponseOutput,
)


class OnnxMLP(MLModel):  # type: ignore[misc]
    async def load(self) -> bool:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        uri = self.settings.parameters.uri
        self.session = ort.InferenceSession(uri, options, providers=["CPUExecutionProvider"])
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        features = NumpyCodec.decode_input(payload.inputs[0]).astype(np.float32, copy=False)
        (probability,) = self.session.run(None, {"features": features})
        # NOTE: no output parameters (NumpyCodec adds content_type): Triton's C++ client and
        # perf_analyzer take any output parameters for a binary output and then fail.
        output = ResponseOutput(
            name="probability",
            shape=list(probability.shape),
            datatype="FP32",
            data=probability.reshape(-1).tolist(),
        )
        return InferenceResponse(model_name=self.name, outputs=[output])


def add_rest_config(body: bytes) -> None:
    """Make MLServer's REST app answer GET /v2/models/{name}/config with ``body`` (Triton's
    model config as JSON, which perf_analyzer -i http reads; MLServer has no such route)."""
    from fastapi import Response  # type: ignore[import-not-found,unused-ignore]
    from mlserver.rest import app as rest_app  # type: ignore[import-not-found,unused-ignore]
    from mlserver.rest import server as rest_server  # type: ignore[import-not-found,unused-ignore]

    create = rest_app.create_app

    def create_app(*args: Any, **kwargs: Any) -> Any:
        app = create(*args, **kwargs)

        async def config(model_name: str) -> Any:
            return Response(body, media_type="application/json")

        app.add_api_route("/v2/models/{model_name}/config", config, methods=["GET"])
        return app

    rest_app.create_app = create_app
    rest_server.create_app = create_app


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def add_model_config(reply: bytes) -> None:
    """Make every GRPCServer MLServer creates also answer ModelConfig with ``reply``."""
    create = GRPCServer._create_server

    async def answer(request: bytes, context: Any) -> bytes:
        return reply

    handler = grpc.method_handlers_generic_handler(
        "inference.GRPCInferenceService",
        {"ModelConfig": grpc.unary_unary_rpc_method_handler(answer)},
    )

    def create_server(self: Any) -> Any:
        server = create(self)
        server.add_generic_rpc_handlers([handler])
        return server

    GRPCServer._create_server = create_server


async def announce(http_port: int, grpc_port: int, name: str) -> None:
    """Print the ready line once the model answers ready."""
    url = f"http://127.0.0.1:{http_port}/v2/models/{name}/ready"

    def ready() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                return bool(reply.status == 200)
        except OSError:
            return False

    while True:
        if await asyncio.to_thread(ready):
            break
        await asyncio.sleep(0.2)
    print(
        f"ready grpc=127.0.0.1:{grpc_port} http=127.0.0.1:{http_port}", file=sys.stderr, flush=True
    )


async def serve(args: argparse.Namespace) -> None:
    http_port, grpc_port = free_port(), free_port()
    settings = Settings(
        host="127.0.0.1",
        http_port=http_port,
        grpc_port=grpc_port,
        metrics_port=free_port(),
        parallel_workers=0,
    )
    width = int(ort.InferenceSession(str(args.model)).get_inputs()[0].shape[1])
    model = ModelSettings(
        name=args.name,
        inputs=[MetadataTensor(name="features", datatype="FP32", shape=[-1, width])],
        outputs=[MetadataTensor(name="probability", datatype="FP32", shape=[-1, 1])],
        implementation=OnnxMLP,
        max_batch_size=1024,
        max_batch_time=args.max_batch_time,
        parameters=ModelParameters(uri=str(args.model)),
    )
    server = MLServer(settings)  # installs its SIGTERM handler on this loop
    announcer = asyncio.create_task(announce(http_port, grpc_port, args.name))
    await server.start([model])
    announcer.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--name", default="mlp")
    parser.add_argument("--model-config", type=Path, required=True)
    parser.add_argument("--max-batch-time", type=float, default=0.0005, help="seconds")
    parser.add_argument("--rest-config", type=Path, help="Triton model config JSON for REST")
    args = parser.parse_args()
    add_model_config(args.model_config.read_bytes())
    if args.rest_config is not None:
        add_rest_config(args.rest_config.read_bytes())
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
