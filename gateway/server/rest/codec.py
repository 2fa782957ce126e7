"""Stage 1, the HTTP/REST edge's wire format: KServe v2 JSON tensors and Triton's binary
tensor extension <-> the transport-free types the gRPC edge makes (``InferRequest``,
``InferResponse``). orjson parses and writes the JSON.

A request body is a JSON header, then (binary tensor extension) the raw bytes of each input
that says ``parameters.binary_data_size``, in input order; ``Inference-Header-Content-Length``
gives the header's length (absent: the whole body is JSON). Raw bytes are OIP's raw contents,
as gRPC's raw_input_contents: little-endian, BYTES elements each length-prefixed. A response
carries each output as JSON ``data`` (flat, row-major) or, when asked (``binary_data``, or
``binary_data_output`` for outputs not listed), as raw bytes after its header. Every failure
is an InvalidRequest naming the field.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import orjson

from gateway.errors import InvalidRequest
from gateway.server.tensors import checked_dtype, checked_shape, raw_contents, tensor_from_raw
from gateway.types import (
    DEFAULT_OPTIONS,
    MAX_TEXT_CHARS,
    WIRE_DTYPES,
    InferRequest,
    InferResponse,
    ParameterValue,
    RequestOptions,
    Tensor,
)

__all__ = ["HEADER_LENGTH", "OutputChoice", "decode_infer", "encode_infer", "json_object"]

HEADER_LENGTH: Final = "inference-header-content-length"
_BINARY_SIZE: Final = "binary_data_size"
_INT_KINDS: Final = frozenset("iu")


@dataclass(frozen=True)
class OutputChoice:
    """Which outputs travel as raw bytes: those listed with ``binary_data``, the others as
    ``binary_data_output`` says (JSON by default)."""

    default_binary: bool = False
    binary: Mapping[str, bool] = field(default_factory=dict)

    def is_binary(self, name: str) -> bool:
        return self.binary.get(name, self.default_binary)


def decode_infer(
    body: bytes,
    header_length: int | None,
    model: str,
    version: str,
) -> tuple[InferRequest, OutputChoice]:
    """The inference request a POST .../infer body holds, and how its outputs travel back."""
    if header_length is None:
        header, rest = body, memoryview(b"")
    else:
        if not 0 <= header_length <= len(body):
            raise InvalidRequest(
                f"Inference-Header-Content-Length: {header_length}, but the body has "
                f"{len(body)} bytes"
            )
        header, rest = body[:header_length], memoryview(body)[header_length:]
    document = json_object(header, "{inputs: [...], ...}")
    request_id = document.get("id", "")
    if not isinstance(request_id, str) or len(request_id) > MAX_TEXT_CHARS:
        raise InvalidRequest(f"id: a string of at most {MAX_TEXT_CHARS} characters")
    parameters = _parameters(document.get("parameters"), "parameters")
    default_binary = parameters.pop("binary_data_output", False)
    if not isinstance(default_binary, bool):
        raise InvalidRequest("parameters.binary_data_output: true or false")
    items = document.get("inputs")
    if not isinstance(items, list):
        raise InvalidRequest("inputs: a list of tensors {name, datatype, shape, data}")
    inputs: list[Tensor] = []
    offset = 0
    for i, item in enumerate(items):
        tensor, size = _input(item, i, rest[offset:])
        inputs.append(tensor)
        offset += size
    if offset != len(rest):
        raise InvalidRequest(
            f"{len(rest) - offset} bytes after the inputs' binary data: each binary input "
            f"says its size in parameters.{_BINARY_SIZE}"
        )
    requested, binary = _outputs(document.get("outputs"))
    request = InferRequest(
        model_name=model,
        model_version=version,
        id=request_id,
        inputs=inputs,
        requested_outputs=requested,
        options=RequestOptions.parse(parameters) if parameters else DEFAULT_OPTIONS,
        nbytes=len(body),
    )
    return request, OutputChoice(default_binary, binary)


def json_object(body: bytes, shape: str = "") -> dict[str, Any]:
    """A request body that must be one JSON object; InvalidRequest saying what it is not."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as err:
        raise InvalidRequest(f"request body: not JSON: {err}") from None
    if not isinstance(document, dict):
        raise InvalidRequest(f"request body: a JSON object {shape}".rstrip())
    return document


def _input(item: object, i: int, rest: memoryview) -> tuple[Tensor, int]:
    """Input ``i`` and how many of the bytes after the header it took."""
    where = f"inputs[{i}]"
    if not isinstance(item, dict):
        raise InvalidRequest(f"{where}: an object {{name, datatype, shape, data}}")
    name = item.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidRequest(f"{where}.name: a tensor name")
    datatype = item.get("datatype")
    if not isinstance(datatype, str):
        raise InvalidRequest(f"input '{name}': datatype is missing")
    shape = item.get("shape")
    if not isinstance(shape, list) or not all(type(d) is int for d in shape):
        raise InvalidRequest(f"input '{name}': shape must be a list of integers")
    params = _parameters(item.get("parameters"), f"input '{name}' parameters")
    size = params.pop(_BINARY_SIZE, None)
    has_data = "data" in item
    if (size is None) == (not has_data):
        raise InvalidRequest(
            f"input '{name}': give exactly one of data and parameters.{_BINARY_SIZE}"
        )
    if size is None:
        return _from_json(name, datatype, tuple(shape), item["data"], params), 0
    if type(size) is not int or size < 0:
        raise InvalidRequest(f"input '{name}': parameters.{_BINARY_SIZE} must be a size >= 0")
    if size > len(rest):
        raise InvalidRequest(
            f"input '{name}': parameters.{_BINARY_SIZE} is {size} but only {len(rest)} bytes "
            "of binary data are left in the body"
        )
    return tensor_from_raw(name, datatype, tuple(shape), rest[:size], params), size


