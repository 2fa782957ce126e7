"""Which native modules are in use: each selector's ``USING_EXTENSION``, by native module.

Logged at start-up and exported as the ``gateway_native_extension`` gauge (label ``module``),
so a gateway quietly running a pure-Python twin (``GATEWAY_NO_EXTENSIONS=1``, or a build
missing) shows on its dashboard.
"""

from __future__ import annotations

from gateway import _hotloops
from gateway.events import _encoder
from gateway.features import kernel
from gateway.server import codec

__all__ = ["native_modules"]


def native_modules() -> dict[str, bool]:
    """Per native module (native/<name>.pyx builds gateway.<name>): True when it runs, False
    when its pure-Python twin does."""
    return {
        "gateway._hotloops_c": _hotloops.USING_EXTENSION,
        "gateway._features_c": kernel.USING_EXTENSION,
        "gateway._events_c": _encoder.USING_EXTENSION,
        "gateway._oip_c": codec.USING_EXTENSION,
    }
