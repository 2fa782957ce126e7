"""Raw named features through tritonclient, assembled by the gateway under a feature contract.

The ``assembler`` model is an identity over its input: what it answers is the exact matrix the
gateway built, compared bit for bit with the offline API on the same rows.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import yaml
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from gateway import features
from gateway.demo import synthetic_transactions
from tests.auth import ADMIN_ENV, ADMIN_HEADERS
from tests.conftest import DEMO_WIDTH, GatewayProcess, serving
from tests.models import write_identity_model

pytestmark = pytest.mark.integration

FEATURES = {
    "versions": {
        "v1": {
            "features": [
                {
                    "name": "amount",
                    "kind": "float",
                    "owner": "risk",
                    "description": "USD",
                    "range": {"min": 0, "max": 1000, "policy": "reject"},
                    "transform": "log1p",
                },
                {
                    "name": "hour",
                    "kind": "int",
                    "owner": "risk",
                    "description": "0-23",
                    "range": {"min": 0, "max": 23, "policy": "clip"},
                    "transform": {"bucketize": {"boundaries": [6, 12, 18]}},
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
                    "null_policy": {"default": None},
                    "sensitive": True,
                },
                {
                    "name": "channel",
                    "kind": "categorical",
                    "owner": "risk",
                    "description": "where",
                    "vocabulary": ["pos", "web"],
                    "encoding": "index",
                },
            ]
        },
        "v2": {
            "unknown_features": "ignore",
            "features": [
                {
                    "name": "amount",
                    "kind": "float",
                    "owner": "risk",
                    "description": "USD",
                    "null_policy": {"default": 0.0},
                    "transform": {"standardize": {"mean": 10, "std": 5}},
                },
                {"name": "hour", "kind": "int", "owner": "risk", "description": "0-23"},
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
WIDTH = {"v1": 8, "v2": 3}


def build_assembler(root: Path) -> Path:
    model_dir = root / "assembler"
    model_dir.mkdir(parents=True)
    (model_dir / "features.yaml").write_text(yaml.safe_dump(FEATURES))
    config = {
        "max_batch_size": 256,
        "version_policy": {"all": True},
        "dynamic_batching": {},
        "contract": {"by_model_version": {1: "v1", 2: "v2"}},
    }
    write_identity_model(model_dir, WIDTH["v1"], 1, config)
    write_identity_model(model_dir, WIDTH["v2"], 2)
    return model_dir


@pytest.fixture(scope="module")
def feature_repo(demo_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("feature-repo")
    shutil.copytree(demo_repo / "fraud", root / "fraud")
    build_assembler(root)
    return root


@pytest.fixture(scope="module")
def gateway(
    feature_repo: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    """This module's gateway serves the feature repository (conftest's ``client`` uses it)."""
    yield from serving(feature_repo, tmp_path_factory.mktemp("feature-gateway"))


def as_inputs(columns: dict[str, np.ndarray]) -> list[triton_grpc.InferInput]:
    inputs = []
    for name, values in columns.items():
        array = np.asarray(values)
        datatype = "BYTES" if array.dtype == object else np_to_triton_dtype(array.dtype)
        tensor = triton_grpc.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def strings(*values: str) -> np.ndarray:
    return np.array([v.encode() for v in values], dtype=object)


def parameter(result, name: str):
    param = result.get_response().parameters[name]
    return getattr(param, param.WhichOneof("parameter_choice"))


def rows_v1() -> dict[str, np.ndarray]:
    return {
        "amount": np.array([0.0, 12.5, 999.0, 1e-3], dtype=np.float64),
        "hour": np.array([0, 7, 30, 18], dtype=np.int32),  # 30 is clipped to 23
        "vip": np.array([True, False, True, False]),
        "country": strings("BR", "FR", "", "DE"),  # FR out of vocabulary, "" defaulted
        "channel": strings("web", "pos", "kiosk", "pos"),  # kiosk out of vocabulary
    }


def test_the_server_builds_the_matrix_the_offline_api_builds(client, feature_repo: Path):
    columns = rows_v1()
    result = client.infer("assembler", as_inputs(columns), model_version="1")
    contract = features.load_contract(feature_repo / "assembler", "v1")
    offline = features.assemble_columns(contract, columns)
    served = result.as_numpy("assembled")
    assert served.dtype == np.float32 and served.shape == (4, contract.width)
    assert served.view(np.uint32).tolist() == offline.matrix.view(np.uint32).tolist()
    # The request's own coverage rides in the response.
    assert parameter(result, "contract_version") == "v1"
    assert parameter(result, "features_oov") == offline.total("oov") == 2
    assert parameter(result, "features_defaulted") == offline.total("defaulted") == 1
    assert parameter(result, "features_out_of_range") == offline.total("out_of_range") == 1


def test_two_contract_versions_are_served_side_by_side(client, feature_repo: Path):
    columns: dict[str, np.ndarray] = {
        "amount": np.array([3.0, np.nan], dtype=np.float32),
        "hour": np.array([[5], [9]], dtype=np.int64),  # [N, 1] is a raw feature too
        "country": strings("BR", "NZ"),
        "vip": np.array([True, True]),  # unknown to v2, which ignores what it does not know
        "channel": strings("pos", "web"),
    }
    result = client.infer("assembler", as_inputs(columns), model_version="2")
    assert parameter(result, "contract_version") == "v2"
    contract = features.load_contract(feature_repo / "assembler", "v2")
    flat = {k: v.reshape(-1) for k, v in columns.items()}
    expected = features.assemble(contract, flat)
    assert result.as_numpy("assembled").tobytes() == expected.tobytes()
    by_hand = [[(3.0 - 10) / 5, 5.0, 2.0], [(0.0 - 10) / 5, 9.0, 0.0]]  # NZ: OOV bucket 0
    np.testing.assert_array_equal(expected, np.array(by_hand, dtype=np.float32))
    # v1 refuses what v2 ignored: a NaN amount (its null policy is reject).
    with pytest.raises(InferenceServerException, match="feature 'amount' row 1 is null"):
        client.infer("assembler", as_inputs(columns), model_version="1")


def test_the_model_input_itself_passes_through(client):
    matrix = np.arange(16, dtype=np.float32).reshape(2, 8)
    tensor = triton_grpc.InferInput("features", [2, 8], "FP32")
    tensor.set_data_from_numpy(matrix)
    result = client.infer("assembler", [tensor], model_version="1")
    assert np.array_equal(result.as_numpy("assembled"), matrix)
    assert "contract_version" not in result.get_response().parameters


def test_demo_scores_raw_features_as_it_scores_their_matrix(client, feature_repo: Path):
    cols, _ = synthetic_transactions(32, seed=5)
    columns = {
        name: (strings(*values) if values.dtype == object else values)
        for name, values in cols.items()
    }
    for version in ("1", "2"):
        raw = client.infer("fraud", as_inputs(columns), model_version=version)
        contract = features.load_contract(feature_repo / "fraud", f"v{version}")
        matrix = features.assemble(contract, cols)
        assert matrix.shape == (32, DEMO_WIDTH)
        tensor = triton_grpc.InferInput("features", list(matrix.shape), "FP32")
        tensor.set_data_from_numpy(matrix)
        dense = client.infer("fraud", [tensor], model_version=version)
        assert np.array_equal(raw.as_numpy("probability"), dense.as_numpy("probability"))
        assert parameter(raw, "contract_version") == f"v{version}"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"amount": strings("1", "2", "3", "4")}, "feature 'amount' is float .* got BYTES"),
        ({"hour": np.array([1, 2], dtype=np.int64)}, "feature 'hour' has 2 rows but 'amount'"),
        ({"hour": np.array([1.0, 2, 3, 4])}, "feature 'hour' is int .* got FP64"),
        ({"amount": np.array([1.0, np.nan, 2, 3])}, "feature 'amount' row 1 is null .NaN."),
        ({"amount": np.array([1.0, 2, 5000, 3])}, r"feature 'amount' row 2: 5000.0 is outside"),
        ({"channel": strings("pos", "web", "", "")}, "feature 'channel' row 2 is null .empty."),
        ({"colour": strings("r", "g", "b", "a")}, "unknown feature 'colour': contract v1 of"),
        ({"amount": np.ones((4, 2))}, r"a raw feature is sent as \[N\] or \[N, 1\]"),
        ({"amount": None}, "feature 'amount' is missing"),
    ],
)
def test_bad_features_name_the_feature_and_first_bad_row(client, change, message):
    columns = {**rows_v1(), **change}
    columns = {k: v for k, v in columns.items() if v is not None}
    with pytest.raises(InferenceServerException, match=message) as err:
        client.infer("assembler", as_inputs(columns), model_version="1")
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT"


def test_coverage_counters_add_up_after_a_known_mix(gateway: GatewayProcess, client):
    def count(feature: str, outcome: str) -> float:
        return gateway.metric(
            "gateway_feature_values_total",
            model="assembler",
            version="1",
            contract="v1",
            feature=feature,
            outcome=outcome,
        )

    before = {(f, o): count(f, o) for f in ("country", "vip", "amount") for o in features.OUTCOMES}
    columns = rows_v1()
    del columns["vip"]  # absent: 4 defaulted
    for _ in range(3):
        client.infer("assembler", as_inputs(columns), model_version="1")

    def delta(feature: str, outcome: str) -> float:
        return count(feature, outcome) - before[feature, outcome]

    assert delta("country", "present") == 9 and delta("country", "oov") == 3
    assert delta("country", "defaulted") == 3
    assert delta("vip", "defaulted") == 12 and delta("vip", "present") == 0
    assert delta("amount", "present") == 12 and delta("amount", "out_of_range") == 0


def test_a_contract_that_does_not_fit_the_model_is_refused_at_load(start_gateway, tmp_path: Path):
    model_dir = build_assembler(tmp_path / "repo")
    write_identity_model(model_dir, 5, 2)  # v2 builds 3 columns; this model takes 5
    proc = start_gateway(tmp_path / "repo")
    with proc.client() as client:
        index = {(m.name, m.version): m for m in client.get_model_repository_index().models}
        assert index["assembler", "1"].state == "READY"
        broken = index["assembler", "2"]
        assert broken.state == "UNAVAILABLE"
        assert "contract v2" in broken.reason and "[-1,3]" in broken.reason
        assert "'features' FP32 [-1, 5]" in broken.reason


def test_a_broken_contract_file_keeps_the_model_out_and_says_why(start_gateway, tmp_path: Path):
    model_dir = build_assembler(tmp_path / "repo")
    broken = yaml.safe_load((model_dir / "features.yaml").read_text())
    broken["versions"]["v1"]["features"][0]["range"]["policy"] = "ignore"
    (model_dir / "features.yaml").write_text(yaml.safe_dump(broken))
    proc = start_gateway(tmp_path / "repo", env=ADMIN_ENV)
    with proc.client() as client:
        (entry,) = client.get_model_repository_index().models
        assert entry.state == "UNAVAILABLE"
        assert "invalid feature contract" in entry.reason
        assert "versions.v1.features.0.range.policy" in entry.reason
        # Fixing the file and loading again brings both versions in while serving.
        (model_dir / "features.yaml").write_text(yaml.safe_dump(FEATURES))
        client.load_model("assembler", headers=ADMIN_HEADERS)
        assert client.is_model_ready("assembler", "1") and client.is_model_ready("assembler", "2")
