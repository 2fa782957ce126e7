"""Tensors on the wire, for every front end: OIP raw contents (little-endian; BYTES elements
each length-prefixed, as gRPC's raw_input_contents and HTTP's binary tensor extension carry
them) and the checks every decoded tensor passes, each failure an InvalidRequest naming the
input. No protobuf here: the REST edge shares it without the gRPC messages."""

from __future__ import annotations

import math

import numpy as np

from gateway import _hotloops
from gateway.errors import InvalidRequest
from gateway.types import MAX_DIMS, MAX_EXTENT, NUMPY_DTYPES, WIRE_DTYPES, ParameterValue, Tensor

__all__ = ["checked_dtype", "checked_shape", "raw_contents", "tensor_from_raw"]


def checked_dtype(name: str, datatype: str) -> np.dtype[np.generic]:
    """The numpy dtype of an OIP datatype, or InvalidRequest naming the input."""
    dtype = NUMPY_DTYPES.get(datatype)
    if dtype is None:
        raise InvalidRequest(
            f"input '{name}' has unsupported datatype '{datatype}' "
            f"(supported: {', '.join(NUMPY_DTYPES)})"
        )
    return dtype


def checked_shape(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """``shape`` when an array can hold it, or InvalidRequest naming the input."""
    if any(d < 0 for d in shape):
        raise InvalidRequest(f"input '{name}' has a negative dimension in shape {list(shape)}")
    if len(shape) > MAX_DIMS:
        raise InvalidRequest(f"input '{name}' has {len(shape)} dimensions; at most {MAX_DIMS}")
    if math.prod(d for d in shape if d) > MAX_EXTENT:
        raise InvalidRequest(
            f"input '{name}' has shape {list(shape)}: its dimensions (zeros aside) multiply "
            "past 2^48, more than an array can hold even empty"
        )
    return shape


def tensor_from_raw(
    name: str,
    datatype: str,
    shape: tuple[int, ...],
    raw: bytes | memoryview,
    params: dict[str, ParameterValue] | None = None,
) -> Tensor:
    """A tensor from its OIP raw bytes (little-endian; BYTES each length-prefixed), as gRPC's
    raw_input_contents and HTTP's binary tensor extension carry them; InvalidRequest naming
    the input when they do not fit its datatype and shape. A numeric tensor is a view of
    ``raw`` (a memoryview of a request body included): no copy."""
    dtype = checked_dtype(name, datatype)
    shape = checked_shape(name, shape)
    count = math.prod(shape)
    if datatype == "BYTES":
        raw = bytes(raw)  # kept as sent (events, the cache key read it): its own bytes
        try:  # checked now; the objects are made only if something reads them
            _hotloops.check_bytes(raw, count)
        except ValueError as err:
            raise InvalidRequest(f"input '{name}': {err}") from None
        return Tensor(name, "BYTES", None, params or {}, raw=raw, shape=shape)
    data = _from_raw(name, datatype, dtype, raw, count)
    return Tensor(name, datatype, data.reshape(shape), params or {})


def _from_raw(
    name: str, datatype: str, dtype: np.dtype[np.generic], raw: bytes | memoryview, count: int
) -> np.ndarray:
    expected = count * dtype.itemsize
    if len(raw) != expected:
        raise InvalidRequest(
            f"input '{name}' has {len(raw)} bytes of raw contents but its shape holds {count} "
            f"{datatype} elements ({expected} bytes)"
        )
    # Zero-copy view; ONNX Runtime only reads its inputs.
    return np.frombuffer(raw, dtype=WIRE_DTYPES[datatype])


def raw_contents(tensor: Tensor) -> bytes:
    """A tensor's OIP raw contents (little-endian; BYTES length-prefixed)."""
    if tensor.datatype == "BYTES":
        if tensor.raw is not None:  # as it arrived: already in wire form
            return tensor.raw
        return _hotloops.encode_bytes(tensor.data.reshape(-1).tolist())
    return np.ascontiguousarray(tensor.data, dtype=WIRE_DTYPES[tensor.datatype]).tobytes()
