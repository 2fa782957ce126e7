"""Baseline OIP servers for the serving benchmark, on grpc.aio + uvloop like the gateway.

    python benchmarks/baselines.py echo  --model M.onnx --name fraud --port 0
    python benchmarks/baselines.py naive --model M.onnx --name fraud --port 0
    python benchmarks/baselines.py echo  --model M.onnx --name mlp --transport native

``echo``: no model; answers every ModelInfer with zeros of the output's shape: the floor of a
Python gRPC server. ``naive``: one ONNX Runtime run per request, inline in the handler, no
batching or queue: what a first version of a model server looks like. Both serve just enough
of the protocol (metadata, config, statistics, live/ready, unary and streaming infer) for
perf_analyzer; ModelStatistics counts the requests answered (``inference_stats.success``).
``--transport``: ``grpcio`` (default) serves on ``grpc.aio.server()``, ``native`` on
``pygrpc_native.aio.server()`` (HTTP/2 in Rust; ModelStreamInfer, a bidi stream, is forwarded
to the grpc.aio server behind it). Prints ``ready grpc=HOST:PORT transport=T`` on stderr once
serving.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import onnx
import uvloop

from gateway.api.v1 import inference_pb2 as pb
from gateway.api.v1 import inference_pb2_grpc as pb_grpc
from gateway.api.v1 import model_config_pb2 as mc

MAX_BATCH = 1024


class Baseline(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, mode: str, model: Path, name: str) -> None:
        graph = onnx.load(str(model)).graph
        self.name = name
        self.inputs = [
            (i.name, [d.dim_value for d in i.type.tensor_type.shape.dim][1:]) for i in graph.input
        ]
        self.outputs = [
            (o.name, [d.dim_value for d in o.type.tensor_type.shape.dim][1:]) for o in graph.output
        ]
        self.session = None
        self.requests = 0  # answered, for ModelStatistics
        if mode == "naive":
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = 1
            self.session = ort.InferenceSession(
                str(model), options, providers=["CPUExecutionProvider"]
            )

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=True)

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name="baseline", version="0")

    async def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=request.name == self.name)

    async def ModelMetadata(self, request, context):
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=self.name,
            versions=["1"],
            platform="onnxruntime_onnx",
            inputs=[tensor(name=n, datatype="FP32", shape=[-1, *d]) for n, d in self.inputs],
            outputs=[tensor(name=n, datatype="FP32", shape=[-1, *d]) for n, d in self.outputs],
        )

    async def ModelConfig(self, request, context):
        config = mc.ModelConfig(
            name=self.name,
            platform="onnxruntime_onnx",
            max_batch_size=MAX_BATCH,
            input=[mc.ModelInput(name=n, data_type=mc.TYPE_FP32, dims=d) for n, d in self.inputs],
            output=[
                mc.ModelOutput(name=n, data_type=mc.TYPE_FP32, dims=d) for n, d in self.outputs
            ],
        )
        return pb.ModelConfigResponse(config=config)

    async def ModelStatistics(self, request, context):
        stats = pb.ModelStatistics(name=self.name, version="1", inference_count=self.requests)
        stats.execution_count = self.requests
        stats.inference_stats.success.count = self.requests
        return pb.ModelStatisticsResponse(model_stats=[stats])

    def infer(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        self.requests += 1
        rows = request.inputs[0].shape[0]
        response = pb.ModelInferResponse(model_name=self.name, model_version="1", id=request.id)
        if self.session is None:
            arrays = [np.zeros((rows, *d), np.float32) for _, d in self.outputs]
        else:
            feeds = {
                t.name: np.frombuffer(raw, np.float32).reshape(t.shape)
                for t, raw in zip(request.inputs, request.raw_input_contents, strict=True)
            }
            arrays = self.session.run(None, feeds)
        for (name, _), array in zip(self.outputs, arrays, strict=True):
            response.outputs.add(name=name, datatype="FP32", shape=array.shape)
            response.raw_output_contents.append(array.tobytes())
        return response

    async def ModelInfer(self, request, context):
        return self.infer(request)

    async def ModelStreamInfer(
        self, request_iterator, context
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        async for request in request_iterator:
            yield pb.ModelStreamInferResponse(infer_response=self.infer(request))


class _StreamBehind(grpc.GenericRpcHandler):  # type: ignore[misc]
    """ModelStreamInfer for the grpc.aio server behind pygrpc-native's front. The front sends
    it the bidirectional stream, but pygrpc-native 0.5 registers the stream there as a
    registered method only, which that server then answers UNIMPLEMENTED ("Method not found!",
    perf_analyzer hangs on it); a generic handler of its own is kept and serves it."""

    PATH = f"/{pb.DESCRIPTOR.services_by_name['GRPCInferenceService'].full_name}/ModelStreamInfer"

    def __init__(self, baseline: Baseline) -> None:
        self._handler = grpc.stream_stream_rpc_method_handler(
            baseline.ModelStreamInfer,
            request_deserializer=pb.ModelInferRequest.FromString,
            response_serializer=pb.ModelStreamInferResponse.SerializeToString,
        )

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        return self._handler if handler_call_details.method == self.PATH else None


async def serve(args: argparse.Namespace) -> None:
    options = [("grpc.so_reuseport", 0)]
    if args.transport == "native":
        import pygrpc_native.aio

        server = pygrpc_native.aio.server(options=options)
    else:
        server = grpc.aio.server(options=options)
    baseline = Baseline(args.mode, args.model, args.name)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(baseline, server)
    if args.transport == "native":
        server.add_generic_rpc_handlers([_StreamBehind(baseline)])
    port = server.add_insecure_port(f"127.0.0.1:{args.port}")
    await server.start()
    print(f"ready grpc=127.0.0.1:{port} transport={args.transport}", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("mode", choices=["echo", "naive"])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--transport", choices=["grpcio", "native"], default="grpcio")
    uvloop.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()
