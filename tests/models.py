"""Small ONNX models the tests build from code (no files checked in, nothing downloaded)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import yaml
from onnx import TensorProto, helper, numpy_helper

# OIP datatype -> ONNX element type, for the echo model.
ECHO_TYPES = {
    "BOOL": TensorProto.BOOL,
    "UINT8": TensorProto.UINT8,
    "UINT16": TensorProto.UINT16,
    "UINT32": TensorProto.UINT32,
    "UINT64": TensorProto.UINT64,
    "INT8": TensorProto.INT8,
    "INT16": TensorProto.INT16,
    "INT32": TensorProto.INT32,
    "INT64": TensorProto.INT64,
    "FP16": TensorProto.FLOAT16,
    "FP32": TensorProto.FLOAT,
    "FP64": TensorProto.DOUBLE,
    "BYTES": TensorProto.STRING,
}


def _save(model: onnx.ModelProto, model_dir: Path, version: int, config: dict | None) -> Path:
    model.ir_version = 8
    onnx.checker.check_model(model)
    target = model_dir / str(version)
    target.mkdir(parents=True, exist_ok=True)
    (target / "model.onnx").write_bytes(model.SerializeToString())
    if config is not None:
        (model_dir / "config.yaml").write_text(yaml.safe_dump(config))
    return target / "model.onnx"


def write_echo_model(model_dir: Path, version: int = 1) -> None:
    """One Identity per OIP datatype: input ``in_<TYPE>`` [-1, 2] -> output ``out_<TYPE>``."""
    nodes, inputs, outputs = [], [], []
    for name, elem in ECHO_TYPES.items():
        nodes.append(helper.make_node("Identity", [f"in_{name}"], [f"out_{name}"]))
        inputs.append(helper.make_tensor_value_info(f"in_{name}", elem, ["batch", 2]))
        outputs.append(helper.make_tensor_value_info(f"out_{name}", elem, ["batch", 2]))
    graph = helper.make_graph(nodes, "echo", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    _save(model, model_dir, version, {"max_batch_size": 8})


def write_slow_model(
    model_dir: Path, repeats: int = 200, size: int = 512, **config: object
) -> None:
    """A chain of square MatMuls: 256 rows cost a few hundred milliseconds on one thread."""
    rng = np.random.default_rng(0)
    weight = (rng.normal(size=(size, size)) / np.sqrt(size)).astype(np.float32)
    nodes = []
    current = "x"
    for i in range(repeats):
        nodes.append(helper.make_node("MatMul", [current, "w"], [f"h{i}"]))
        current = f"h{i}"
    nodes.append(helper.make_node("Identity", [current], ["y"]))
    graph = helper.make_graph(
        nodes,
        "slow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", size])],
        initializer=[numpy_helper.from_array(weight, name="w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    _save(
        model,
        model_dir,
        1,
        {"max_batch_size": 256, "intra_op_threads": 1, "graph_optimization": "disable", **config},
    )


def write_identity_model(
    model_dir: Path, width: int, version: int = 1, config: dict | None = None
) -> Path:
    """features FP32 [batch, width] -> assembled (the same): shows what the gateway built."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["features"], ["assembled"])],
        "identity",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("assembled", TensorProto.FLOAT, ["batch", width])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return _save(model, model_dir, version, config)


def write_scorer_model(
    model_dir: Path,
    width: int,
    version: int = 1,
    *,
    hidden: int = 0,
    repeats: int = 0,
    broken: bool = False,
    seed: int = 0,
    config: dict | None = None,
) -> Path:
    """``features`` FP32 [batch, width] -> ``probability`` [batch, 1], the demo's signature.

    ``hidden``/``repeats``: a chain of ``repeats`` square MatMuls of size ``hidden`` first,
    to make it slow. ``broken``: a Reshape to 7 rows fails every batch whose rows are not a
    multiple of 7 (a model that fails at run time on valid input; load it without warm-up).
    """
    rng = np.random.default_rng(seed)
    inits, nodes, current = [], [], "features"
    if broken:
        inits.append(numpy_helper.from_array(np.array([7, -1], np.int64), name="seven"))
        inits.append(numpy_helper.from_array(np.array([-1, width], np.int64), name="back"))
        nodes.append(helper.make_node("Reshape", [current, "seven"], ["sevens"]))
        nodes.append(helper.make_node("Reshape", ["sevens", "back"], ["unbroken"]))
        current = "unbroken"
    size = width
    if hidden:
        up = (rng.normal(size=(width, hidden)) / np.sqrt(width)).astype(np.float32)
        square = (rng.normal(size=(hidden, hidden)) / np.sqrt(hidden)).astype(np.float32)
        inits += [
            numpy_helper.from_array(up, name="up"),
            numpy_helper.from_array(square, name="sq"),
        ]
        nodes.append(helper.make_node("MatMul", [current, "up"], ["h_up"]))
        current = "h_up"
        for i in range(repeats):
            nodes.append(helper.make_node("MatMul", [current, "sq"], [f"h{i}"]))
            nodes.append(helper.make_node("Tanh", [f"h{i}"], [f"t{i}"]))
            current = f"t{i}"
        size = hidden
    weight = (rng.normal(size=(size, 1)) / np.sqrt(size)).astype(np.float32)
    inits.append(numpy_helper.from_array(weight, name="w"))
    nodes.append(helper.make_node("MatMul", [current, "w"], ["logit"]))
    nodes.append(helper.make_node("Sigmoid", ["logit"], ["probability"]))
    graph = helper.make_graph(
        nodes,
        "scorer",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("probability", TensorProto.FLOAT, ["batch", 1])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    base = {"max_batch_size": 64, "dynamic_batching": {"max_queue_delay_us": 0}}
    if broken:
        base["warmup"] = False
    return _save(model, model_dir, version, {**base, **(config or {})})
