"""The native assembly kernel and its pure-Python reference agree bit for bit.

Random contracts (every kind, null policy, range policy and transform) over random columns
(NaN, +-inf, -0.0, empty strings, non-UTF-8 bytes, None, absent features, empty batches;
categorical values as objects or as a raw OIP buffer): the same matrix bits, the same coverage
counts, and the same first error.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway import _hotloops_py
from gateway.features import _kernel_py, kernel
from gateway.features.contract import Contract, ContractVersionSpec

try:
    from gateway import _features_c
except ImportError:  # the parity tests below then fail loudly instead of being skipped
    _features_c = None  # type: ignore[assignment]


def test_native_kernel_is_built():
    assert _features_c is not None, "gateway._features_c is not built: run `make native`"


def test_selector_uses_the_extension_when_expected():
    if os.environ.get("GATEWAY_EXPECT_EXTENSIONS"):
        assert kernel.USING_EXTENSION
    if os.environ.get("GATEWAY_NO_EXTENSIONS"):
        assert not kernel.USING_EXTENSION


WORDS = ["a", "b", "grocery", "日本", "x" * 40, "US", "BR"]
FLOATS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, -1.0, -2.0, 1e308, 5.0, 1.0]),
)
BOUND = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False)


@st.composite
def steps(draw):
    kind = draw(st.sampled_from(["identity", "log1p", "standardize", "clip", "bucketize"]))
    if kind in ("identity", "log1p"):
        return kind
    if kind == "standardize":
        return {"standardize": {"mean": draw(BOUND), "std": draw(st.floats(1e-3, 1e3))}}
    if kind == "clip":
        lo, hi = sorted([draw(BOUND), draw(BOUND)])
        return {"clip": {"min": lo, "max": hi}}
    edges = sorted(set(draw(st.lists(BOUND, min_size=1, max_size=6))))
    return {"bucketize": {"boundaries": edges}}


@st.composite
def feature(draw, index):
    kind = draw(st.sampled_from(["float", "int", "bool", "categorical"]))
    spec = {"name": f"f{index}", "kind": kind, "owner": "o", "description": "d"}
    if kind == "categorical":
        vocab = draw(st.lists(st.sampled_from(WORDS), min_size=1, max_size=5, unique=True))
        spec["vocabulary"] = vocab
        spec["encoding"] = draw(st.sampled_from(["index", "one_hot"]))
        if draw(st.booleans()):
            spec["null_policy"] = {"default": draw(st.sampled_from([None, *vocab]))}
        return spec
    if kind == "bool":
        if draw(st.booleans()):
            spec["null_policy"] = {"default": draw(st.sampled_from([0.0, 1.0]))}
        return spec
    lo, hi = sorted([draw(BOUND), draw(BOUND)])
    if draw(st.booleans()):
        spec["range"] = {
            "min": lo,
            "max": hi,
            "policy": draw(st.sampled_from(["reject", "clip", "flag"])),
        }
    if draw(st.booleans()):
        spec["null_policy"] = {"default": lo}
    spec["transform"] = draw(st.lists(steps(), max_size=3))
    return spec


@st.composite
def case(draw):
    n_features = draw(st.integers(1, 5))
    specs = [draw(feature(i)) for i in range(n_features)]
    contract = Contract("v1", ContractVersionSpec.model_validate({"features": specs}))
    rows = draw(st.integers(0, 12))
    columns = []
    for spec in specs:
        if draw(st.integers(0, 5)) == 0:
            columns.append(None)  # absent from the request: every row null
        elif spec["kind"] == "categorical":
            pool = st.one_of(
                st.sampled_from([w.encode() for w in WORDS]),
                st.just(b""),
                st.just(b"\xff\xfe"),
                st.binary(max_size=6),
                st.none(),
            )
            drawn = draw(st.lists(pool, min_size=rows, max_size=rows))
            if draw(st.booleans()):  # as the wire carries them: one length-prefixed buffer
                columns.append(_hotloops_py.encode_bytes([v or b"" for v in drawn]))
                continue
            values = np.empty(rows, dtype=object)
            values[:] = drawn
            columns.append(values)
        elif spec["kind"] == "bool":
            columns.append(
                np.array(
                    draw(st.lists(st.booleans(), min_size=rows, max_size=rows)), dtype=np.float64
                )
            )
        else:
            columns.append(
                np.array(draw(st.lists(FLOATS, min_size=rows, max_size=rows)), dtype=np.float64)
            )
    return contract, columns, rows


def run(module, contract, columns, rows):
    out = np.zeros((rows, contract.width), dtype=np.float32)
    counts = np.zeros((len(contract.features), 4), dtype=np.int64)
    error = module.run(module.prepare(contract.plan), columns, rows, out, counts)
    return out, counts, error


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case())
def test_native_and_python_kernels_agree(data):
    contract, columns, rows = data
    out_py, counts_py, error_py = run(_kernel_py, contract, columns, rows)
    out_c, counts_c, error_c = run(_features_c, contract, columns, rows)
    assert error_c == error_py
    if error_py is None:
        assert out_c.view(np.uint32).tolist() == out_py.view(np.uint32).tolist()
        assert counts_c.tolist() == counts_py.tolist()
        # Every value is accounted for exactly once: present or defaulted.
        assert (counts_py[:, 0] + counts_py[:, 1] == rows).all()


def test_a_malformed_raw_buffer_is_refused_by_both():
    spec = {"name": "c", "kind": "categorical", "owner": "o", "description": "d"}
    spec["vocabulary"] = ["a"]
    contract = Contract("v1", ContractVersionSpec.model_validate({"features": [spec]}))
    for module in (_kernel_py, _features_c):
        for buffer in (b"\x05\x00\x00\x00ab", b"\x01\x00\x00\x00a" * 3):
            with pytest.raises(ValueError):
                run(module, contract, [buffer], 2)


def test_a_non_bytes_categorical_element_is_an_error_in_both():
    spec = {
        "name": "c",
        "kind": "categorical",
        "owner": "o",
        "description": "d",
        "vocabulary": ["a"],
    }
    contract = Contract("v1", ContractVersionSpec.model_validate({"features": [spec]}))
    values = np.empty(3, dtype=object)
    values[:] = [b"a", "a", b"a"]
    for module in (_kernel_py, _features_c):
        assert run(module, contract, [values], 3)[2] == (0, 1, 3)


def test_large_vocabulary_lookups_agree():
    vocab = [f"value-{i}" for i in range(5000)]
    spec = {
        "name": "c",
        "kind": "categorical",
        "owner": "o",
        "description": "d",
        "vocabulary": vocab,
        "encoding": "index",
    }
    contract = Contract("v1", ContractVersionSpec.model_validate({"features": [spec]}))
    rng = np.random.default_rng(0)
    values = np.empty(20_000, dtype=object)
    values[:] = [f"value-{i}".encode() for i in rng.integers(0, 6000, 20_000)]
    out_py, counts_py, _ = run(_kernel_py, contract, [values], 20_000)
    out_c, counts_c, _ = run(_features_c, contract, [values], 20_000)
    assert np.array_equal(out_py, out_c) and counts_py.tolist() == counts_c.tolist()
    expected = np.array([int(v[6:]) + 1 if int(v[6:]) < 5000 else 0 for v in values])
    assert np.array_equal(out_c[:, 0], expected.astype(np.float32))
