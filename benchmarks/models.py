"""Models for the serving benchmark: the demo scorer and a heavier MLP where batching must pay."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import yaml
from onnx import TensorProto, helper, numpy_helper

from gateway.demo import build_demo_repository

HEAVY_WIDTH = 19
HEAVY_HIDDEN = 1536


def write_heavy_mlp(model_dir: Path, layers: int = 3, seed: int = 0) -> None:
    """19 -> 1536 x ``layers`` -> 1, ReLU: about 1 ms at batch 1 on one thread (weight-bound)."""
    write_mlp(model_dir, [HEAVY_WIDTH, *[HEAVY_HIDDEN] * layers, 1], name="heavy", seed=seed)


MLP_DIMS = (32, 256, 256, 1)


def write_mlp(
    model_dir: Path,
    dims: Sequence[int] = MLP_DIMS,
    *,
    name: str = "mlp",
    version: int = 1,
    seed: int = 0,
) -> None:
    """An FP32 MLP ``features`` [batch, dims[0]] -> Gemm+ReLU per hidden layer -> Gemm ->
    Sigmoid ``probability`` [batch, dims[-1]], at ``model_dir/version/model.onnx``. The default,
    32 -> 256 -> 256 -> 1, is the transport benchmark's model (tens of microseconds a row)."""
    rng = np.random.default_rng(seed)
    nodes, inits, current = [], [], "features"
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(dims)):
        w = (rng.normal(size=(fan_in, fan_out)) / np.sqrt(fan_in)).astype(np.float32)
        b = np.zeros(fan_out, np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        nodes.append(helper.make_node("Gemm", [current, f"w{i}", f"b{i}"], [f"z{i}"]))
        current = f"z{i}"
        if i < len(dims) - 2:
            nodes.append(helper.make_node("Relu", [current], [f"h{i}"]))
            current = f"h{i}"
    nodes.append(helper.make_node("Sigmoid", [current], ["probability"]))
    graph = helper.make_graph(
        nodes=nodes,
        name=name,
        inputs=[helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", dims[0]])],
        outputs=[
            helper.make_tensor_value_info("probability", TensorProto.FLOAT, ["batch", dims[-1]])
        ],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    (model_dir / str(version)).mkdir(parents=True, exist_ok=True)
    (model_dir / str(version) / "model.onnx").write_bytes(model.SerializeToString())


def build_bench_repositories(root: Path) -> dict[str, Path]:
    """Two repositories with the same model files: dynamic batching on, and off."""
    source = root / "source"
    if not (source / "fraud" / "config.yaml").exists():
        build_demo_repository(source)
        write_heavy_mlp(source / "heavy")
    repos = {}
    for variant in ("on", "off"):
        repo = root / f"batching-{variant}"
        for model in ("fraud", "heavy"):
            target = repo / model / "1"
            target.mkdir(parents=True, exist_ok=True)
            version_dir = "2" if model == "fraud" else "1"
            onnx_file = source / model / version_dir / "model.onnx"
            if not (target / "model.onnx").exists():
                (target / "model.onnx").write_bytes(onnx_file.read_bytes())
            config: dict[str, object] = {"max_batch_size": 1024, "instances": 2}
            if variant == "on":
                config["dynamic_batching"] = {"max_queue_delay_us": 0}
            (repo / model / "config.yaml").write_text(yaml.safe_dump(config))
        repos[variant] = repo
    return repos


def onnx_path(repo: Path, model: str) -> Path:
    return repo / model / "1" / "model.onnx"


def feature_contract(numeric: int = 24, categorical: int = 8) -> dict[str, object]:
    """A 32-feature contract (24 numeric, 8 categorical) exercising every kernel path.

    Numerics cycle through float with log1p + standardize (range clipped), int bucketized,
    float standardized (range flagged) and bool. Vocabularies grow from 4 to 1000 values;
    the small ones are one-hot, the large ones indexed. No feature rejects: a load generator's
    random values must all be servable.
    """
    feats: list[dict[str, object]] = []
    for i in range(numeric):
        base: dict[str, object] = {"name": f"n{i:02d}", "owner": "bench", "description": "numeric"}
        shape = i % 4
        if shape == 0:
            scale = {"standardize": {"mean": 3.0, "std": 1.5}}
            base |= {
                "kind": "float",
                "null_policy": {"default": 0.0},
                "range": {"min": 0, "max": 1e6, "policy": "clip"},
                "transform": ["log1p", scale],
            }
        elif shape == 1:
            base |= {
                "kind": "int",
                "range": {"min": 0, "max": 100, "policy": "clip"},
                "transform": {"bucketize": {"boundaries": [1, 2, 5, 10, 20, 50]}},
            }
        elif shape == 2:
            base |= {
                "kind": "float",
                "null_policy": {"default": 0.0},
                "range": {"min": -10, "max": 10, "policy": "flag"},
                "transform": {"standardize": {"mean": 0.0, "std": 2.0}},
            }
        else:
            base |= {"kind": "bool", "null_policy": {"default": 0}}
        feats.append(base)
    sizes = [4, 8, 16, 32, 64, 128, 256, 1000][:categorical]
    for i, size in enumerate(sizes):
        feats.append(
            {
                "name": f"c{i}",
                "kind": "categorical",
                "owner": "bench",
                "description": "category",
                "vocabulary": [f"value-{v}" for v in range(size)],
                "encoding": "one_hot" if size <= 16 else "index",
                "null_policy": {"default": None},
            }
        )
    return {"versions": {"v1": {"input": "features", "features": feats}}}


def write_feature_model(model_dir: Path) -> int:
    """A logistic scorer over the bench contract's matrix; returns the matrix width."""
    from gateway.features import load_contract

    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "features.yaml").write_text(yaml.safe_dump(feature_contract()))
    width = load_contract(model_dir).width
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(size=(width, 1)).astype(np.float32), "w")
    graph = helper.make_graph(
        nodes=[
            helper.make_node("MatMul", ["features", "w"], ["z"]),
            helper.make_node("Sigmoid", ["z"], ["probability"]),
        ],
        name="features_bench",
        inputs=[helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", width])],
        outputs=[helper.make_tensor_value_info("probability", TensorProto.FLOAT, ["batch", 1])],
        initializer=[w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    (model_dir / "1").mkdir(exist_ok=True)
    (model_dir / "1" / "model.onnx").write_bytes(model.SerializeToString())
    config = {"max_batch_size": 1024, "instances": 2, "dynamic_batching": {}}
    (model_dir / "config.yaml").write_text(yaml.safe_dump(config))
    return width
