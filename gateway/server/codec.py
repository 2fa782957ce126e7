"""ModelInferRequest bytes to an InferRequest and an InferResponse to ModelInferResponse bytes:
the native codec (native/_oip_c.pyx) where it takes the message, the protobuf path
(``convert.request_from_pb``, ``convert.response_to_pb``) otherwise and for every error.
``GATEWAY_NO_EXTENSIONS=1`` or a missing build leaves everything to protobuf;
``USING_EXTENSION`` says which runs.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from google.protobuf.message import DecodeError  # type: ignore[import-untyped]

from gateway.errors import InvalidRequest
from gateway.types import InferRequest, InferResponse

__all__ = ["USING_EXTENSION", "BadMessages", "decode_fast", "encode_response"]

log = logging.getLogger(__name__)

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


class BadMessages:
    """Messages that did not parse: counted, and logged at most once per ``interval_s`` with
    the count and the last one's error (a client sending garbage must not flood the log)."""

    def __init__(
        self, interval_s: float = 60.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._interval_s = interval_s
        self._clock = clock
        self._due = -math.inf
        self.count = 0  # since the last log line
        self.total = 0

    def note(self, rpc: str, message: str, err: DecodeError) -> InvalidRequest:
        """Count one; the InvalidRequest to answer it with."""
        self.count += 1
        self.total += 1
        invalid = InvalidRequest(f"request: not a valid {message} message ({err})")
        now = self._clock()
        if now >= self._due:
            log.warning(
                "undecodable request messages: %d since the last report (one at most every "
                "%.0f s), the last on %s: %s",
                self.count,
                self._interval_s,
                rpc,
                invalid,
            )
            self.count = 0
            self._due = now + self._interval_s
        return invalid
