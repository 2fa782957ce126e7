"""Protobuf wire pieces written by hand, where building a message object would cost more than
the bytes (the event publisher's batches, a stream's answer around response bytes)."""

from __future__ import annotations

__all__ = ["varint"]


def varint(value: int) -> bytes:
    """``value`` (>= 0) as a protobuf base-128 varint: a field key or a length prefix."""
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)
