"""ModelConfig says what each model's config.yaml says, for real ONNX models and contracts.

The messages are made in a child process (dump_model_config.py) and parsed here with
tritonclient's own classes, as a Triton client decodes them; every expectation is read from
the config.yaml (and features.yaml) the repository holds.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2

from tests.models import ECHO_TYPES, write_echo_model, write_identity_model, write_scorer_model

ROOT = Path(__file__).resolve().parents[3]

Described = dict[str, tuple[mc.ModelConfig, service_pb2.ModelMetadataResponse]]

SCORER_WIDTH = 5
CONTRACT: dict[str, Any] = {
    "versions": {
        "v1": {
            "features": [
                {"name": "amount", "kind": "float", "owner": "risk", "description": "USD"},
                {
                    "name": "hour",
                    "kind": "int",
                    "owner": "risk",
                    "description": "0-23",
                    "null_policy": {"default": 12},
                },
                {
                    "name": "vip",
                    "kind": "bool",
                    "owner": "crm",
                    "description": "flag",
                    "null_policy": {"default": 0},
                },
                {
                    "name": "country",
                    "kind": "categorical",
                    "owner": "risk",
                    "description": "ISO",
                    "vocabulary": ["US", "BR", "DE"],
                },
            ]
        },
        "v2": {
            "input": "features",
            "features": [
                {"name": "amount", "kind": "float", "owner": "risk", "description": "USD"},
                {
                    "name": "country",
                    "kind": "categorical",
                    "owner": "risk",
                    "description": "ISO",
                    "vocabulary": ["US", "BR"],
                    "encoding": "index",
                    "null_policy": {"default": "US"},
                },
            ],
        },
    }
}
CONTRACT_WIDTH = {"v1": 7, "v2": 2}  # float, int, bool, one-hot (1 + 3); float, index


def build_repository(root: Path) -> Path:
    """Four models, each showing one side of the config: instances, batching and queue
    (scorer), datatypes and no batcher (echo), no batch dimension (flat), contracts (assembler)."""
    scorer = {
        "max_batch_size": 16,
        "instances": 3,
        "version_policy": {"latest": 2},
        "dynamic_batching": {"max_queue_delay_us": 500, "preferred_batch_sizes": [4, 8]},
        "queue": {"priority_levels": 3, "default_priority": 1, "max_requests": 77, "max_rows": 999},
    }
    for version in (1, 2, 3):
        write_scorer_model(root / "scorer", SCORER_WIDTH, version, config=scorer)
    write_echo_model(root / "echo", 1)
    write_echo_model(root / "echo", 2)
    echo = yaml.safe_load((root / "echo" / "config.yaml").read_text())
    echo["version_policy"] = {"specific": [1]}
    (root / "echo" / "config.yaml").write_text(yaml.safe_dump(echo))
    write_identity_model(root / "flat", 3, config={"max_batch_size": 0})
    assembler = root / "assembler"
    assembler.mkdir()
    (assembler / "features.yaml").write_text(yaml.safe_dump(CONTRACT))
    for version, contract in ((1, "v1"), (2, "v2")):
        write_identity_model(assembler, CONTRACT_WIDTH[contract], version)
    config = {
        "max_batch_size": 32,
        "version_policy": {"all": True},
        "dynamic_batching": {},
        "contract": {"by_model_version": {1: "v1", 2: "v2"}},
    }
    (assembler / "config.yaml").write_text(yaml.safe_dump(config))
    return root


def describe(root: Path, provider: str | None = None) -> Described:
    command = [sys.executable, "-m", "tests.unit.server.dump_model_config", str(root)]
    done = subprocess.run(
        [*command, *([provider] if provider else [])],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    described: Described = {}
    for key, message in json.loads(done.stdout).items():
        config = mc.ModelConfig.FromString(base64.b64decode(message["config"]))
        metadata = service_pb2.ModelMetadataResponse.FromString(
            base64.b64decode(message["metadata"])
        )
        described[key] = (config, metadata)
    return described


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_repository(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def described(repository: Path) -> Described:
    return describe(repository)


def config_yaml(repository: Path, model: str) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((repository / model / "config.yaml").read_text())
    return loaded


def triton_type(datatype: str) -> int:
    return mc.DataType.Value("TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}")


def test_every_loaded_version_is_described(described: Described):
    assert sorted(described) == [
        "assembler/1",
        "assembler/2",
        "echo/1",
        "flat/1",
        "scorer/2",
        "scorer/3",
    ]


def test_instances_batching_and_queue_are_the_config_yaml_s(repository, described):
    wanted = config_yaml(repository, "scorer")
    config, _ = described["scorer/3"]
    assert config.name == "scorer" and config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == wanted["max_batch_size"]
    assert config.version_policy.WhichOneof("policy_choice") == "latest"
    assert config.version_policy.latest.num_versions == wanted["version_policy"]["latest"]
    [group] = config.instance_group
    assert group.count == wanted["instances"] and group.kind == mc.ModelInstanceGroup.KIND_CPU
    assert not group.gpus
    assert config.WhichOneof("scheduling_choice") == "dynamic_batching"
    batching, queue = config.dynamic_batching, wanted["queue"]
    assert (
        list(batching.preferred_batch_size) == wanted["dynamic_batching"]["preferred_batch_sizes"]
    )
    assert batching.max_queue_delay_microseconds == wanted["dynamic_batching"]["max_queue_delay_us"]
    assert batching.priority_levels == queue["priority_levels"]
    assert batching.default_priority_level == queue["default_priority"]
    policy = batching.default_queue_policy
    assert policy.max_queue_size == queue["max_requests"]
    assert policy.timeout_action == mc.ModelQueuePolicy.REJECT  # a passed deadline is refused
    assert policy.allow_timeout_override and policy.default_timeout_microseconds == 0
    assert not batching.priority_queue_policy  # one policy for every level
    assert {k: v.string_value for k, v in config.parameters.items()} == {
        "queue.max_rows": str(queue["max_rows"])
    }
    assert [(i.name, i.data_type, list(i.dims), i.optional) for i in config.input] == [
        ("features", mc.TYPE_FP32, [SCORER_WIDTH], False)  # the batch dimension left out
    ]
    assert [(o.name, o.data_type, list(o.dims)) for o in config.output] == [
        ("probability", mc.TYPE_FP32, [1])
    ]


def test_a_model_without_a_batcher_reports_none_and_its_queue_as_parameters(repository, described):
    wanted = config_yaml(repository, "echo")
    config, _ = described["echo/1"]
    assert config.WhichOneof("scheduling_choice") is None  # one run per request
    assert config.max_batch_size == wanted["max_batch_size"]
    assert list(config.version_policy.specific.versions) == wanted["version_policy"]["specific"]
    assert config.instance_group[0].count == 1  # the default
    assert {k: v.string_value for k, v in config.parameters.items()} == {
        "queue.max_rows": "65536",
        "queue.max_requests": "1024",
        "queue.priority_levels": "2",
        "queue.default_priority": "2",  # none set: the lowest
    }
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [
        (f"in_{datatype}", triton_type(datatype), [2]) for datatype in ECHO_TYPES
    ]


def test_a_model_without_a_batch_dimension_reports_whole_shapes(described):
    config, _ = described["flat/1"]
    assert config.max_batch_size == 0
    assert config.version_policy.latest.num_versions == 1  # the default policy
    assert [list(i.dims) for i in config.input] == [[-1, 3]]
    assert [list(o.dims) for o in config.output] == [[-1, 3]]


@pytest.mark.parametrize("version", [1, 2])
def test_a_contract_model_takes_its_raw_features_and_names_its_dense_input(
    repository, described, version
):
    contract = f"v{version}"
    features = CONTRACT["versions"][contract]["features"]
    config, _ = described[f"assembler/{version}"]
    assert config.version_policy.WhichOneof("policy_choice") == "all"
    kinds = {"float": "FP32", "int": "INT64", "bool": "BOOL", "categorical": "BYTES"}
    assert [(i.name, i.data_type, list(i.dims), i.optional) for i in config.input] == [
        (f["name"], triton_type(kinds[f["kind"]]), [1], "null_policy" in f) for f in features
    ]
    assert config.parameters["model_input"].string_value == (
        f"features FP32 [-1, {CONTRACT_WIDTH[contract]}]"
    )
    assert config.parameters["feature_contract"].string_value == contract
    assert config.dynamic_batching.max_queue_delay_microseconds == 0
    assert config.dynamic_batching.priority_levels == 2


def test_config_tensors_are_the_metadata_s(described: Described):
    """perf_analyzer refuses a config tensor ModelMetadata does not list, or lists otherwise."""
    for key, (config, metadata) in described.items():
        for tensors, listed in ((config.input, metadata.inputs), (config.output, metadata.outputs)):
            skip = 1 if config.max_batch_size > 0 else 0
            assert [(t.name, t.data_type, list(t.dims)) for t in tensors] == [
                (t.name, triton_type(t.datatype), list(t.shape)[skip:]) for t in listed
            ], key


def test_sessions_on_cuda_make_a_gpu_instance_group(tmp_path: Path):
    write_identity_model(tmp_path / "flat", 3, config={"max_batch_size": 4, "instances": 2})
    config, _ = describe(tmp_path, "CUDAExecutionProvider")["flat/1"]
    [group] = config.instance_group
    assert (group.kind, group.count, list(group.gpus)) == (mc.ModelInstanceGroup.KIND_GPU, 2, [0])
