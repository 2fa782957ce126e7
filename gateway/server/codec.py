"""ModelInferRequest bytes to an InferRequest and an InferResponse to ModelInferResponse bytes:
the native codec (native/_oip_c.pyx) where it takes the message, the protobuf path
(``convert.request_from_pb``, ``convert.response_to_pb``) otherwise and for every error.
``GATEWAY_NO_EXTENSIONS=1`` or a missing build leaves everything to protobuf;
``USING_EXTENSION`` says which runs.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from gateway.types import InferRequest, InferResponse

__all__ = ["USING_EXTENSION", "decode_fast", "encode_response"]

DecodeFast = Callable[[bytes, int, float | None], InferRequest | None]
EncodeFast = Callable[[InferResponse], bytes | None]


def _protobuf_only(data: bytes, max_message_bytes: int, timeout_s: float | None) -> None:
    """The twin's side: every request goes the protobuf way."""
    return None


def _protobuf_encodes(response: InferResponse) -> None:
    return None


decode_fast: DecodeFast
_encode_fast: EncodeFast
if TYPE_CHECKING or os.environ.get("GATEWAY_NO_EXTENSIONS"):
    decode_fast, _encode_fast = _protobuf_only, _protobuf_encodes
    USING_EXTENSION = False
else:
    try:
        from gateway._oip_c import decode_request as decode_fast
        from gateway._oip_c import encode_response as _encode_fast

        USING_EXTENSION = True
    except ImportError:  # pragma: no cover - exercised when the build is absent
        decode_fast, _encode_fast = _protobuf_only, _protobuf_encodes
        USING_EXTENSION = False


def encode_response(response: InferResponse) -> bytes:
    """The response's ModelInferResponse bytes (outputs as raw contents, as Triton sends)."""
    data = _encode_fast(response)
    if data is None:
        # NOTE: imported here, not at the top: this module is imported where the gateway's
        # protobuf messages must not be (gateway._extensions, in a process with tritonclient).
        from gateway.server import convert

        encoded: bytes = convert.response_to_pb(response).SerializeToString()
        return encoded
    return data