def _from_json(
    name: str,
    datatype: str,
    shape: tuple[int, ...],
    data: object,
    params: dict[str, ParameterValue],
) -> Tensor:
    """A tensor from JSON ``data``: flat (row-major) or nested, its count the shape's."""
    dtype = checked_dtype(name, datatype)
    shape = checked_shape(name, shape)
    count = math.prod(shape)
    if not isinstance(data, list):
        raise InvalidRequest(f"input '{name}': data must be a list")
    if datatype == "BYTES":
        values = _flat(name, data)
        if not all(isinstance(v, str) for v in values):
            raise InvalidRequest(f"input '{name}': BYTES data must be strings")
        array = np.empty(len(values), dtype=object)
        array[:] = [str(v).encode() for v in values]
    else:
        try:
            array = np.asarray(data)
        except ValueError:  # ragged nesting
            raise InvalidRequest(f"input '{name}': data nests lists of unequal lengths") from None
        array = _numeric(name, datatype, dtype, array.reshape(-1))
    if array.size != count:
        raise InvalidRequest(
            f"input '{name}' has {array.size} values in data but its shape {list(shape)} "
            f"holds {count}"
        )
    return Tensor(name, datatype, array.reshape(shape), params)


def _numeric(
    name: str, datatype: str, dtype: np.dtype[np.generic], values: np.ndarray
) -> np.ndarray:
    kind = values.dtype.kind
    if values.size == 0:
        return values.astype(dtype)
    if datatype == "BOOL":
        if kind != "b":
            raise InvalidRequest(f"input '{name}': BOOL data must be true or false")
        return values
    if kind not in "iuf" or (dtype.kind in _INT_KINDS and kind == "f"):
        wanted = "integers" if dtype.kind in _INT_KINDS else "numbers"
        raise InvalidRequest(f"input '{name}': {datatype} data must be {wanted}")
    if dtype.kind in _INT_KINDS:
        limits = np.iinfo(dtype)  # type: ignore[type-var]
        if values.min() < limits.min or values.max() > limits.max:
            raise InvalidRequest(f"input '{name}' has a value out of range for {datatype}")
    return values.astype(WIRE_DTYPES[datatype])


def _flat(name: str, data: list[Any]) -> list[object]:
    """Nested lists flattened, row-major."""
    out: list[object] = []
    stack: list[Any] = [iter(data)]
    while stack:
        for value in stack[-1]:
            if isinstance(value, list):
                if len(stack) > 64:
                    raise InvalidRequest(f"input '{name}': data nests deeper than 64 levels")
                stack.append(iter(value))
                break
            out.append(value)
        else:
            stack.pop()
    return out


def _parameters(value: object, where: str) -> dict[str, ParameterValue]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidRequest(f"{where}: an object of name: value")
    out: dict[str, ParameterValue] = {}
    for key, item in value.items():
        if not isinstance(item, bool | int | float | str):
            raise InvalidRequest(f"{where}.{key}: a string, number or boolean")
        out[key] = item
    return out


def _outputs(value: object) -> tuple[list[str], dict[str, bool]]:
    """The outputs asked for (none: all) and which of them travel as raw bytes."""
    if value is None:
        return [], {}
    if not isinstance(value, list):
        raise InvalidRequest("outputs: a list of {name, parameters}")
    names: list[str] = []
    binary: dict[str, bool] = {}
    for i, item in enumerate(value):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise InvalidRequest(f"outputs[{i}]: an object with a name")
        name = item["name"]
        names.append(name)
        params = _parameters(item.get("parameters"), f"output '{name}' parameters")
        wants = params.get("binary_data")
        if wants is not None:
            if not isinstance(wants, bool):
                raise InvalidRequest(f"output '{name}' parameters.binary_data: true or false")
            binary[name] = wants
    return names, binary


def encode_infer(response: InferResponse, choice: OutputChoice) -> tuple[bytes, int | None]:
    """The response body, and the length of its JSON header when raw outputs follow it
    (None: the body is JSON alone)."""
    outputs: list[dict[str, object]] = []
    raws: list[bytes] = []
    for tensor in response.outputs:
        entry: dict[str, object] = {
            "name": tensor.name,
            "datatype": tensor.datatype,
            "shape": list(tensor.shape),
        }
        if choice.is_binary(tensor.name):
            raw = raw_contents(tensor)
            entry["parameters"] = {_BINARY_SIZE: len(raw)}
            raws.append(raw)
        else:
            # NOTE: no "parameters" on an output sent as JSON: Triton's C++ client (and
            # perf_analyzer) takes any output parameters for a binary one.
            entry["data"] = _json_values(tensor)
        outputs.append(entry)
    document: dict[str, object] = {
        "model_name": response.model_name,
        "model_version": response.model_version,
        "outputs": outputs,
    }
    if response.id:
        document["id"] = response.id
    if response.parameters:
        document["parameters"] = response.parameters
    header = orjson.dumps(document, option=orjson.OPT_SERIALIZE_NUMPY)
    if not raws:
        return header, None
    return b"".join((header, *raws)), len(header)


def _json_values(tensor: Tensor) -> object:
    flat = tensor.data.reshape(-1)
    if tensor.datatype == "BYTES":
        return [
            v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in flat.tolist()
        ]
    if tensor.datatype == "FP16":
        return flat.astype(np.float32)
    return np.ascontiguousarray(flat)
