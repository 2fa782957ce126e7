"""Selects the native event encoder (native/_events_c.pyx) or its protobuf-built reference.

The same switch as gateway._hotloops: ``GATEWAY_NO_EXTENSIONS=1`` or a missing build picks
``builder.encode_event_py``; ``USING_EXTENSION`` says which one runs. The writer encodes every
prediction: natively, the same event is written straight to the wire format, 2-3x faster.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway._hotloops import NO_EXTENSIONS

if TYPE_CHECKING or NO_EXTENSIONS:
    from gateway.events.builder import encode_event_py as encode_event

    USING_EXTENSION = False
else:
    try:
        from gateway._events_c import encode_event

        USING_EXTENSION = True
    except ImportError:  # pragma: no cover - exercised when the build is absent
        from gateway.events.builder import encode_event_py as encode_event

        USING_EXTENSION = False

__all__ = ["USING_EXTENSION", "encode_event"]
