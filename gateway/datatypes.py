"""OIP tensor datatypes and their numpy, ONNX and Triton model-config counterparts."""

from __future__ import annotations

from typing import Final

import numpy as np

# OIP datatype -> numpy dtype. BYTES elements are Python ``bytes`` in an object array.
NUMPY_DTYPES: Final[dict[str, np.dtype[np.generic]]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(np.object_),
}

# ONNX TensorProto element type -> OIP datatype (only the types OIP can carry).
ONNX_TO_OIP: Final[dict[int, str]] = {
    9: "BOOL",
    2: "UINT8",
    4: "UINT16",
    12: "UINT32",
    13: "UINT64",
    3: "INT8",
    5: "INT16",
    6: "INT32",
    7: "INT64",
    10: "FP16",
    1: "FP32",
    11: "FP64",
    8: "BYTES",
}

# OIP datatype -> Triton model-config DataType enum name.
TRITON_CONFIG_TYPES: Final[dict[str, str]] = {
    "BOOL": "TYPE_BOOL",
    "UINT8": "TYPE_UINT8",
    "UINT16": "TYPE_UINT16",
    "UINT32": "TYPE_UINT32",
    "UINT64": "TYPE_UINT64",
    "INT8": "TYPE_INT8",
    "INT16": "TYPE_INT16",
    "INT32": "TYPE_INT32",
    "INT64": "TYPE_INT64",
    "FP16": "TYPE_FP16",
    "FP32": "TYPE_FP32",
    "FP64": "TYPE_FP64",
    "BYTES": "TYPE_STRING",
}


def oip_datatype(dtype: np.dtype[np.generic]) -> str:
    """The OIP datatype of a numpy dtype; strings and objects are BYTES."""
    if dtype.kind in ("O", "S", "U"):
        return "BYTES"
    for name, candidate in NUMPY_DTYPES.items():
        if candidate == dtype:
            return name
    raise ValueError(f"numpy dtype {dtype} has no OIP datatype")
