# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""ModelInferRequest bytes straight to an InferRequest, and an InferResponse straight to
ModelInferResponse bytes, without protobuf objects between.

The twin is the protobuf path (``ModelInferRequest.FromString`` then
``convert.request_from_pb``), and it stays the reference: ``decode_request`` returns None for
anything it does not take the fast way (typed ``contents``, no raw contents, a bad tensor,
bytes that are not a well-formed message, bad parameters...), and the caller then runs the
twin, which raises the one error message for it. So the two agree by construction on every
failure, and on every success the property test compares them field by field.

Protobuf semantics kept: fields in any order, the last of a repeated scalar wins, packed and
unpacked ``shape``, map entries with a missing key or value, unknown fields skipped (groups
are not taken), strings checked as UTF-8.

``encode_response`` has the same arrangement the other way: its twin is
``convert.response_to_pb(...).SerializeToString()``; it returns None for what it does not take
(an integer parameter outside int64, text that is not UTF-8, an output the twin would refuse),
and the property test parses its bytes back and compares them with the twin's message.
"""

cimport numpy as cnp
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.object cimport PyObject, PyTypeObject
from cpython.ref cimport Py_INCREF
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.stdint cimport int64_t, uint64_t
from libc.string cimport memcmp, memcpy

from _wire cimport (
    Out, out_blob, out_bytes, out_close, out_close_message, out_open, out_varint, store_f64le,
    out_room, walk_bytes,
)

import numpy as np

from gateway.errors import InvalidRequest
from gateway import _hotloops
from gateway.types import DEFAULT_OPTIONS, MAX_DIMS, MAX_EXTENT, MAX_TEXT_CHARS, WIRE_DTYPES, InferRequest, RequestOptions, Tensor

cnp.import_array()

cdef extern from "numpy/arrayobject.h":
    PyTypeObject PyArray_Type
    # Steals a reference to descr. (numpy's own .pxd leaves this one undeclared.)
    object PyArray_NewFromDescr(
        PyTypeObject* subtype, PyObject* descr, int nd, cnp.npy_intp* dims,
        cnp.npy_intp* strides, void* data, int flags, PyObject* obj
    )

cdef int64_t _MAX_EXTENT = MAX_EXTENT
cdef enum:
    _DIMS_ROOM = 64  # _view's dimension array
if MAX_DIMS > _DIMS_ROOM:
    raise ImportError(f"MAX_DIMS {MAX_DIMS} is more than the native decoder holds")

# The datatype names as str, and as the bytes they arrive in: a known name is matched in place
# and its one str object reused, not decoded per tensor.
cdef tuple _DATATYPES = tuple(WIRE_DTYPES)
cdef tuple _DATATYPE_BYTES = tuple(name.encode() for name in _DATATYPES)


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


cdef inline str _datatype(Cursor* c):
    """A tensor's datatype: a known name as its shared str, anything else as _text reads it."""
    cdef Py_ssize_t start = c.pos
    cdef Py_ssize_t n = _length(c)
    cdef const unsigned char* at = c.base + c.pos
    cdef Py_ssize_t i
    cdef bytes known
    for i in range(len(_DATATYPE_BYTES)):
        known = _DATATYPE_BYTES[i]
        if len(known) == n and memcmp(<const char*>known, at, n) == 0:
            c.pos += n
            return _DATATYPES[i]
    c.pos = start
    return _text(c)


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
    cdef uint64_t tag, wire, bits, field
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
    cdef uint64_t tag, wire, field
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
    cdef uint64_t tag, wire, field
    while c.pos < c.end:
        tag = _tag(&c)
        wire = tag & 7
        field = tag >> 3
        if field == 1 and wire == 2:
            name = _text(&c)
        elif field == 2 and wire == 2:
            datatype = _datatype(&c)
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
    cdef uint64_t tag, wire, field
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
    cdef Py_ssize_t count = 1
    cdef int64_t dim, extent = 1
    cdef object dtype = WIRE_DTYPES.get(datatype)
    if dtype is None or len(shape) > MAX_DIMS:
        raise _NotFast()
    # Negative dimensions, or an extent (zeros aside) past _MAX_EXTENT: the twin says why.
    for item in shape:
        dim = item
        if dim < 0 or (dim and extent > _MAX_EXTENT // dim):
            raise _NotFast()
        if dim:
            extent *= dim
        count *= dim
    if datatype == "BYTES":
        try:
            walk_bytes(<const unsigned char*>raw, len(raw), count, None)
        except ValueError:
            raise _NotFast()
        return Tensor(name, "BYTES", None, params, raw=raw, shape=shape)
    if len(raw) != count * dtype.itemsize:
        raise _NotFast()
    return Tensor(name, datatype, _view(shape, dtype, raw), params)


cdef object _view(tuple shape, object dtype, bytes raw):
    """A read-only array over ``raw`` (what ``np.ndarray(shape, dtype, raw)`` makes, a third
    of its cost: numpy's C constructor, not its Python one)."""
    cdef cnp.npy_intp dims[_DIMS_ROOM]
    cdef int nd = len(shape)
    cdef int i
    for i in range(nd):
        dims[i] = shape[i]
    Py_INCREF(dtype)  # stolen by PyArray_NewFromDescr
    array = PyArray_NewFromDescr(
        &PyArray_Type, <PyObject*>dtype, nd, dims, NULL,
        <void*>PyBytes_AS_STRING(raw), 0, NULL
    )
    cnp.set_array_base(array, raw)
    return array


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
    cdef uint64_t tag, wire, field
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
        nbytes=size,
    )


