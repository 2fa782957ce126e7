"""Selects the native assembly kernel (native/_features_c.pyx) or its pure-Python reference.

The same switch as gateway._hotloops: ``GATEWAY_NO_EXTENSIONS=1`` or a missing build picks the
twin; ``USING_EXTENSION`` says which one runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway._hotloops import NO_EXTENSIONS

if TYPE_CHECKING or NO_EXTENSIONS:
    from gateway.features._kernel_py import gather, prepare, run

    USING_EXTENSION = False
else:
    try:
        from gateway._features_c import gather, prepare, run

        USING_EXTENSION = True
    except ImportError:  # pragma: no cover - exercised when the build is absent
        from gateway.features._kernel_py import gather, prepare, run

        USING_EXTENSION = False

__all__ = ["USING_EXTENSION", "gather", "prepare", "run"]
