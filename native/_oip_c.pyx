# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""ModelInferRequest bytes straight to an InferRequest, without protobuf objects between.

The twin is the protobuf path (``ModelInferRequest.FromString`` then
``convert.request_from_pb``), and it stays the reference: ``decode_request`` returns None for
anything it does not take the fast way (typed ``contents``, no raw contents, a bad tensor,
bytes that are not a well-formed message, bad parameters...), and the caller then runs the
twin, which raises the one error message for it. So the two agree by construction on every
failure, and on every success the property test compares them field by field.

Protobuf semantics kept: fields in any order, the last of a repeated scalar wins, packed and
unpacked ``shape``, map entries with a missing key or value, unknown fields skipped (groups
are not taken), strings checked as UTF-8.
"""

from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.stdint cimport int64_t, uint64_t
from libc.string cimport memcpy

from _wire cimport walk_bytes

import numpy as np

from gateway.errors import InvalidRequest
from gateway.types import DEFAULT_OPTIONS, MAX_TEXT_CHARS, WIRE_DTYPES, InferRequest, RequestOptions, Tensor

cdef object _ndarray = np.ndarray


cdef struct Cursor:
    const unsigned char* base
    Py_ssize_t pos
    Py_ssize_t end


class _NotFast(Exception):
    """Leave this request to the twin."""


cdef inline uint64_t _varint(Cursor* c) except? 0xFFFFFFFFFFFFFFFF:
    cdef uint64_t value = 0
    cdef int shift = 0
    cdef unsigned char byte
    while True:
        if c.pos >= c.end or shift >= 64:
            raise _NotFast()
        byte = c.base[c.pos]
        c.pos += 1
        value |= (<uint64_t>(byte & 0x7F)) << shift
        if byte < 0x80:
            return value
        shift += 7


cdef inline uint64_t _tag(Cursor* c) except? 0xFFFFFFFFFFFFFFFF:
    """A field's tag; field 0 and numbers past protobuf's range are not a message."""
    cdef uint64_t tag = _varint(c)
    if tag < 8 or tag > 0xFFFFFFFF:
        raise _NotFast()
    return tag


cdef inline Py_ssize_t _length(Cursor* c) except -1:
    """A length-delimited field's length, checked against what is left."""
    cdef uint64_t n = _varint(c)
    if n > <uint64_t>(c.end - c.pos):
        raise _NotFast()
    return <Py_ssize_t>n


cdef inline int _skip(Cursor* c, uint64_t wire) except -1:
    if wire == 0:
        _varint(c)
    elif wire == 1:
        if c.end - c.pos < 8:
            raise _NotFast()
        c.pos += 8
    elif wire == 2:
        c.pos += _length(c)
    elif wire == 5:
        if c.end - c.pos < 4:
            raise _NotFast()
        c.pos += 4
    else:  # groups (3, 4) and invalid wire types
        raise _NotFast()
    return 0


cdef inline str _text(Cursor* c):
    cdef Py_ssize_t n = _length(c)
    cdef Py_ssize_t at = c.pos
    c.pos += n
    try:
        return PyUnicode_DecodeUTF8(<const char*>(c.base + at), n, NULL)
    except UnicodeDecodeError:
        raise _NotFast()


cdef inline bytes _bytes(Cursor* c):
    cdef Py_ssize_t n = _length(c)
    cdef Py_ssize_t at = c.pos
    c.pos += n
    return PyBytes_FromStringAndSize(<const char*>(c.base + at), n)


cdef inline Cursor _sub(Cursor* c):
    """The embedded message at the cursor; the cursor moves past it."""
    cdef Cursor inner
    cdef Py_ssize_t n = _length(c)
    inner.base = c.base
    inner.pos = c.pos
    inner.end = c.pos + n
    c.pos += n
    return inner


cdef object _parameter(Cursor c):
    """An InferParameter: its oneof's value (the last one set), or None when none is."""
    cdef object value = None
    cdef uint64_t tag, wire, bits
    cdef double number
    while c.pos < c.end:
        tag = _tag(&c)
        wire = tag & 7
        field = tag >> 3
        if field == 1 and wire == 0:
            value = _varint(&c) != 0
        elif field == 2 and wire == 0:
            value = <int64_t>_varint(&c)
        elif field == 3 and wire == 2:
            value = _text(&c)
        elif field == 4 and wire == 1:
            if c.end - c.pos < 8:
                raise _NotFast()
            bits = 0
            for i in range(8):
                bits |= (<uint64_t>c.base[c.pos + i]) << (8 * i)
            memcpy(&number, &bits, 8)
            value = number
            c.pos += 8
        elif field == 5 and wire == 0:
            value = _varint(&c)
        elif 1 <= field <= 5:
            raise _NotFast()  # a known field with another wire type: the twin says what
        else:
            _skip(&c, wire)
    return value


