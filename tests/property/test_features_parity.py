"""The native assembly kernel and its pure-Python reference agree bit for bit.

Random contracts (every kind, null policy, range policy and transform) over random columns
(NaN, +-inf, -0.0, empty strings, non-UTF-8 bytes, None, absent features, empty batches;
categorical values as objects or as a raw OIP buffer): the same matrix bits, the same coverage
counts, and the same first error. Some cases reach past the native kernel's own sizes: more
rows than one block (the first error may lie in a later block), and bucketize steps with more
boundaries than it counts branch-free (it binary-searches those).
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import numpy as np
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from gateway import _hotloops_py
from gateway.features import _kernel_py, kernel
from gateway.features._plan import ERROR_NULL_REJECTED
from gateway.features.contract import Contract
from gateway.features.spec import ContractVersionSpec

try:
    from gateway import _features_c
except ImportError:  # the parity tests below then fail loudly instead of being skipped
    _features_c = None

# The native kernel's sizes (rows per block, boundaries counted branch-free), as built.
SIZES = {"block_rows": 256, "linear_buckets": 32} if _features_c is None else _features_c.SIZES
BLOCK_ROWS = SIZES["block_rows"]
LINEAR_BUCKETS = SIZES["linear_buckets"]
SMALL_ROWS = 12  # up to this many rows, every value is drawn by Hypothesis


def test_native_kernel_is_built():
    assert _features_c is not None, "gateway._features_c is not built: run `make native`"


def test_selector_uses_the_extension_when_expected():
    if os.environ.get("GATEWAY_EXPECT_EXTENSIONS"):
        assert kernel.USING_EXTENSION
    if os.environ.get("GATEWAY_NO_EXTENSIONS"):
        assert not kernel.USING_EXTENSION


WORDS = ["a", "b", "grocery", "日本", "x" * 40, "US", "BR"]
SPECIAL = [0.0, -0.0, -1.0, -2.0, 1e308, 5.0, 1.0]
FLOATS = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(SPECIAL))
BOUND = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False)
# Whole numbers as boundaries, so values land exactly on them (bucketize counts b <= v).
GRID = st.integers(-64, 64).map(float)
CATEGORIES = [*(w.encode() for w in WORDS), b"", b"\xff\xfe", b"zz", None]


@st.composite
def boundaries(draw):
    """A bucketize step's boundaries: a few, or more than the native kernel counts branch-free."""
    if draw(st.booleans()):
        size = st.integers(LINEAR_BUCKETS + 1, LINEAR_BUCKETS + 24)
        count = draw(size)
        edges = draw(st.lists(GRID | BOUND, min_size=count, max_size=count, unique=True))
        return sorted(edges)
    return sorted(set(draw(st.lists(GRID | BOUND, min_size=1, max_size=6))))


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
    return {"bucketize": {"boundaries": draw(boundaries())}}


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
def many_rows(draw, rows, first, drawn, background):
    """``rows`` values past what Hypothesis should draw one by one: a seeded background, and a
    few drawn values at drawn rows from ``first`` on (a bad value may sit in any block)."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    values = background(rng, rows)
    for _ in range(draw(st.integers(0, 3))):
        values[draw(st.integers(first, rows - 1))] = draw(drawn)
    return values


def numbers(rng, rows, special_share, bounds=None):
    """Wide floats and whole numbers (ties with GRID), a share of them special (NaN, +-inf);
    clipped to ``bounds`` when given (so some lie exactly on them)."""
    values = np.where(
        rng.random(rows) < 0.5,
        rng.integers(-70, 70, rows).astype(np.float64),
        rng.uniform(-2e6, 2e6, rows),
    )
    if bounds is not None:
        values = np.clip(values, *bounds)
    special = rng.random(rows) < special_share
    values[special] = rng.choice([np.nan, np.inf, -np.inf, *SPECIAL], int(special.sum()))
    return values


def categories(rng, rows, pool):
    values = np.empty(rows, dtype=object)
    values[:] = [pool[i] for i in rng.integers(0, len(pool), rows)]
    return values


@st.composite
def column(draw, spec, rows, clean, first):
    """A feature's column: drawn value by value for a few rows; past that, many_rows over a
    background, ``clean`` (no nulls, in range, in vocabulary) or not. Over a clean background
    the few drawn values (nulls likely, from row ``first`` on) decide whether and in which
    block the run fails."""
    kind = spec["kind"]
    if kind == "categorical":
        pool = st.one_of(
            st.sampled_from([w.encode() for w in WORDS]),
            st.just(b""),
            st.just(b"\xff\xfe"),
            st.binary(max_size=6),
            st.none(),
        )
        if rows <= SMALL_ROWS:
            values = np.empty(rows, dtype=object)
            values[:] = draw(st.lists(pool, min_size=rows, max_size=rows))
        else:
            words = [w.encode() for w in spec["vocabulary"]] if clean else CATEGORIES
            drawn = st.one_of(st.sampled_from([b"", None]), pool)
            values = draw(many_rows(rows, first, drawn, lambda rng, n: categories(rng, n, words)))
        if draw(st.booleans()):  # as the wire carries them: one length-prefixed buffer
            return _hotloops_py.encode_bytes([v or b"" for v in values])
        return values
    if kind == "bool":
        if rows <= SMALL_ROWS:
            return np.array(draw(st.lists(st.booleans(), min_size=rows, max_size=rows)), float)
        return draw(
            many_rows(rows, first, st.booleans(), lambda rng, n: rng.random(n) < 0.5)
        ).astype(np.float64)
    if rows <= SMALL_ROWS:
        return np.array(draw(st.lists(FLOATS, min_size=rows, max_size=rows)), dtype=np.float64)
    if clean:
        share, bounds = (
            0.0,
            (spec["range"]["min"], spec["range"]["max"]) if "range" in spec else None,
        )
    else:
        share, bounds = draw(st.sampled_from([0.0, 0.002, 0.2])), None
    drawn = st.one_of(st.just(np.nan), FLOATS)
    return draw(many_rows(rows, first, drawn, lambda rng, n: numbers(rng, n, share, bounds)))


class Case(NamedTuple):
    """A contract, a column per feature and the row count. Printed in full for a few rows and
    summarised past that: a failing case of a few hundred rows would print tens of kB."""

    contract: Contract
    columns: list[Any]
    rows: int

    def __repr__(self) -> str:
        features = [f.model_dump(exclude_defaults=True) for f in self.contract.features]
        if self.rows <= SMALL_ROWS:
            columns = repr(self.columns)
        else:
            columns = "[" + ", ".join(_summary(c) for c in self.columns) + "]"
        return f"Case(features={features!r}, rows={self.rows}, columns={columns})"


def _summary(column: Any) -> str:
    if isinstance(column, bytes):
        return f"<raw BYTES, {len(column)} bytes: {column[:24]!r}...>"
    if column is None:
        return "None"
    return np.array2string(column, threshold=8, edgeitems=3)


@st.composite
def case(draw):
    n_features = draw(st.integers(1, 5))
    specs = [draw(feature(i)) for i in range(n_features)]
    contract = Contract("v1", ContractVersionSpec.model_validate({"features": specs}))
    clean, first = False, 0
    if draw(st.integers(0, 3)) == 0:  # past one block of the native kernel
        rows = draw(st.integers(BLOCK_ROWS - 1, 2 * BLOCK_ROWS + 1))
        clean = draw(st.booleans())
        if clean:  # and every drawn (maybe bad) value past the first block
            first = min(BLOCK_ROWS, rows - 1)
    else:
        rows = draw(st.integers(0, SMALL_ROWS))
    columns: list[Any] = []
    for spec in specs:
        if not clean and draw(st.integers(0, 5)) == 0:
            columns.append(None)  # absent from the request: every row null
        else:
            columns.append(draw(column(spec, rows, clean, first)))
    return Case(contract, columns, rows)


def many_boundaries_over_blocks(bad_row: int | None):
    """Three blocks of rows through a bucketize step the native kernel binary-searches, a raw
    categorical column, and (when ``bad_row`` is set) a rejected null in a later block."""
    rows = 2 * BLOCK_ROWS + 3
    edges = [float(e) for e in range(-(LINEAR_BUCKETS + 8), LINEAR_BUCKETS + 8, 2)]
    specs = [
        {
            "name": "n",
            "kind": "float",
            "owner": "o",
            "description": "d",
            "null_policy": {"default": 0.5},
            "transform": [{"bucketize": {"boundaries": edges}}],
        },
        {
            "name": "c",
            "kind": "categorical",
            "owner": "o",
            "description": "d",
            "vocabulary": ["a", "b"],
            "encoding": "one_hot",
            "null_policy": {"default": None},
        },
        {"name": "r", "kind": "float", "owner": "o", "description": "d", "null_policy": "reject"},
    ]
    contract = Contract("v1", ContractVersionSpec.model_validate({"features": specs}))
    values = np.arange(rows, dtype=np.float64) % 97 - 48.0
    values[::7] = np.nan
    words = [b"a", b"b", b"", b"c"]
    raw = _hotloops_py.encode_bytes([words[i % 4] for i in range(rows)])
    required = np.ones(rows)
    if bad_row is not None:
        required[bad_row] = np.nan
    return Case(contract, [values, raw, required], rows)


def test_a_bad_value_in_a_later_block_is_found_there():
    contract, columns, rows = many_boundaries_over_blocks(bad_row=BLOCK_ROWS + 5)
    for module in (_kernel_py, _features_c):
        assert run(module, contract, columns, rows)[2] == (2, BLOCK_ROWS + 5, ERROR_NULL_REJECTED)


def test_many_boundaries_bucketize_as_a_count_of_boundaries_at_or_below():
    contract, columns, rows = many_boundaries_over_blocks(bad_row=None)
    edges = np.array(contract.features[0].transform[0].bucketize.boundaries)
    assert len(edges) > LINEAR_BUCKETS
    values = np.where(np.isnan(columns[0]), 0.5, columns[0])
    expected = (edges[None, :] <= values[:, None]).sum(axis=1).astype(np.float32)
    for module in (_kernel_py, _features_c):
        out, _, error = run(module, contract, columns, rows)
        assert error is None
        assert out[:, 0].tolist() == expected.tolist()


def run(module, contract, columns, rows):
    out = np.zeros((rows, contract.width), dtype=np.float32)
    counts = np.zeros((len(contract.features), 4), dtype=np.int64)
    error = module.run(module.prepare(contract.plan), columns, rows, out, counts)
    return out, counts, error


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case())
@example(many_boundaries_over_blocks(bad_row=None))
@example(many_boundaries_over_blocks(bad_row=BLOCK_ROWS + 5))
def test_native_and_python_kernels_agree(data):
    contract, columns, rows = data
    event(f"rows past one block: {rows > BLOCK_ROWS}")
    event(f"binary-searched boundaries: {bool((contract.plan.bound_count > LINEAR_BUCKETS).any())}")
    out_py, counts_py, error_py = run(_kernel_py, contract, columns, rows)
    out_c, counts_c, error_c = run(_features_c, contract, columns, rows)
    event(f"failed in a later block: {error_py is not None and error_py[1] >= BLOCK_ROWS}")
    assert error_c == error_py
    if error_py is None:
        assert out_c.view(np.uint32).tolist() == out_py.view(np.uint32).tolist()
        assert counts_c.tolist() == counts_py.tolist()
        # Every value is accounted for exactly once: present or defaulted.
        assert (counts_py[:, 0] + counts_py[:, 1] == rows).all()


def test_a_malformed_raw_buffer_is_refused_by_both_with_the_same_error():
    spec = {
        "name": "c",
        "kind": "categorical",
        "owner": "o",
        "description": "d",
        "vocabulary": ["a"],
    }
    contract = Contract("v1", ContractVersionSpec.model_validate({"features": [spec]}))
    for buffer in (b"\x05\x00\x00\x00ab", b"\x01\x00\x00\x00a" * 3, b"\x01\x00"):
        messages = []
        for module in (_kernel_py, _features_c):
            with pytest.raises(ValueError) as raised:
                run(module, contract, [buffer], 2)
            messages.append(str(raised.value))
        assert messages[0] == messages[1]


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
