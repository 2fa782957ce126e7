"""ModelInferRequest bytes to an InferRequest: the native decoder (native/_oip_c.pyx) where it
takes the request, the protobuf path (``convert.request_from_pb``) otherwise and for every
error. ``GATEWAY_NO_EXTENSIONS=1`` or a missing build leaves everything to protobuf;
``USING_EXTENSION`` says which runs.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from gateway.types import InferRequest

__all__ = ["USING_EXTENSION", "decode_fast"]

DecodeFast = Callable[[bytes, int, float | None], InferRequest | None]


def _protobuf_only(data: bytes, max_message_bytes: int, timeout_s: float | None) -> None:
    """The twin's side: every request goes the protobuf way."""
    return None


decode_fast: DecodeFast
if TYPE_CHECKING or os.environ.get("GATEWAY_NO_EXTENSIONS"):
    decode_fast = _protobuf_only
    USING_EXTENSION = False
else:
    try:
        from gateway._oip_c import decode_request as decode_fast

        USING_EXTENSION = True
    except ImportError:  # pragma: no cover - exercised when the build is absent
        decode_fast = _protobuf_only
        USING_EXTENSION = False
