"""Selects the native hot loops (native/_hotloops_c.pyx) or their pure-Python reference.

``GATEWAY_NO_EXTENSIONS=1`` or a missing build picks the Python twin; ``USING_EXTENSION`` says
which one runs and is logged at start-up.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

NO_EXTENSIONS: bool = bool(os.environ.get("GATEWAY_NO_EXTENSIONS"))

if TYPE_CHECKING or NO_EXTENSIONS:
    from gateway._hotloops_py import check_bytes, decode_bytes, encode_bytes

    USING_EXTENSION = False
else:
    try:
        from gateway._hotloops_c import check_bytes, decode_bytes, encode_bytes

        USING_EXTENSION = True
    except ImportError:  # pragma: no cover - exercised when the build is absent
        from gateway._hotloops_py import check_bytes, decode_bytes, encode_bytes

        USING_EXTENSION = False

__all__ = ["USING_EXTENSION", "check_bytes", "decode_bytes", "encode_bytes"]
