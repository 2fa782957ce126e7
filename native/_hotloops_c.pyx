# cython: language_level=3
"""Hot loops, native twin of gateway/_hotloops_py.py (identical behaviour, tested for parity).

The OIP BYTES format is read and written by native/_wire.pxd's helpers, shared with the
feature kernel.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.stdint cimport uint32_t
from libc.string cimport memcpy

from _wire cimport LENGTH_BYTES, store_u32le, walk_bytes


def decode_bytes(const unsigned char[::1] buf, Py_ssize_t count):
    """Split a raw BYTES buffer into exactly ``count`` elements (see the Python reference)."""
    items = []
    _walk(buf, count, items)
    return items


def check_bytes(const unsigned char[::1] buf, Py_ssize_t count):
    """What decode_bytes checks, with its errors, without making an object per element."""
    _walk(buf, count, None)


cdef int _walk(const unsigned char[::1] buf, Py_ssize_t count, list items) except -1:
    cdef Py_ssize_t size = buf.shape[0]
    return walk_bytes(&buf[0] if size > 0 else NULL, size, count, items)


def encode_bytes(items):
    """Join elements into a raw BYTES buffer (length-prefixed, little-endian)."""
    cdef Py_ssize_t total = 0
    cdef Py_ssize_t n
    cdef bytes item
    cdef list seq = list(items)
    for obj in seq:
        total += LENGTH_BYTES + len(<bytes?>obj)
    out = PyBytes_FromStringAndSize(NULL, total)
    cdef unsigned char* dst = <unsigned char*>PyBytes_AS_STRING(out)
    cdef Py_ssize_t offset = 0
    for obj in seq:
        item = <bytes>obj
        n = len(item)
        if n > 0xFFFFFFFF:
            raise ValueError(f"BYTES element of {n} bytes exceeds the 4-byte length prefix")
        store_u32le(dst + offset, <uint32_t>n)
        offset += LENGTH_BYTES
        if n:
            memcpy(dst + offset, PyBytes_AS_STRING(item), n)
        offset += n
    return out
