"""The native OIP codec (gateway._oip_c) against its twin, the protobuf path.

Run by test_oip_codec.py in a child pytest without the suite's conftest: the twin needs the
gateway's generated ``inference`` messages, which cannot share a process with tritonclient's.

For requests of every datatype, shape, parameter kind and layout (valid or not, and their bytes
cut short or corrupted): where the native decoder answers, it answers exactly what the twin
does; where it does not (None), the twin runs, so errors are the twin's by construction. And
it does answer every well-formed request with raw contents: the fast path is not empty.

The response encoder likewise: for responses of every output datatype, shape and parameter
kind, its bytes parse back to exactly the twin's message, or it declines (None) and the twin
runs; it declines only what protobuf itself would refuse.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from gateway.api.v1 import inference_pb2 as pb
from gateway.errors import InvalidRequest
from gateway.server import codec, convert
from gateway.types import NUMPY_DTYPES, InferRequest, InferResponse, Tensor

try:
    from gateway import _oip_c

    decode_request = _oip_c.decode_request
    encode_response = _oip_c.encode_response
except ImportError:  # then the tests below fail loudly instead of being skipped
    decode_request = encode_response = None

LIMIT = 4096
DATATYPES = [*NUMPY_DTYPES, "BAD"]
KEYS = ["tenant", "priority", "timeout_ms", "cache", "sticky_key", "segment.geo", "entity_key"]
VALUES = st.one_of(
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.text(max_size=8),
    st.floats(allow_nan=False),
    st.integers(0, 2**64 - 1),
)


def test_native_decoder_is_built():
    assert decode_request is not None, "gateway._oip_c is not built: run `make native`"


def test_selector_uses_the_extension_when_expected():
    if os.environ.get("GATEWAY_EXPECT_EXTENSIONS"):
        assert codec.USING_EXTENSION
    if os.environ.get("GATEWAY_NO_EXTENSIONS"):
        assert not codec.USING_EXTENSION


def set_parameter(slot: pb.InferParameter, value: Any, uint: bool) -> None:
    if isinstance(value, bool):
        slot.bool_param = value
    elif isinstance(value, int):
        if uint and value >= 0:
            slot.uint64_param = value
        elif value < 2**63:
            slot.int64_param = value
    elif isinstance(value, float):
        slot.double_param = value
    else:
        slot.string_param = value


@st.composite
def parameters(draw: st.DrawFn, target: Any) -> None:
    for key in draw(st.lists(st.one_of(st.sampled_from(KEYS), st.text(max_size=4)), max_size=3)):
        value = draw(st.one_of(st.none(), VALUES))  # None: an entry with no value set
        if value is not None:
            set_parameter(target[key], value, draw(st.booleans()))
        else:
            target[key].Clear()


def raw_contents(draw: st.DrawFn, datatype: str, shape: list[int]) -> bytes:
    count = int(np.prod([max(d, 0) for d in shape])) if shape else 1
    if datatype == "BYTES":
        items = draw(st.lists(st.binary(max_size=5), min_size=count, max_size=count))
        raw = b"".join(len(i).to_bytes(4, "little") + i for i in items)
    elif datatype in NUMPY_DTYPES:
        size = count * NUMPY_DTYPES[datatype].itemsize
        raw = draw(st.binary(min_size=size, max_size=size))
    else:
        raw = draw(st.binary(max_size=8))
    if draw(st.integers(0, 9)) == 0:  # a wrong size now and then
        raw = raw + b"\x01" if draw(st.booleans()) else raw[:-1]
    return raw


@st.composite
def requests(draw: st.DrawFn) -> pb.ModelInferRequest:
    message = pb.ModelInferRequest(
        model_name=draw(st.text(max_size=6)),
        model_version=draw(st.sampled_from(["", "1", "2"])),
        id=draw(st.one_of(st.text(max_size=6), st.just("x" * 1025))),
    )
    draw(parameters(message.parameters))
    raw_for_all = draw(st.integers(0, 9)) > 0
    for index in range(draw(st.integers(0, 4))):
        datatype = draw(st.sampled_from(DATATYPES))
        shape = draw(st.lists(st.integers(-1, 3), max_size=3))
        tensor = message.inputs.add(name=f"in{index}", datatype=datatype, shape=shape)
        draw(parameters(tensor.parameters))
        if raw_for_all:
            message.raw_input_contents.append(raw_contents(draw, datatype, shape))
        if draw(st.integers(0, 9)) == 0:  # typed contents, beside raw or instead of it
            tensor.contents.fp32_contents.extend([1.0])
    for index in range(draw(st.integers(0, 2))):
        out = message.outputs.add(name=f"out{index}")
        draw(parameters(out.parameters))
    return message


def twin(data: bytes) -> InferRequest | str:
    try:
        return convert.request_from_pb(pb.ModelInferRequest.FromString(data), LIMIT, 1.5)
    except Exception as err:
        return f"{type(err).__name__}: {err}"


def same(fast: InferRequest, slow: InferRequest) -> None:
    for name in ("model_name", "model_version", "id", "requested_outputs", "timeout_s", "nbytes"):
        assert getattr(fast, name) == getattr(slow, name), name
    assert vars_of(fast.options) == vars_of(slow.options)
    assert len(fast.inputs) == len(slow.inputs)
    for a, b in zip(fast.inputs, slow.inputs, strict=True):
        assert (a.name, a.datatype, a.shape, a.parameters) == (
            b.name,
            b.datatype,
            b.shape,
            b.parameters,
        )
        if b.datatype == "BYTES":
            assert a.raw == b.raw
        else:
            assert a.data.dtype == b.data.dtype and a.data.shape == b.data.shape
            assert a.data.tobytes() == b.data.tobytes()
            assert a.data.flags.writeable == b.data.flags.writeable


def vars_of(options: Any) -> dict[str, Any]:
    return {name: getattr(options, name) for name in options.__dataclass_fields__}


def check(data: bytes) -> InferRequest | None:
    assert decode_request is not None
    fast = decode_request(data, LIMIT, 1.5)
    slow = twin(data)
    if fast is not None:
        assert isinstance(slow, InferRequest), slow
        same(fast, slow)
    return fast


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests())
def test_native_decoder_answers_as_the_twin(message: pb.ModelInferRequest):
    data = message.SerializeToString()
    fast = check(data)
    plain = message.raw_input_contents and not any(t.HasField("contents") for t in message.inputs)
    if plain and isinstance(twin(data), InferRequest):
        assert fast is not None, "a well-formed request with raw contents left the fast path"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests(), st.data())
def test_cut_or_corrupted_bytes_never_decode_otherwise(message: pb.ModelInferRequest, data):
    wire = bytearray(message.SerializeToString())
    assume(wire)
    at = data.draw(st.integers(0, len(wire) - 1))
    if data.draw(st.booleans()):
        del wire[at:]
    else:
        wire[at] = data.draw(st.integers(0, 255))
    check(bytes(wire))


def test_unknown_fields_and_unpacked_shapes_decode_as_protobuf_reads_them():
    raw = np.array([1.5, 2.5], np.float32).tobytes()
    # A tensor with shape [2, 1] as two unpacked varints (field 3, wire type 0).
    tensor = b"\x0a\x01x" + b"\x12\x04FP32" + b"\x18\x02\x18\x01"
    wire = (
        b"\xa0\x06\x05"  # an unknown field first (100, varint 5)
        + b"\x2a"
        + bytes([len(tensor)])
        + tensor  # inputs (5), before model_name
        + b"\x0a\x01m"  # model_name (1)
        + b"\x3a\x08"
        + raw  # raw_input_contents (7)
    )
    assert list(pb.ModelInferRequest.FromString(wire).inputs[0].shape) == [2, 1]
    decoded = check(wire)
    assert decoded is not None and decoded.inputs[0].shape == (2, 1)
    assert decoded.model_name == "m"


def test_errors_are_the_twins():
    message = pb.ModelInferRequest(model_name="m")
    message.inputs.add(name="x", datatype="FP32", shape=[2])
    message.raw_input_contents.append(b"\x00" * 5)  # 5 bytes for two FP32
    assert check(message.SerializeToString()) is None
    with pytest.raises(InvalidRequest, match="input 'x' has 5 bytes of raw contents"):
        convert.request_from_pb(message, LIMIT)


# -- responses -------------------------------------------------------------------------------

RESPONSE_VALUES = st.one_of(
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.integers(-(2**70), 2**70),  # outside int64 now and then: protobuf refuses those
    st.floats(allow_nan=False),
    st.text(max_size=8),
    st.sampled_from([np.float32(0.25), np.int64(7), None, b"raw"]),  # as str() makes them
)


@st.composite
def output_tensors(draw: st.DrawFn, index: int) -> Tensor:
    datatype = draw(st.sampled_from(list(NUMPY_DTYPES)))
    shape = tuple(draw(st.lists(st.integers(0, 3), max_size=3)))
    count = int(np.prod(shape)) if shape else 1
    if datatype == "BYTES":
        items = draw(st.lists(st.binary(max_size=5), min_size=count, max_size=count))
        data = np.empty(count, dtype=object)
        data[:] = items
    else:
        dtype = NUMPY_DTYPES[datatype]
        raw = draw(st.binary(min_size=count * dtype.itemsize, max_size=count * dtype.itemsize))
        data = np.frombuffer(raw, dtype)
        if draw(st.booleans()):  # big-endian or strided arrays are cast by both sides
            data = data.astype(dtype.newbyteorder(">"))
    params = draw(st.dictionaries(st.text(max_size=4), RESPONSE_VALUES, max_size=2))
    return Tensor(f"out{index}", datatype, data.reshape(shape), params)


@st.composite
def responses(draw: st.DrawFn) -> InferResponse:
    outputs = [draw(output_tensors(i)) for i in range(draw(st.integers(0, 3)))]
    return InferResponse(
        draw(st.text(max_size=6)),
        draw(st.sampled_from(["", "1", "22"])),
        draw(st.text(max_size=6)),
        outputs,
        draw(st.dictionaries(st.text(max_size=6), RESPONSE_VALUES, max_size=5)),
    )


def twin_response(response: InferResponse) -> bytes | str:
    try:
        return convert.response_to_pb(response).SerializeToString()
    except Exception as err:
        return f"{type(err).__name__}: {err}"


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(responses())
def test_native_encoder_writes_what_the_twin_writes(response: InferResponse):
    assert encode_response is not None, "gateway._oip_c is not built: run `make native`"
    fast = encode_response(response)
    slow = twin_response(response)
    if fast is None:  # declined: only what protobuf refuses too
        assert isinstance(slow, str), "the native encoder declined a response protobuf takes"
        return
    assert isinstance(slow, bytes), slow
    assert pb.ModelInferResponse.FromString(fast) == pb.ModelInferResponse.FromString(slow)


def test_native_encoder_takes_a_gateway_response():
    response = InferResponse(
        "mlp",
        "1",
        "req-7",
        [Tensor("y", "FP32", np.array([[0.5], [1.5]], np.float32))],
        {"queue_us": 12, "cached_rows": 0, "cost": 1.5e-6, "route": "live", "fallback": False},
    )
    fast = encode_response(response)
    assert fast is not None
    assert fast == codec.encode_response(response) or not codec.USING_EXTENSION
    decoded = pb.ModelInferResponse.FromString(fast)
    assert decoded == convert.response_to_pb(response)
    assert decoded.parameters["queue_us"].int64_param == 12
    assert decoded.parameters["fallback"].WhichOneof("parameter_choice") == "bool_param"
    assert np.frombuffer(decoded.raw_output_contents[0], "<f4").tolist() == [0.5, 1.5]
