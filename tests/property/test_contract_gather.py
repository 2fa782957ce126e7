"""The native kernel's ``gather`` takes a raw-feature request exactly as Contract's own loop
does, or leaves it to that loop: on any request (features in any order, some missing, unknown
names, duplicates, shapes [N], [N, 1] and others, rows that differ, accepted and refused
datatypes, BYTES as the wire buffer or as objects, unknown features rejected or ignored) it
returns the loop's columns and rows, or None where the loop raises; and it takes the common
case itself."""

from __future__ import annotations

import os

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.demo import contract_file, synthetic_transactions
from gateway.errors import InvalidRequest
from gateway.features import kernel
from gateway.features.contract import Contract, load_contract
from gateway.features.spec import ACCEPTED_DATATYPES
from gateway.types import NUMPY_DTYPES, Tensor

try:
    from gateway import _features_c

    native_gather = _features_c.gather
except ImportError:  # the parity tests below then fail loudly instead of being skipped
    native_gather = None

COLUMNS, _ = synthetic_transactions(8, seed=5)
DATATYPES = ["FP32", "FP64", "INT32", "INT64", "BOOL", "BYTES", "UINT8"]


def test_native_gather_is_built():
    assert native_gather is not None, "gateway._features_c is not built: run `make native`"


def test_selector_uses_the_extension_when_expected():
    if os.environ.get("GATEWAY_EXPECT_EXTENSIONS"):
        assert kernel.gather is native_gather
    if os.environ.get("GATEWAY_NO_EXTENSIONS"):
        assert kernel.gather is not native_gather


@pytest.fixture(scope="module", params=["reject", "ignore"])
def contract(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Contract:
    spec = contract_file(COLUMNS)
    for version in spec["versions"].values():
        version["unknown_features"] = request.param
    path = tmp_path_factory.mktemp("contract") / "features.yaml"
    path.write_text(yaml.safe_dump(spec))
    return load_contract(path)


@st.composite
def tensor(draw: st.DrawFn, name: str, kind: str | None) -> Tensor:
    rows = draw(st.sampled_from([2, 2, 2, 1, 3]))
    shape = draw(st.sampled_from([(rows,), (rows,), (rows, 1), (rows, 2), (), (rows, 1, 1)]))
    usual = ACCEPTED_DATATYPES[kind][0] if kind else "FP32"
    datatype = draw(st.sampled_from([usual, usual, usual, *DATATYPES]))
    count = int(np.prod(shape))
    if datatype == "BYTES":
        items = [b"grocery"] * count
        if draw(st.booleans()):
            raw = b"".join(len(i).to_bytes(4, "little") + i for i in items)
            return Tensor(name, "BYTES", raw=raw, shape=shape)
        return Tensor(name, "BYTES", np.array(items, dtype=object).reshape(shape))
    data = np.arange(count).astype(NUMPY_DTYPES[datatype]).reshape(shape)
    return Tensor(name, datatype, data)


@st.composite
def requests(draw: st.DrawFn, contract: Contract) -> list[Tensor]:
    names = [(f.name, f.kind) for f in contract.features]
    chosen = draw(st.lists(st.sampled_from(names), max_size=len(names) + 2))
    if draw(st.booleans()):  # the usual request: every feature once
        chosen = draw(st.permutations(names))
    tensors = [draw(tensor(name, kind)) for name, kind in chosen]
    if draw(st.integers(0, 3)) == 0:
        tensors.insert(draw(st.integers(0, len(tensors))), draw(tensor("not_a_feature", None)))
    return tensors


def same_columns(ours: list, theirs: list) -> bool:
    return len(ours) == len(theirs) and all(
        (a is None and b is None)
        or (isinstance(a, bytes) and a is b)
        or (isinstance(a, np.ndarray) and a.shape == b.shape and np.array_equal(a, b))
        for a, b in zip(ours, theirs, strict=True)
    )


@settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_native_gather_agrees_with_the_contracts_loop(contract: Contract, data):
    assert native_gather is not None
    tensors = data.draw(requests(contract))
    gathered = native_gather(
        contract.index,
        contract.accepted_datatypes,
        tensors,
        contract.ignore_unknown,
        len(contract.features),
    )
    try:
        expected = contract._gather(tensors, "m")
    except InvalidRequest:
        assert gathered is None
        return
    if gathered is not None:
        columns, rows = gathered
        assert rows == expected[1]
        assert same_columns(columns, expected[0])


def test_native_gather_takes_a_whole_request_itself(contract: Contract):
    """The common case is the fast one: every feature once, [N] or [N, 1], usual datatypes."""
    assert native_gather is not None
    tensors = []
    for i, f in enumerate(contract.features):
        datatype = ACCEPTED_DATATYPES[f.kind][0]
        shape = (3,) if i % 2 else (3, 1)
        if datatype == "BYTES":
            raw = b"".join(len(v).to_bytes(4, "little") + v for v in [b"a", b"bb", b""])
            tensors.append(Tensor(f.name, "BYTES", raw=raw, shape=shape))
        else:
            tensors.append(Tensor(f.name, datatype, np.ones(shape, NUMPY_DTYPES[datatype])))
    gathered = native_gather(
        contract.index, contract.accepted_datatypes, tensors, False, len(contract.features)
    )
    assert gathered is not None
    columns, rows = gathered
    assert rows == 3
    assert same_columns(columns, contract._gather(tensors, "m")[0])
