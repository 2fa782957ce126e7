"""The native event encoder writes the same PredictionEvent as the protobuf runtime does from
the same answer: raw-feature requests under the demo contract (a sensitive feature included;
features in any order, some left out, each in any datatype its kind accepts, [N] or [N, 1],
BYTES as the wire buffer or as objects, text that is not UTF-8), with the model input they
were assembled into (within events.max_columns or not), and requests that sent the model's own
input, with every optional part present or not."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from numpy.typing import NDArray

from gateway.api.v1 import events_pb2 as ev
from gateway.demo import contract_file, synthetic_transactions
from gateway.events import _encoder, builder
from gateway.features import redact
from gateway.features.contract import Contract, load_contract
from gateway.features.spec import ACCEPTED_DATATYPES
from gateway.types import (
    NUMPY_DTYPES,
    InferRequest,
    InferResponse,
    ModelInput,
    RequestOptions,
    Tensor,
)

try:
    from gateway import _events_c

    native_encode = _events_c.encode_event
except ImportError:  # the parity tests below then fail loudly instead of being skipped
    native_encode = None

KEY = b"k" * 32
MAX_COLUMNS = 64
COLUMNS, _ = synthetic_transactions(64, seed=11)
TEXT = st.text(max_size=12)


def test_native_encoder_is_built():
    assert native_encode is not None, "gateway._events_c is not built: run `make native`"


def test_selector_uses_the_extension_when_expected():
    if os.environ.get("GATEWAY_EXPECT_EXTENSIONS"):
        assert _encoder.USING_EXTENSION
    if os.environ.get("GATEWAY_NO_EXTENSIONS"):
        assert not _encoder.USING_EXTENSION


def raw_tensor(name: str, kind: str, start: int, rows: int) -> Tensor:
    """Rows of a demo feature, sent as a client would."""
    values = COLUMNS[name][start : start + rows]
    if kind == "categorical":
        return Tensor(name, "BYTES", np.array([v.encode() for v in values], dtype=object))
    if kind == "int":
        return Tensor(name, "INT64", values.astype(np.int64))
    return Tensor(name, "FP64", values.astype(np.float64))


@st.composite
def sent_tensor(draw: st.DrawFn, name: str, kind: str, start: int, rows: int) -> Tensor:
    """A demo feature in any datatype its kind accepts, shaped [N] or [N, 1]; BYTES as the
    wire buffer (as the native decoder keeps it) or as objects, now and then not UTF-8."""
    values = COLUMNS[name][start : start + rows]
    shape = (rows,) if draw(st.booleans()) else (rows, 1)
    if kind == "categorical":
        items = [v.encode() for v in values]
        if draw(st.integers(0, 4)) == 0:
            items[0] = b"\xff" + items[0]
        if draw(st.booleans()):
            raw = b"".join(len(i).to_bytes(4, "little") + i for i in items)
            return Tensor(name, "BYTES", raw=raw, shape=shape)
        return Tensor(name, "BYTES", np.array(items, dtype=object).reshape(shape))
    datatype = draw(st.sampled_from(ACCEPTED_DATATYPES[kind]))
    data = np.asarray(values).astype(NUMPY_DTYPES[datatype])
    if draw(st.integers(0, 4)) == 0:  # big-endian, as numpy may hand a client's array
        data = data.astype(data.dtype.newbyteorder(">"))
    if draw(st.integers(0, 4)) == 0:  # a strided view, not contiguous
        data = np.repeat(data, 2)[::2]
    return Tensor(name, datatype, data.reshape(shape))


@pytest.fixture(scope="module")
def contract(tmp_path_factory: pytest.TempPathFactory) -> Contract:
    path = tmp_path_factory.mktemp("contract") / "features.yaml"
    path.write_text(yaml.safe_dump(contract_file(COLUMNS)))
    return load_contract(path)


@st.composite
def answers(draw: st.DrawFn, contract: Contract) -> builder.Pending:
    rows = draw(st.integers(1, 4))
    parameters: dict[str, str | int] = {}
    for name in ("tenant", "surface", "entity_key"):
        if draw(st.booleans()):
            parameters[name] = draw(TEXT)
    for name in draw(st.lists(TEXT, max_size=2, unique=True)):
        parameters[f"segment.{name}"] = draw(st.one_of(TEXT, st.integers(-5, 5)))
    coverage = model_input = None
    if draw(st.booleans()):  # raw features under the contract
        start = draw(st.integers(0, 64 - rows))
        required = set(contract.required)
        sent = [
            f
            for i, f in enumerate(contract.features)
            if i in required or draw(st.integers(0, 5)) > 0
        ]
        inputs = [
            draw(sent_tensor(f.name, f.kind, start, rows)) for f in draw(st.permutations(sent))
        ]
        assembled = contract.assemble(inputs, "fraud", 1 << 20)
        coverage = assembled.coverage
        if draw(st.integers(0, 5)) > 0:
            matrix = assembled.matrix
            if draw(st.integers(0, 4)) == 0:  # not C-ordered: the encoders make it so
                matrix = np.asfortranarray(matrix)
            model_input = ModelInput(contract.columns, matrix)
    else:  # the model's own input
        width = draw(st.sampled_from([1, 3, 19, MAX_COLUMNS + 1]))
        matrix = np.arange(rows * width, dtype=np.float32).reshape(rows, width)
        inputs = [Tensor(name="features", datatype="FP32", data=matrix)]
        if draw(st.booleans()):
            ids = np.arange(rows, dtype=np.int64)
            inputs.append(Tensor(name="ids", datatype="INT64", data=ids))
        if draw(st.booleans()):
            notes = np.array([b"n%d" % i for i in range(rows)], dtype=object)
            inputs.append(Tensor(name="notes", datatype="BYTES", data=notes))
        if draw(st.booleans()):
            inputs.append(Tensor("scalar", "FP32", np.array(1.5, dtype=np.float32)))
    outputs = []
    for index in range(draw(st.integers(0, 2))):
        kind = draw(st.sampled_from(["probability", "class", "label", "other_rows"]))
        data: NDArray[Any]
        if kind == "probability":
            data = np.linspace(0, 1, rows * 2, dtype=np.float32).reshape(rows, 2)
        elif kind == "class":
            data = np.arange(rows, dtype=np.int64)
        elif kind == "label":
            data = np.array([b"x"] * rows, dtype=object)
        else:
            data = np.zeros((rows + 1, 1), dtype=np.float32)
        outputs.append(Tensor(f"{kind}{index}", "FP32", data))
    answered: dict[str, object] = {
        "queue_us": draw(st.integers(0, 10**6)),
        "compute_us": draw(st.integers(0, 10**6)),
        "cost": draw(st.floats(0, 1e3)),
        "cached_rows": draw(st.integers(0, rows)),
    }
    for name in ("route", "arm", "variant", "fallback", "fallback_reason"):
        if draw(st.booleans()):
            answered[name] = draw(TEXT)
    request = InferRequest("fraud", inputs=inputs, options=RequestOptions.parse(parameters))
    response = InferResponse(
        "fraud",
        draw(st.sampled_from(["1", "2"])),
        "",
        outputs,
        answered,  # type: ignore[arg-type]
    )
    return builder.Pending(
        request=request,
        response=response,
        request_id=draw(TEXT),
        coverage=coverage,
        event_time_us=draw(st.integers(0, 2**62)),
        total_ms=draw(st.floats(0, 1e4)),
        nbytes=0,
        model_input=model_input,
    )


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_native_and_protobuf_encodings_parse_to_the_same_event(contract: Contract, data):
    assert native_encode is not None
    pending = data.draw(answers(contract))
    event_id = data.draw(TEXT)
    # The contract's width, and one less: the model input is kept, then left out.
    max_columns = data.draw(st.sampled_from([MAX_COLUMNS, contract.width, contract.width - 1]))
    expected = builder.build_event(pending, event_id, KEY, redact, max_columns)
    encoded = native_encode(pending, event_id, KEY, redact, max_columns)
    assert ev.PredictionEvent.FromString(encoded) == expected


def test_a_sensitive_feature_travels_hashed_in_the_native_encoding(contract: Contract):
    """The parity above would hide a shared mistake: check the sensitive value directly."""
    assert native_encode is not None
    sensitive = [f.name for f in contract.features if f.sensitive]
    assert sensitive
    inputs = [raw_tensor(f.name, f.kind, 0, 2) for f in contract.features]
    pending = builder.Pending(
        request=InferRequest("fraud", inputs=inputs),
        response=InferResponse("fraud", "2", "", [], {}),
        request_id="r1",
        coverage=contract.assemble(inputs, "fraud", 1 << 20).coverage,
        event_time_us=1,
        total_ms=1.0,
        nbytes=0,
    )
    event = ev.PredictionEvent.FromString(native_encode(pending, "e1", KEY, redact, MAX_COLUMNS))
    columns = {c.name: c for c in event.features.strings}
    for name in sensitive:
        clear = COLUMNS[name][:2]
        assert columns[name].hashed
        assert list(columns[name].values) == [
            redact(v if isinstance(v, str) else float(v), KEY) for v in clear
        ]
        assert name not in event.features.numeric_names
    assert [c.feature for c in event.coverage] == [f.name for f in contract.features]


@pytest.mark.parametrize("impl", ["native", "protobuf"])
def test_the_event_carries_the_model_input_as_served_and_the_kinds_features_were_sent_as(
    contract: Contract, impl: str
):
    """The matrix travels bit for bit (float32, little-endian, by contract column name), up
    to events.max_columns; numeric features say what they were sent as."""
    encode = native_encode if impl == "native" else builder.encode_event_py
    assert encode is not None
    inputs = [raw_tensor(f.name, f.kind, 0, 3) for f in contract.features]
    inputs[0] = Tensor(inputs[0].name, "FP32", inputs[0].data.astype(np.float32))
    assembled = contract.assemble(inputs, "fraud", 1 << 20)
    pending = builder.Pending(
        request=InferRequest("fraud", inputs=inputs),
        response=InferResponse("fraud", "2", "", [], {}),
        request_id="r1",
        coverage=assembled.coverage,
        event_time_us=1,
        total_ms=1.0,
        nbytes=0,
        model_input=ModelInput(contract.columns, assembled.matrix),
    )
    event = ev.PredictionEvent.FromString(encode(pending, "e1", KEY, redact, contract.width))
    assert list(event.model_input.columns) == contract.columns
    served = np.frombuffer(event.model_input.values, "<f4").reshape(3, contract.width)
    assert served.tobytes() == assembled.matrix.astype("<f4").tobytes()
    kinds = dict(zip(event.features.numeric_names, event.features.numeric_kinds, strict=True))
    sent = {f.name: f.kind for f in contract.features if not f.sensitive}
    assert kinds == {
        name: {"float": "f", "int": "i", "bool": "b"}[kind]
        for name, kind in sent.items()
        if kind != "categorical"
    }
    narrower = encode(pending, "e1", KEY, redact, contract.width - 1)
    assert not ev.PredictionEvent.FromString(narrower).HasField("model_input")