cdef int _map_entry(Cursor c, dict into) except -1:
    """One ``map<string, InferParameter>`` entry; an entry whose value sets nothing is kept
    out, as ``convert.parameters_from_pb`` keeps it out."""
    cdef str key = ""
    cdef object value = None
    cdef bint valued = False
    cdef uint64_t tag, wire
    while c.pos < c.end:
        tag = _tag(&c)
        wire = tag & 7
        field = tag >> 3
        if field == 1 and wire == 2:
            key = _text(&c)
        elif field == 2 and wire == 2:
            if valued:
                raise _NotFast()  # protobuf merges a repeated message field
            valued = True
            value = _parameter(_sub(&c))
        elif field == 1 or field == 2:
            raise _NotFast()
        else:
            _skip(&c, wire)
    if value is None:
        into.pop(key, None)  # a later entry replaces an earlier one, even an empty one
    else:
        into[key] = value
    return 0


cdef int _shape(Cursor* c, uint64_t wire, list shape) except -1:
    cdef Cursor packed
    if wire == 0:
        shape.append(<int64_t>_varint(c))
    elif wire == 2:
        packed = _sub(c)
        while packed.pos < packed.end:
            shape.append(<int64_t>_varint(&packed))
    else:
        raise _NotFast()
    return 0


cdef tuple _input(Cursor c):
    """An InferInputTensor: (name, datatype, shape, parameters)."""
    cdef str name = ""
    cdef str datatype = ""
    cdef list shape = []
    cdef dict params = {}
    cdef uint64_t tag, wire
    while c.pos < c.end:
        tag = _tag(&c)
        wire = tag & 7
        field = tag >> 3
        if field == 1 and wire == 2:
            name = _text(&c)
        elif field == 2 and wire == 2:
            datatype = _text(&c)
        elif field == 3:
            _shape(&c, wire, shape)
        elif field == 4 and wire == 2:
            _map_entry(_sub(&c), params)
        elif 1 <= field <= 5:
            raise _NotFast()  # typed contents (5), or a known field mistyped
        else:
            _skip(&c, wire)
    return name, datatype, tuple(shape), params


cdef str _output(Cursor c):
    """An InferRequestedOutputTensor's name (its parameters are read, and not used)."""
    cdef str name = ""
    cdef dict ignored = {}
    cdef uint64_t tag, wire
    while c.pos < c.end:
        tag = _tag(&c)
        wire = tag & 7
        field = tag >> 3
        if field == 1 and wire == 2:
            name = _text(&c)
        elif field == 2 and wire == 2:
            _map_entry(_sub(&c), ignored)
        elif field == 1 or field == 2:
            raise _NotFast()
        else:
            _skip(&c, wire)
    return name


cdef object _tensor(tuple spec, bytes raw):
    cdef str name = spec[0]
    cdef str datatype = spec[1]
    cdef tuple shape = spec[2]
    cdef dict params = spec[3]
    cdef object count = 1
    cdef object dtype = WIRE_DTYPES.get(datatype)
    if dtype is None:
        raise _NotFast()
    for dim in shape:
        if dim < 0:
            raise _NotFast()
        count *= dim
    if datatype == "BYTES":
        try:
            walk_bytes(<const unsigned char*>raw, len(raw), count, None)
        except ValueError:
            raise _NotFast()
        return Tensor(name, "BYTES", None, params, raw=raw, shape=shape)
    if len(raw) != count * dtype.itemsize:
        raise _NotFast()
    return Tensor(name, datatype, _ndarray(shape, dtype, raw), params)


def decode_request(bytes data not None, Py_ssize_t max_message_bytes, timeout_s=None):
    """An InferRequest from a ModelInferRequest's bytes, or None: leave it to the twin."""
    cdef Cursor c
    c.base = <const unsigned char*>data
    c.pos = 0
    c.end = len(data)
    cdef str model_name = ""
    cdef str model_version = ""
    cdef str request_id = ""
    cdef dict params = {}
    cdef list specs = []
    cdef list outputs = []
    cdef list raw = []
    cdef Py_ssize_t size = 0
    cdef uint64_t tag, wire
    try:
        while c.pos < c.end:
            tag = _tag(&c)
            wire = tag & 7
            field = tag >> 3
            if field == 1 and wire == 2:
                model_name = _text(&c)
            elif field == 2 and wire == 2:
                model_version = _text(&c)
            elif field == 3 and wire == 2:
                request_id = _text(&c)
            elif field == 4 and wire == 2:
                _map_entry(_sub(&c), params)
            elif field == 5 and wire == 2:
                specs.append(_input(_sub(&c)))
            elif field == 6 and wire == 2:
                outputs.append(_output(_sub(&c)))
            elif field == 7 and wire == 2:
                contents = _bytes(&c)
                size += len(contents)
                raw.append(contents)
            elif 1 <= field <= 7:
                return None
            else:
                _skip(&c, wire)
        if (
            size > max_message_bytes
            or len(raw) != len(specs)
            or (not raw and specs)
            or len(request_id) > MAX_TEXT_CHARS
        ):
            return None
        inputs = [_tensor(spec, contents) for spec, contents in zip(specs, raw)]
        options = RequestOptions.parse(params) if params else DEFAULT_OPTIONS
    except (_NotFast, InvalidRequest):
        return None
    return InferRequest(
        model_name=model_name,
        model_version=model_version,
        id=request_id,
        inputs=inputs,
        requested_outputs=outputs,
        options=options,
        timeout_s=timeout_s,
    )
