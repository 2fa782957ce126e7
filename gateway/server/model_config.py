"""Stage 1: a loaded model version as Triton's ModelMetadata, ModelConfig and ModelStatistics."""

from __future__ import annotations

from typing import Any, Final

from gateway.api.v1 import inference_pb2 as pb
from gateway.api.v1 import model_config_pb2 as mc
from gateway.runtime.repository import LoadedVersion
from gateway.telemetry.statistics import Duration
from gateway.types import TensorSpec

__all__ = ["config_to_pb", "metadata_to_pb", "statistics_to_pb"]

PLATFORM = "onnxruntime_onnx"

# OIP datatype -> Triton model-config DataType enum name.
TRITON_CONFIG_TYPES: Final[dict[str, str]] = {
    "BOOL": "TYPE_BOOL",
    "UINT8": "TYPE_UINT8",
    "UINT16": "TYPE_UINT16",
    "UINT32": "TYPE_UINT32",
    "UINT64": "TYPE_UINT64",
    "INT8": "TYPE_INT8",
    "INT16": "TYPE_INT16",
    "INT32": "TYPE_INT32",
    "INT64": "TYPE_INT64",
    "FP16": "TYPE_FP16",
    "FP32": "TYPE_FP32",
    "FP64": "TYPE_FP64",
    "BYTES": "TYPE_STRING",
}


def advertised_inputs(loaded: LoadedVersion) -> list[TensorSpec]:
    """What clients send: a contract's raw features, or the model's own inputs.

    A feature is advertised as [-1, 1] (config dims [1], as Triton shows a per-row scalar, so
    that tools like perf_analyzer can shape it); [N] is accepted as well. A version under a
    contract still accepts its model input as is (pass-through); metadata lists the features,
    the interface product services are meant to use.
    """
    if loaded.contract is None:
        return list(loaded.runtime.inputs)
    return loaded.contract.advertised_inputs()


def metadata_to_pb(
    loaded: LoadedVersion, versions: list[LoadedVersion]
) -> pb.ModelMetadataResponse:
    tensor = pb.ModelMetadataResponse.TensorMetadata
    return pb.ModelMetadataResponse(
        name=loaded.name,
        versions=[v.version_label for v in versions],
        platform=PLATFORM,
        inputs=[
            tensor(name=s.name, datatype=s.datatype, shape=s.shape)
            for s in advertised_inputs(loaded)
        ],
        outputs=[
            tensor(name=s.name, datatype=s.datatype, shape=s.shape) for s in loaded.runtime.outputs
        ],
    )


def _tensor_fields(spec: TensorSpec, skip: int) -> dict[str, Any]:
    return {
        "name": spec.name,
        "data_type": mc.DataType.Value(TRITON_CONFIG_TYPES[spec.datatype]),
        "dims": spec.shape[skip:],
    }


def config_to_pb(loaded: LoadedVersion) -> mc.ModelConfig:
    """Dims exclude the batch dimension when max_batch_size > 0, as Triton reports them."""
    config = loaded.config
    skip = 1 if config.max_batch_size > 0 else 0
    policy = mc.ModelVersionPolicy()
    if config.version_policy.all:
        policy.all.SetInParent()
    elif config.version_policy.specific is not None:
        policy.specific.versions.extend(config.version_policy.specific)
    else:
        policy.latest.num_versions = config.version_policy.latest or 1
    on_gpu = loaded.runtime.provider.startswith("CUDA")
    return mc.ModelConfig(
        name=loaded.name,
        platform=PLATFORM,
        backend="onnxruntime",
        max_batch_size=config.max_batch_size,
        version_policy=policy,
        input=[mc.ModelInput(**_tensor_fields(s, skip)) for s in advertised_inputs(loaded)],
        output=[mc.ModelOutput(**_tensor_fields(s, skip)) for s in loaded.runtime.outputs],
        instance_group=[
            mc.ModelInstanceGroup(
                name=f"{loaded.name}_{loaded.version}",
                count=1,
                kind=mc.ModelInstanceGroup.KIND_GPU if on_gpu else mc.ModelInstanceGroup.KIND_CPU,
            )
        ],
        default_model_filename="model.onnx",
    )


def _duration(d: Duration) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=d.count, ns=d.ns)


def statistics_to_pb(loaded: LoadedVersion) -> pb.ModelStatistics:
    s = loaded.stats
    return pb.ModelStatistics(
        name=loaded.name,
        version=loaded.version_label,
        last_inference=s.last_inference_ms,
        inference_count=s.inference_count,
        execution_count=s.execution_count,
        inference_stats=pb.InferStatistics(
            success=_duration(s.success),
            fail=_duration(s.fail),
            queue=_duration(s.queue),
            compute_input=_duration(s.compute_input),
            compute_infer=_duration(s.compute_infer),
            compute_output=_duration(s.compute_output),
            cache_hit=_duration(s.cache_hit),
            cache_miss=_duration(s.cache_miss),
        ),
        batch_stats=[
            pb.InferBatchStatistics(
                batch_size=size,
                compute_input=_duration(b.compute_input),
                compute_infer=_duration(b.compute_infer),
                compute_output=_duration(b.compute_output),
            )
            for size, b in sorted(s.batches.items())
        ],
    )
