"""Feature contracts: the file format, what it compiles to, and the offline assembly API."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import yaml

from gateway import features
from gateway.errors import InvalidRequest, SettingsError

CONTRACT = {
    "versions": {
        "v1": {
            "features": [
                {
                    "name": "amount",
                    "kind": "float",
                    "owner": "risk",
                    "description": "USD",
                    "null_policy": {"default": 0.0},
                    "range": {"min": 0, "max": 1000, "policy": "clip"},
                    "transform": ["log1p", {"standardize": {"mean": 1.0, "std": 2.0}}],
                },
                {
                    "name": "age",
                    "kind": "int",
                    "owner": "risk",
                    "description": "days",
                    "range": {"min": 0, "max": 36500, "policy": "reject"},
                    "transform": {"bucketize": {"boundaries": [30, 365]}},
                },
                {
                    "name": "country",
                    "kind": "categorical",
                    "owner": "risk",
                    "description": "ISO code",
                    "vocabulary": ["US", "BR"],
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
                    "null_policy": {"default": "pos"},
                },
                {
                    "name": "vip",
                    "kind": "bool",
                    "owner": "crm",
                    "description": "flag",
                    "null_policy": {"default": 0},
                },
            ]
        },
        "v2": {
            "unknown_features": "ignore",
            "features": [
                {"name": "amount", "kind": "float", "owner": "risk", "description": "USD"},
            ],
        },
    }
}


@pytest.fixture
def contract_file(tmp_path: Path) -> Path:
    path = tmp_path / "features.yaml"
    path.write_text(yaml.safe_dump(CONTRACT))
    return path


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_versions_and_the_columns_they_write(contract_file: Path):
    contracts = features.load_contracts(contract_file)
    assert list(contracts) == ["v1", "v2"]
    v1 = features.load_contract(contract_file.parent, "v1")
    one_hot = ["country=<oov>", "country=US", "country=BR"]
    assert v1.columns == ["amount", "age", *one_hot, "channel", "vip"]
    assert v1.width == 7
    assert features.load_contract(contract_file).version == "v2"  # the highest by default
    with pytest.raises(SettingsError, match=r"no contract version 'v9'.*v1, v2"):
        features.load_contract(contract_file, "v9")


def test_assemble_applies_nulls_ranges_transforms_and_vocabularies(contract_file: Path):
    v1 = features.load_contract(contract_file, "v1")
    result = features.assemble_columns(
        v1,
        {
            "amount": [0.0, None, 5000.0],
            "age": np.array([10, 400, 100], dtype=np.int64),
            "country": ["BR", "FR", None],
            "channel": ["web", "", "kiosk"],
        },
    )
    expected = np.array(
        [
            [(math.log1p(0.0) - 1) / 2, 0, 0, 0, 1, 2, 0],
            [(math.log1p(0.0) - 1) / 2, 2, 1, 0, 0, 1, 0],  # amount defaulted, FR out of vocab
            [(math.log1p(1000.0) - 1) / 2, 1, 1, 0, 0, 0, 0],  # clipped to 1000, kiosk OOV
        ],
        dtype=np.float32,
    )
    np.testing.assert_array_equal(result.matrix, expected)
    coverage = result.coverage()
    assert coverage["amount"] == {"present": 2, "defaulted": 1, "out_of_range": 1, "oov": 0}
    assert coverage["country"] == {"present": 2, "defaulted": 1, "out_of_range": 0, "oov": 1}
    assert coverage["channel"] == {"present": 2, "defaulted": 1, "out_of_range": 0, "oov": 1}
    assert coverage["vip"] == {"present": 0, "defaulted": 3, "out_of_range": 0, "oov": 0}
    assert result.total("oov") == 2 and result.total("defaulted") == 6


def test_pyarrow_tables_numpy_and_lists_give_the_same_matrix(contract_file: Path):
    v1 = features.load_contract(contract_file, "v1")
    table = pa.table(
        {
            "amount": pa.array([1.5, None, 2.5], pa.float64()),
            "age": pa.array([1, 2, 3], pa.int64()),
            "country": pa.array(["US", None, "BR"]),
            "channel": pa.array(["web", "pos", None]),
            "vip": pa.array([True, False, True]),
        }
    )
    from_lists = features.assemble(
        v1,
        {
            "amount": [1.5, None, 2.5],
            "age": [1, 2, 3],
            "country": ["US", None, "BR"],
            "channel": [b"web", b"pos", None],
            "vip": [True, False, True],
        },
    )
    from_numpy = features.assemble(
        v1,
        {
            "amount": np.array([1.5, np.nan, 2.5]),
            "age": np.array([1, 2, 3], dtype=np.int32),
            "country": np.array(["US", "", "BR"]),
            "channel": np.array(["web", "pos", ""]),
            "vip": np.array([True, False, True]),
        },
    )
    from_arrow = features.assemble(v1, table)
    np.testing.assert_array_equal(from_arrow, from_lists)
    np.testing.assert_array_equal(from_arrow, from_numpy)


@pytest.mark.parametrize(
    ("columns", "message"),
    [
        ({"age": [1, 50_000]}, r"feature 'age' row 1: 50000.0 is outside the range \[0, 36500\]"),
        ({"age": [1, 2], "amount": ["a", "b"]}, "feature 'amount' is float .* got BYTES"),
        ({"age": [1.5]}, "feature 'age' is int .* sent as INT32 or INT64, got FP64"),
        ({"age": [1, 2], "channel": ["pos"]}, "feature 'channel' has 1 rows but 'age' has 2"),
        ({"age": [1], "colour": ["red"]}, "unknown feature 'colour': contract v1 takes amount"),
        ({"amount": [1.0]}, r"feature 'age' is missing; contract v1 requires it"),
        ({"age": [1], "country": np.array([3])}, "feature 'country' is categorical .* got INT64"),
        ({"age": [1, 2], "country": ["US", 3]}, "feature 'country' row 1 is int, not a string"),
    ],
)
def test_bad_columns_name_the_feature_and_row(contract_file: Path, columns, message):
    v1 = features.load_contract(contract_file, "v1")
    with pytest.raises(features.ContractViolation, match=message) as err:
        features.assemble(v1, columns)
    assert isinstance(err.value, InvalidRequest)  # INVALID_ARGUMENT on the wire


def test_nan_where_the_contract_forbids_nulls(contract_file: Path):
    v2 = features.load_contract(contract_file, "v2")
    with pytest.raises(features.ContractViolation, match="feature 'amount' row 2 is null"):
        features.assemble(v2, {"amount": [1.0, 2.0, float("nan"), float("nan")]})
    # v2 ignores features it does not know
    assert features.assemble(v2, {"amount": [1.0], "colour": ["red"]}).tolist() == [[1.0]]


def test_a_sensitive_value_never_appears_in_an_error(tmp_path: Path):
    data = {
        "versions": {
            "v1": {
                "features": [
                    {
                        "name": "salary",
                        "kind": "float",
                        "owner": "hr",
                        "description": "d",
                        "range": {"min": 0, "max": 10},
                        "sensitive": True,
                    },
                ]
            }
        }
    }
    contract = features.load_contract(write(tmp_path, data))
    with pytest.raises(features.ContractViolation) as err:
        features.assemble(contract, {"salary": [123456.0]})
    assert "123456" not in str(err.value) and "withheld" in str(err.value)
    key = b"k" * 32
    assert features.redact("BR", key) == features.redact(b"BR", key) != features.redact("BR", b"x")


@pytest.mark.parametrize(
    ("feature", "message"),
    [
        ({"kind": "categorical"}, "needs a non-empty vocabulary"),
        ({"kind": "float", "vocabulary": ["a"]}, "vocabulary applies to categorical"),
        ({"kind": "float", "range": {"min": 5, "max": 1}}, "min 5.0 is over max 1.0"),
        ({"kind": "float", "null_policy": {"default": 9}, "range": {"max": 1}}, "outside"),
        ({"kind": "categorical", "vocabulary": ["a"], "null_policy": {"default": "b"}}, "not in"),
        ({"kind": "float", "transform": [{"standardize": {"mean": 0, "std": 0}}]}, "std"),
        ({"kind": "float", "transform": [{"bucketize": {"boundaries": [2, 1]}}]}, "increasing"),
        ({"kind": "float", "transform": ["square"]}, "transform"),
        ({"kind": "bool", "range": {"min": 0}}, "bool feature takes no range"),
        ({"kind": "text"}, "kind"),
        ({"kind": "float", "colour": "red"}, "colour"),
    ],
)
def test_a_bad_contract_names_the_key_at_fault(tmp_path: Path, feature: dict, message: str):
    spec = {"name": "x", "owner": "o", "description": "d", **feature}
    path = write(tmp_path, {"versions": {"v1": {"features": [spec]}}})
    with pytest.raises(SettingsError, match=message) as err:
        features.load_contracts(path)
    assert "versions.v1.features.0" in str(err.value)


def test_contract_level_errors(tmp_path: Path):
    spec = {"name": "x", "kind": "float", "owner": "o", "description": "d"}
    with pytest.raises(SettingsError, match="declared twice"):
        features.load_contracts(write(tmp_path, {"versions": {"v1": {"features": [spec, spec]}}}))
    with pytest.raises(SettingsError, match="named v1, v2"):
        features.load_contracts(write(tmp_path, {"versions": {"latest": {"features": [spec]}}}))
    with pytest.raises(SettingsError, match="cannot read"):
        features.load_contracts(tmp_path / "missing.yaml")
