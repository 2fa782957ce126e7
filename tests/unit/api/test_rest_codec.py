"""The REST edge's wire format on its own: JSON tensors flat or nested and of every kind,
Triton's binary tensors (BYTES length-prefixed as gRPC's raw contents), which outputs travel
as bytes, and every malformed request refused naming its field."""

from __future__ import annotations

import json
import struct

import numpy as np
import orjson
import pytest

from gateway.errors import InvalidRequest
from gateway.server.rest.codec import OutputChoice, decode_infer, encode_infer
from gateway.types import InferResponse, Tensor


def body(*inputs: dict, **extra: object) -> bytes:
    return json.dumps({"inputs": list(inputs), **extra}).encode()


def decode(data: bytes, header_length: int | None = None):
    return decode_infer(data, header_length, "m", "")


def test_json_tensors_flat_or_nested_of_every_kind():
    request, choice = decode(
        body(
            {"name": "f", "datatype": "FP32", "shape": [2, 2], "data": [[1, 2.5], [3, 4]]},
            {"name": "i", "datatype": "INT64", "shape": [3], "data": [1, -2, 3]},
            {"name": "b", "datatype": "BOOL", "shape": [2], "data": [True, False]},
            {"name": "s", "datatype": "BYTES", "shape": [2, 1], "data": [["x"], ["é"]]},
            id="r1",
            parameters={"tenant": "acme"},
        )
    )
    f, i, b, s = request.inputs
    assert f.data.dtype == np.float32 and f.data.tolist() == [[1, 2.5], [3, 4]]
    assert i.data.dtype == np.int64 and i.data.tolist() == [1, -2, 3]
    assert b.data.dtype == np.bool_ and b.data.tolist() == [True, False]
    assert s.data.shape == (2, 1) and s.data.reshape(-1).tolist() == [b"x", "é".encode()]
    assert request.id == "r1" and request.options.tenant == "acme"
    assert choice == OutputChoice()


def test_binary_tensors_follow_the_header_in_input_order():
    floats = np.arange(4, dtype=np.float32)
    words = b"".join(struct.pack("<I", len(w)) + w for w in (b"ab", b""))
    header = body(
        {"name": "f", "datatype": "FP32", "shape": [4], "parameters": {"binary_data_size": 16}},
        {"name": "j", "datatype": "INT32", "shape": [1], "data": [7]},
        {"name": "s", "datatype": "BYTES", "shape": [2], "parameters": {"binary_data_size": 10}},
        outputs=[{"name": "y", "parameters": {"binary_data": True}}, {"name": "z"}],
        parameters={"binary_data_output": False},
    )
    request, choice = decode(header + floats.tobytes() + words, len(header))
    f, j, s = request.inputs
    assert f.data.tolist() == [0, 1, 2, 3] and j.data.tolist() == [7]
    assert s.data.tolist() == [b"ab", b""]
    assert request.requested_outputs == ["y", "z"]
    assert choice.is_binary("y") and not choice.is_binary("z")


@pytest.mark.parametrize(
    ("data", "header_length", "message"),
    [
        (b"[1]", None, "a JSON object"),
        (b"{", None, "not JSON"),
        (b'{"id": "x"}', None, "inputs: a list"),
        (body({"datatype": "FP32", "shape": [1], "data": [1]}), None, r"inputs\[0\]\.name"),
        (body({"name": "x", "datatype": "FP99", "shape": [1], "data": [1]}), None, "'FP99'"),
        (body({"name": "x", "datatype": "FP32", "shape": [1, "a"], "data": [1]}), None, "shape"),
        (body({"name": "x", "datatype": "FP32", "shape": [2], "data": [1]}), None, "1 values"),
        (body({"name": "x", "datatype": "FP32", "shape": [1]}), None, "exactly one of data"),
        (body({"name": "x", "datatype": "INT8", "shape": [1], "data": [300]}), None, "range"),
        (body({"name": "x", "datatype": "INT32", "shape": [1], "data": [1.5]}), None, "integers"),
        (body({"name": "x", "datatype": "BOOL", "shape": [1], "data": [1]}), None, "true or"),
        (body({"name": "x", "datatype": "BYTES", "shape": [1], "data": [3]}), None, "strings"),
        (
            body({"name": "x", "datatype": "FP32", "shape": [2], "data": [[1], [2, 3]]}),
            None,
            "unequal",
        ),
        (body({"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}), 999, "999"),
    ],
)
def test_malformed_requests_name_what_is_wrong(data: bytes, header_length, message: str):
    with pytest.raises(InvalidRequest, match=message):
        decode(data, header_length)


def test_binary_sizes_must_add_up_to_the_body():
    header = body(
        {"name": "x", "datatype": "FP32", "shape": [2], "parameters": {"binary_data_size": 8}}
    )
    with pytest.raises(InvalidRequest, match="only 4 bytes"):
        decode(header + b"\0" * 4, len(header))
    with pytest.raises(InvalidRequest, match="4 bytes after the inputs"):
        decode(header + b"\0" * 12, len(header))
    with pytest.raises(InvalidRequest, match="input 'x' has 4 bytes of raw contents"):
        shorter = body(
            {"name": "x", "datatype": "FP32", "shape": [2], "parameters": {"binary_data_size": 4}}
        )
        decode(shorter + b"\0" * 4, len(shorter))


def test_outputs_as_json_without_parameters_or_as_bytes_after_the_header():
    response = InferResponse(
        "m",
        "2",
        "r1",
        [
            Tensor("p", "FP32", np.array([[0.25], [0.5]], np.float32)),
            Tensor("s", "BYTES", np.array([b"a", b"bc"], dtype=object)),
        ],
        {"cost": 0.5},
    )
    data, length = encode_infer(response, OutputChoice())
    assert length is None
    document = orjson.loads(data)
    assert document["id"] == "r1" and document["parameters"] == {"cost": 0.5}
    assert document["outputs"][0] == {
        "name": "p",
        "datatype": "FP32",
        "shape": [2, 1],
        "data": [0.25, 0.5],
    }
    assert document["outputs"][1]["data"] == ["a", "bc"]
    data, length = encode_infer(response, OutputChoice(default_binary=True))
    assert length is not None
    header = orjson.loads(data[:length])
    sizes = [o["parameters"]["binary_data_size"] for o in header["outputs"]]
    assert sizes == [8, 4 + 1 + 4 + 2] and len(data) == length + sum(sizes)
    assert np.frombuffer(data[length : length + 8], np.float32).tolist() == [0.25, 0.5]
