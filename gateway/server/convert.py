"""Stage 1, the gRPC edge: OIP protobuf messages <-> transport-free types. pb stays here.

Both directions of both messages: requests in and responses out at the front, requests out
and responses in for remote variants (``encode_remote_request``, ``decode_remote_response``:
the bytes the routing stage's channels carry).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Final

import numpy as np
from google.protobuf.message import DecodeError  # type: ignore[import-untyped]

from gateway.api.v1 import inference_pb2 as pb
from gateway.errors import InvalidRequest
from gateway.server.tensors import checked_dtype, checked_shape, raw_contents, tensor_from_raw
from gateway.types import (
    DEFAULT_OPTIONS,
    MAX_TEXT_CHARS,
    InferRequest,
    InferResponse,
    ParameterValue,
    RequestOptions,
    Tensor,
)

__all__ = [
    "decode_remote_response",
    "encode_remote_request",
    "parameters_from_pb",
    "parameters_to_pb",
    "request_from_pb",
    "request_to_pb",
    "response_from_pb",
    "response_to_pb",
]

# The typed-contents field of each datatype. FP16 has none in the protocol; like MLServer we
# accept it in fp32_contents (raw contents remain the exact form).
_CONTENTS_FIELD: Final[dict[str, str]] = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP16": "fp32_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


# A request id is echoed in the response and kept in its prediction event: bounded.
MAX_ID_CHARS: Final = MAX_TEXT_CHARS


def parameters_from_pb(params: Mapping[str, pb.InferParameter]) -> dict[str, ParameterValue]:
    out: dict[str, ParameterValue] = {}
    for key, param in params.items():
        which = param.WhichOneof("parameter_choice")
        if which is not None:
            out[key] = getattr(param, which)
    return out


def parameters_to_pb(
    params: Mapping[str, ParameterValue], target: Mapping[str, pb.InferParameter]
) -> None:
    for key, value in params.items():
        slot = target[key]
        if type(value) is int:  # the common case first (timings, counts)
            slot.int64_param = value
        elif isinstance(value, bool):
            slot.bool_param = value
        elif isinstance(value, int):
            slot.int64_param = value
        elif isinstance(value, float):
            slot.double_param = value
        else:
            slot.string_param = str(value)


def _input_sizes(request: pb.ModelInferRequest) -> dict[str, int]:
    sizes = {t.name: t.contents.ByteSize() for t in request.inputs}
    for tensor, raw in zip(request.inputs, request.raw_input_contents, strict=False):
        sizes[tensor.name] += len(raw)
    return sizes


def request_from_pb(
    request: pb.ModelInferRequest, max_message_bytes: int, timeout_s: float | None = None
) -> InferRequest:
    """Decode a ModelInferRequest; every failure is an InvalidRequest naming the input or the
    parameter. ``timeout_s``: what the call's deadline leaves, at arrival."""
    raw = request.raw_input_contents
    # NOTE: raw payloads are sized for free; typed contents only when present.
    size = sum(len(r) for r in raw) if raw else request.ByteSize()
    if size > max_message_bytes:
        sizes = _input_sizes(request)
        largest = max(sizes, key=sizes.__getitem__, default="")
        raise InvalidRequest(
            f"request carries {size} bytes of tensor data, over server.max_message_bytes "
            f"{max_message_bytes} (largest input: '{largest}')"
        )
    if raw and len(raw) != len(request.inputs):
        raise InvalidRequest(
            f"raw_input_contents has {len(raw)} entries but the request has "
            f"{len(request.inputs)} inputs; send raw contents for every input or for none"
        )
    if raw:
        inputs = [_tensor_from_pb(t, r) for t, r in zip(request.inputs, raw, strict=True)]
    else:
        inputs = [_tensor_from_pb(t, None) for t in request.inputs]
    if len(request.id) > MAX_ID_CHARS:
        raise InvalidRequest(
            f"request id has {len(request.id)} characters; at most {MAX_ID_CHARS} are kept"
        )
    options = (
        RequestOptions.parse(parameters_from_pb(request.parameters))
        if request.parameters
        else DEFAULT_OPTIONS
    )
    return InferRequest(
        model_name=request.model_name,
        model_version=request.model_version,
        id=request.id,
        inputs=inputs,
        requested_outputs=[out.name for out in request.outputs] if request.outputs else [],
        options=options,
        timeout_s=timeout_s,
        nbytes=size if raw else 0,  # typed contents: counted from the tensors
    )


