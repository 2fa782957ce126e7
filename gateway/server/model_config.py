"""Stage 1: a loaded model version as Triton's ModelMetadata, ModelConfig and ModelStatistics."""

from __future__ import annotations

from typing import Any, Final

from gateway.api.v1 import inference_pb2 as pb
from gateway.api.v1 import model_config_pb2 as mc
from gateway.runtime.repository import LoadedVersion
from gateway.settings import ModelConfig, VersionPolicy
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


def _version_policy(policy: VersionPolicy) -> mc.ModelVersionPolicy:
    reply = mc.ModelVersionPolicy()
    if policy.all:
        reply.all.SetInParent()
    elif policy.specific is not None:
        reply.specific.versions.extend(policy.specific)
    else:
        reply.latest.num_versions = policy.latest or 1
    return reply


def _inputs(loaded: LoadedVersion, skip: int) -> list[mc.ModelInput]:
    """The inputs ModelMetadata lists, in its order; a feature with a null default is optional."""
    optional = loaded.contract.optional_features if loaded.contract is not None else frozenset()
    return [
        mc.ModelInput(**_tensor_fields(s, skip), optional=s.name in optional)
        for s in advertised_inputs(loaded)
    ]


def _instance_group(loaded: LoadedVersion) -> mc.ModelInstanceGroup:
    """One group: the instances the version runs (its own session each), on the device its
    sessions got (the provider decides, not the setting: 'auto' may have fallen back to CPU)."""
    group = mc.ModelInstanceGroup(name=f"{loaded.name}_0", count=len(loaded.runtimes))
    if loaded.runtime.provider.startswith("CUDA"):
        group.kind = mc.ModelInstanceGroup.KIND_GPU
        group.gpus.append(0)  # NOTE: sessions take ORT's default CUDA device, 0
    else:
        group.kind = mc.ModelInstanceGroup.KIND_CPU
    return group


def _dynamic_batching(config: ModelConfig) -> mc.ModelDynamicBatching | None:
    """Triton's dynamic batcher, when requests are merged; None: one run per request."""
    batching = config.dynamic_batching
    if batching is None:
        return None
    queue = config.queue
    return mc.ModelDynamicBatching(
        preferred_batch_size=batching.preferred_batch_sizes,
        max_queue_delay_microseconds=batching.max_queue_delay_us,
        priority_levels=queue.priority_levels,
        default_priority_level=queue.default_level,
        default_queue_policy=mc.ModelQueuePolicy(
            # A request's own deadline (gRPC deadline or timeout_ms) is its timeout; none by
            # default. Past it, a queued request leaves the queue refused (DEADLINE_EXCEEDED).
            timeout_action=mc.ModelQueuePolicy.REJECT,
            default_timeout_microseconds=0,
            allow_timeout_override=True,
            # NOTE: the gateway bounds its queue across all levels, Triton each level's.
            max_queue_size=queue.max_requests,
        ),
    )


def _parameters(loaded: LoadedVersion, batching: bool) -> dict[str, str]:
    """What Triton's schema has no field for: queue settings under their config.yaml keys, and
    a contract's version and ``model_input``, the model's own input the contract assembles,
    as ``<name> FP32 [-1, <width>]``.

    ``model_input`` is no config input: clients send the raw features, and perf_analyzer needs
    every config input in ModelMetadata, which lists only those. A request may still send it
    whole instead (pass-through: no contract checks).
    """
    queue = loaded.config.queue
    parameters = {"queue.max_rows": str(queue.max_rows)}
    if not batching:  # the queue's priorities still hold; Triton keeps them in dynamic_batching
        parameters |= {
            "queue.priority_levels": str(queue.priority_levels),
            "queue.default_priority": str(queue.default_level),
            "queue.max_requests": str(queue.max_requests),
        }
    if loaded.contract is not None:
        dense = loaded.runtime.inputs[0]  # the one input (checked at load)
        parameters["model_input"] = f"{dense.name} FP32 [-1, {loaded.contract.width}]"
        parameters["feature_contract"] = loaded.contract.version
    return parameters


def config_to_pb(loaded: LoadedVersion) -> mc.ModelConfig:
    """The version's config.yaml as Triton's ModelConfig: what a client may send and how it is
    scheduled. Dims exclude the batch dimension when max_batch_size > 0, as Triton's do."""
    config = loaded.config
    skip = 1 if config.max_batch_size > 0 else 0
    batching = _dynamic_batching(config)
    return mc.ModelConfig(
        name=loaded.name,
        platform=PLATFORM,
        backend="onnxruntime",
        max_batch_size=config.max_batch_size,
        version_policy=_version_policy(config.version_policy),
        input=_inputs(loaded, skip),
        output=[mc.ModelOutput(**_tensor_fields(s, skip)) for s in loaded.runtime.outputs],
        instance_group=[_instance_group(loaded)],
        default_model_filename="model.onnx",
        dynamic_batching=batching,
        parameters={
            key: mc.ModelParameter(string_value=value)
            for key, value in _parameters(loaded, batching is not None).items()
        },
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
