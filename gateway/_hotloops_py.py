"""Hot loops, pure-Python reference: the specification the native twin in native/ must match.

OIP BYTES tensors travel in ``raw_input_contents`` as a sequence of elements, each a 4-byte
little-endian unsigned length followed by that many bytes. Decoding and encoding them is on
the request path of every string input and output.
"""

from __future__ import annotations

from collections.abc import Sequence

_LENGTH_BYTES = 4


def decode_bytes(buf: bytes, count: int) -> list[bytes]:
    """Split a raw BYTES buffer into exactly ``count`` elements.

    Raises ValueError naming the element at fault when the buffer is truncated, holds fewer or
    more elements than ``count``, or has bytes left over.
    """
    items: list[bytes] = []
    _walk(buf, count, items)
    return items


def check_bytes(buf: bytes, count: int) -> None:
    """What decode_bytes checks, with its errors, without making an object per element."""
    _walk(buf, count, None)


def _walk(buf: bytes, count: int, items: list[bytes] | None) -> None:
    if count < 0:
        raise ValueError(f"element count must be >= 0, got {count}")
    view = memoryview(buf)
    size = len(view)
    offset = 0
    for index in range(count):
        if offset + _LENGTH_BYTES > size:
            raise ValueError(
                f"BYTES buffer ends before element {index} of {count} (at byte {offset} of {size})"
            )
        length = int.from_bytes(view[offset : offset + _LENGTH_BYTES], "little")
        offset += _LENGTH_BYTES
        if offset + length > size:
            raise ValueError(
                f"BYTES element {index} declares {length} bytes but only {size - offset} remain"
            )
        if items is not None:
            items.append(bytes(view[offset : offset + length]))
        offset += length
    if offset != size:
        raise ValueError(f"BYTES buffer holds {size - offset} bytes after its {count} elements")


def encode_bytes(items: Sequence[bytes]) -> bytes:
    """Join elements into a raw BYTES buffer (length-prefixed, little-endian)."""
    parts: list[bytes] = []
    for item in items:
        parts.append(len(item).to_bytes(_LENGTH_BYTES, "little"))
        parts.append(item)
    return b"".join(parts)
