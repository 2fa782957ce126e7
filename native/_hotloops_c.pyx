# cython: language_level=3
"""Hot loops, native twin of gateway/_hotloops_py.py (identical behaviour, tested for parity)."""

from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING
from libc.string cimport memcpy
from libc.stdint cimport uint32_t


cdef inline uint32_t _read_u32le(const unsigned char* p) noexcept nogil:
    return (<uint32_t>p[0]) | (<uint32_t>p[1] << 8) | (<uint32_t>p[2] << 16) | (<uint32_t>p[3] << 24)


def decode_bytes(const unsigned char[::1] buf, Py_ssize_t count):
    """Split a raw BYTES buffer into exactly ``count`` elements (see the Python reference)."""
    items = []
    _walk(buf, count, items)
    return items


def check_bytes(const unsigned char[::1] buf, Py_ssize_t count):
    """What decode_bytes checks, with its errors, without making an object per element."""
    _walk(buf, count, None)


cdef _walk(const unsigned char[::1] buf, Py_ssize_t count, list items):
    if count < 0:
        raise ValueError(f"element count must be >= 0, got {count}")
    cdef Py_ssize_t size = buf.shape[0]
    cdef Py_ssize_t offset = 0
    cdef Py_ssize_t index
    cdef Py_ssize_t length
    cdef const unsigned char* base = &buf[0] if size > 0 else NULL
    for index in range(count):
        if offset + 4 > size:
            raise ValueError(
                f"BYTES buffer ends before element {index} of {count} (at byte {offset} of {size})"
            )
        length = _read_u32le(base + offset)
        offset += 4
        if offset + length > size:
            raise ValueError(
                f"BYTES element {index} declares {length} bytes but only "
                f"{size - offset} remain"
            )
        if items is not None:
            items.append(PyBytes_FromStringAndSize(<const char*>(base + offset), length))
        offset += length
    if offset != size:
        raise ValueError(f"BYTES buffer holds {size - offset} bytes after its {count} elements")


def encode_bytes(items):
    """Join elements into a raw BYTES buffer (length-prefixed, little-endian)."""
    cdef Py_ssize_t total = 0
    cdef Py_ssize_t n
    cdef bytes item
    cdef list seq = list(items)
    for obj in seq:
        total += 4 + len(<bytes?>obj)
    out = PyBytes_FromStringAndSize(NULL, total)
    cdef char* dst = PyBytes_AS_STRING(out)
    cdef Py_ssize_t offset = 0
    for obj in seq:
        item = <bytes>obj
        n = len(item)
        if n > 0xFFFFFFFF:
            raise ValueError(f"BYTES element of {n} bytes exceeds the 4-byte length prefix")
        dst[offset] = n & 0xFF
        dst[offset + 1] = (n >> 8) & 0xFF
        dst[offset + 2] = (n >> 16) & 0xFF
        dst[offset + 3] = (n >> 24) & 0xFF
        offset += 4
        if n:
            memcpy(dst + offset, PyBytes_AS_STRING(item), n)
        offset += n
    return out