# -- responses -------------------------------------------------------------------------------

# Field keys (field number << 3 | wire type) of ModelInferResponse and what it nests.
cdef enum:
    RESPONSE_MODEL_NAME = (1 << 3) | 2
    RESPONSE_MODEL_VERSION = (2 << 3) | 2
    RESPONSE_ID = (3 << 3) | 2
    RESPONSE_PARAMETERS = (4 << 3) | 2
    RESPONSE_OUTPUTS = (5 << 3) | 2
    RESPONSE_RAW_OUTPUT = (6 << 3) | 2
    OUTPUT_NAME = (1 << 3) | 2
    OUTPUT_DATATYPE = (2 << 3) | 2
    OUTPUT_SHAPE = (3 << 3) | 2  # packed
    OUTPUT_PARAMETERS = (4 << 3) | 2
    ENTRY_KEY = (1 << 3) | 2
    ENTRY_VALUE = (2 << 3) | 2
    PARAM_BOOL = (1 << 3) | 0
    PARAM_INT64 = (2 << 3) | 0
    PARAM_STRING = (3 << 3) | 2
    PARAM_DOUBLE = (4 << 3) | 1

cdef object _INT64_MIN = -(1 << 63)
cdef object _INT64_MAX = (1 << 63) - 1


cdef inline int _out_text(Out* out, uint64_t key, str value) except -1:
    """A string field (proto3: left out when empty)."""
    if value:
        _out_utf8(out, key, value)
    return 0


cdef inline int _out_utf8(Out* out, uint64_t key, str value) except -1:
    cdef bytes data
    try:
        data = value.encode("utf-8")
    except UnicodeEncodeError:
        raise _NotFast()
    out_blob(out, key, data, len(data))
    return 0


cdef int _out_parameters(Out* out, uint64_t key, dict params) except -1:
    """A map<string, InferParameter>, typed as ``convert.parameters_to_pb`` types it."""
    cdef Py_ssize_t entry, value_start
    cdef unsigned char* p
    for name, value in params.items():
        if type(name) is not str:
            raise _NotFast()
        out_varint(out, key)
        entry = out.size
        _out_utf8(out, ENTRY_KEY, name)
        out_varint(out, ENTRY_VALUE)
        value_start = out.size
        if type(value) is bool:
            out_varint(out, PARAM_BOOL)
            out_varint(out, 1 if value else 0)
        elif isinstance(value, int):
            if value < _INT64_MIN or value > _INT64_MAX:
                raise _NotFast()
            out_varint(out, PARAM_INT64)
            out_varint(out, <uint64_t><int64_t>value)
        elif isinstance(value, float):
            out_varint(out, PARAM_DOUBLE)
            p = out_room(out, 8)
            store_f64le(p, <double>value)
            out.size += 8
        else:
            _out_utf8(out, PARAM_STRING, str(value))
        out_close_message(out, value_start)
        out_close_message(out, entry)
    return 0


def encode_response(response):
    """ModelInferResponse bytes for an InferResponse, or None: leave it to the twin."""
    cdef Out out
    cdef Py_ssize_t start, shape_start
    cdef list contents = []
    cdef bytes data
    out_open(&out, 512)
    try:
        _out_text(&out, RESPONSE_MODEL_NAME, response.model_name)
        _out_text(&out, RESPONSE_MODEL_VERSION, response.model_version)
        _out_text(&out, RESPONSE_ID, response.id)
        _out_parameters(&out, RESPONSE_PARAMETERS, response.parameters)
        for tensor in response.outputs:
            datatype = tensor.datatype
            array = tensor.data
            if datatype == "BYTES":
                data = _hotloops.encode_bytes(array.reshape(-1).tolist())
            else:
                dtype = WIRE_DTYPES.get(datatype)
                if dtype is None:
                    raise _NotFast()
                data = np.ascontiguousarray(array, dtype=dtype).tobytes()
            contents.append(data)
            out_varint(&out, RESPONSE_OUTPUTS)
            start = out.size
            _out_text(&out, OUTPUT_NAME, tensor.name)
            _out_text(&out, OUTPUT_DATATYPE, datatype)
            shape = tensor.shape
            if shape:
                out_varint(&out, OUTPUT_SHAPE)
                shape_start = out.size
                for dim in shape:
                    out_varint(&out, <uint64_t><int64_t>dim)
                out_close_message(&out, shape_start)
            if tensor.parameters:
                _out_parameters(&out, OUTPUT_PARAMETERS, tensor.parameters)
            out_close_message(&out, start)
        for data in contents:
            out_blob(&out, RESPONSE_RAW_OUTPUT, data, len(data))
        return out_bytes(&out)
    except (_NotFast, OverflowError, TypeError, ValueError):
        return None
    finally:
        out_close(&out)
