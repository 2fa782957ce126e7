# cython: language_level=3
"""Wire helpers shared by the native modules, each written once (``from _wire cimport ...``).

Everything here is inline: a header, compiled into each module that cimports it (there is no
``_wire`` module). setup.py lists this file in every extension's ``depends``, so changing it
rebuilds them all.

* OIP BYTES (raw_input_contents / raw_output_contents): each element is a 4-byte little-endian
  unsigned length, then that many bytes. ``walk_bytes`` checks a buffer holds exactly
  ``count`` elements, raising the errors of gateway/_hotloops_py.py (the reference);
  ``next_element`` reads one element of a checked buffer.
* Protobuf: base-128 varints and little-endian 64-bit values, and ``Out``, a growing buffer
  that encoders write messages into (``out_close_message`` puts a nested message's length in
  front of it once its body is written).
"""

from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.stdint cimport uint32_t, uint64_t
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from libc.string cimport memcpy, memmove

cdef enum:
    LENGTH_BYTES = 4  # an OIP BYTES element's length prefix
    MAX_VARINT_BYTES = 10  # a 64-bit value as a protobuf varint


cdef inline uint32_t load_u32le(const unsigned char* p) noexcept nogil:
    """An OIP BYTES length prefix (4 bytes, little-endian, whatever the host)."""
    return (<uint32_t>p[0]) | (<uint32_t>p[1] << 8) | (<uint32_t>p[2] << 16) | (<uint32_t>p[3] << 24)


cdef inline void store_u32le(unsigned char* p, uint32_t value) noexcept nogil:
    """Write an OIP BYTES length prefix."""
    p[0] = value & 0xFF
    p[1] = (value >> 8) & 0xFF
    p[2] = (value >> 16) & 0xFF
    p[3] = (value >> 24) & 0xFF


cdef inline Py_ssize_t next_element(
    const unsigned char* base, Py_ssize_t* offset, const unsigned char** value
) noexcept nogil:
    """The element at ``offset[0]`` of a buffer walk_bytes has checked: its length, with
    ``value[0]`` at its bytes; ``offset[0]`` moves to the next element."""
    cdef Py_ssize_t length = load_u32le(base + offset[0])
    value[0] = base + offset[0] + LENGTH_BYTES
    offset[0] += LENGTH_BYTES + length
    return length


cdef inline int walk_bytes(
    const unsigned char* base, Py_ssize_t size, Py_ssize_t count, list items
) except -1:
    """Check that ``base[:size]`` holds exactly ``count`` elements, appending each (as bytes)
    to ``items`` unless it is None; ValueError, naming the element at fault, otherwise."""
    if count < 0:
        raise ValueError(f"element count must be >= 0, got {count}")
    cdef Py_ssize_t offset = 0
    cdef Py_ssize_t index
    cdef Py_ssize_t length
    for index in range(count):
        if offset + LENGTH_BYTES > size:
            raise ValueError(
                f"BYTES buffer ends before element {index} of {count} (at byte {offset} of {size})"
            )
        length = load_u32le(base + offset)
        offset += LENGTH_BYTES
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
    return 0


cdef inline Py_ssize_t store_varint(unsigned char* p, uint64_t value) noexcept nogil:
    """Write ``value`` as a protobuf varint (room for MAX_VARINT_BYTES); its length."""
    cdef Py_ssize_t n = 0
    while value >= 0x80:
        p[n] = <unsigned char>((value & 0x7F) | 0x80)
        value >>= 7
        n += 1
    p[n] = <unsigned char>value
    return n + 1


cdef inline void store_f64le(unsigned char* p, double value) noexcept nogil:
    """A protobuf double (wire type 1): its IEEE bits, little-endian whatever the host."""
    cdef uint64_t bits
    cdef int i
    memcpy(&bits, &value, 8)
    for i in range(8):
        p[i] = (bits >> (8 * i)) & 0xFF


# -- a growing output buffer, for the encoders ----------------------------------------------

cdef struct Out:
    unsigned char* data
    Py_ssize_t size
    Py_ssize_t capacity


cdef inline int out_open(Out* out, Py_ssize_t capacity) except -1:
    out.data = <unsigned char*>PyMem_Malloc(capacity)
    if out.data == NULL:
        raise MemoryError()
    out.size = 0
    out.capacity = capacity
    return 0


cdef inline unsigned char* out_room(Out* out, Py_ssize_t n) except NULL:
    """Room for ``n`` more bytes at ``out.data + out.size`` (the buffer doubles as needed)."""
    cdef Py_ssize_t capacity = out.capacity
    cdef void* grown
    if out.size + n > capacity:
        while out.size + n > capacity:
            capacity *= 2
        grown = PyMem_Realloc(out.data, capacity)
        if grown == NULL:
            raise MemoryError()
        out.data = <unsigned char*>grown
        out.capacity = capacity
    return out.data + out.size


cdef inline int out_varint(Out* out, uint64_t value) except -1:
    out.size += store_varint(out_room(out, MAX_VARINT_BYTES), value)
    return 0


cdef inline int out_raw(Out* out, const char* data, Py_ssize_t n) except -1:
    memcpy(out_room(out, n), data, n)
    out.size += n
    return 0


cdef inline int out_blob(Out* out, uint64_t key, const char* data, Py_ssize_t n) except -1:
    """A length-delimited field: its key, its length, its bytes."""
    out_varint(out, key)
    out_varint(out, <uint64_t>n)
    out_raw(out, data, n)
    return 0


cdef inline int out_close_message(Out* out, Py_ssize_t start) except -1:
    """Prefix the bytes written since ``start`` with their length (a varint)."""
    cdef Py_ssize_t body = out.size - start
    cdef unsigned char prefix[MAX_VARINT_BYTES]
    cdef Py_ssize_t n = store_varint(prefix, <uint64_t>body)
    out_room(out, n)
    memmove(out.data + start + n, out.data + start, body)
    memcpy(out.data + start, prefix, n)
    out.size += n
    return 0


cdef inline bytes out_bytes(Out* out):
    return PyBytes_FromStringAndSize(<const char*>out.data, out.size)


cdef inline void out_close(Out* out) noexcept:
    PyMem_Free(out.data)
    out.data = NULL