_PbTensor = pb.ModelInferRequest.InferInputTensor | pb.ModelInferResponse.InferOutputTensor


def _tensor_from_pb(tensor: _PbTensor, raw: bytes | None) -> Tensor:
    name = tensor.name
    params = parameters_from_pb(tensor.parameters) if tensor.parameters else {}
    if raw is not None:
        if tensor.HasField("contents"):
            raise InvalidRequest(f"input '{name}' has both contents and raw_input_contents")
        return tensor_from_raw(name, tensor.datatype, tuple(tensor.shape), raw, params)
    dtype = checked_dtype(name, tensor.datatype)
    shape = checked_shape(name, tuple(tensor.shape))
    data = _from_contents(name, tensor, dtype, math.prod(shape))
    return Tensor(name, tensor.datatype, data.reshape(shape), params)


def _from_contents(
    name: str,
    tensor: _PbTensor,
    dtype: np.dtype[np.generic],
    count: int,
) -> np.ndarray:
    field = _CONTENTS_FIELD[tensor.datatype]
    values = getattr(tensor.contents, field)
    if len(values) != count:
        raise InvalidRequest(
            f"input '{name}' has {len(values)} values in contents.{field} but its shape holds "
            f"{count} elements"
        )
    if tensor.datatype == "BYTES":
        data = np.empty(count, dtype=object)
        data[:] = list(values)
        return data
    try:
        return np.array(values, dtype=dtype)
    except OverflowError:
        raise InvalidRequest(
            f"input '{name}' has a value out of range for {tensor.datatype}"
        ) from None


def response_to_pb(response: InferResponse) -> pb.ModelInferResponse:
    """Outputs always travel as raw_output_contents, as Triton sends them."""
    message = pb.ModelInferResponse(
        model_name=response.model_name, model_version=response.model_version, id=response.id
    )
    parameters_to_pb(response.parameters, message.parameters)
    for tensor in response.outputs:
        out = message.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
        parameters_to_pb(tensor.parameters, out.parameters)
        message.raw_output_contents.append(raw_contents(tensor))
    return message


def request_to_pb(request: InferRequest) -> pb.ModelInferRequest:
    """A ModelInferRequest for another OIP server: inputs as raw contents, no parameters (the
    gateway's options are its own; the deadline travels as the call's)."""
    message = pb.ModelInferRequest(
        model_name=request.model_name, model_version=request.model_version, id=request.id
    )
    for tensor in request.inputs:
        message.inputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
        message.raw_input_contents.append(raw_contents(tensor))
    for name in request.requested_outputs:
        message.outputs.add(name=name)
    return message


def response_from_pb(message: pb.ModelInferResponse) -> InferResponse:
    """A ModelInferResponse from another OIP server; outputs in raw or typed contents.
    InvalidRequest naming the output when one does not parse."""
    raw = message.raw_output_contents
    if raw and len(raw) != len(message.outputs):
        raise InvalidRequest(
            f"raw_output_contents has {len(raw)} entries for {len(message.outputs)} outputs"
        )
    try:
        outputs = [
            _tensor_from_pb(tensor, raw[i] if raw else None)
            for i, tensor in enumerate(message.outputs)
        ]
    except InvalidRequest as err:  # the checks of inputs, said of an output
        raise InvalidRequest(str(err).replace("input '", "output '", 1)) from None
    return InferResponse(
        model_name=message.model_name,
        model_version=message.model_version,
        id=message.id,
        outputs=outputs,
        parameters=parameters_from_pb(message.parameters),
    )


def encode_remote_request(request: InferRequest) -> bytes:
    data: bytes = request_to_pb(request).SerializeToString()
    return data


def decode_remote_response(data: bytes) -> InferResponse:
    """InvalidRequest when the bytes are no ModelInferResponse, or one that does not parse."""
    try:
        message = pb.ModelInferResponse.FromString(data)
    except DecodeError as err:
        raise InvalidRequest(f"not a ModelInferResponse: {err}") from None
    return response_from_pb(message)
