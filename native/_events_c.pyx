# cython: language_level=3
"""Prediction events, native twin of gateway/events/builder.py's encode_event_py (the same
event: parsing either's bytes gives equal messages, tested for parity).

The writer encodes every answered prediction, so this writes the PredictionEvent's wire
format (https://protobuf.dev/programming-guides/encoding/) straight into one growing buffer
instead of building a message object field by field. What an event says is the builder's:
``EventHeader`` (identity, timings, cost, fallback, segments, coverage) and
``event_columns`` (features, sensitive values hashed, outputs, the assembled model input,
``served_input``); only the writing is here,
and, for raw features under a contract (every feature its own tensor, the common request),
the reading of their columns: ``_contract_columns`` reads each tensor's buffer as it arrived
(a BYTES tensor's wire buffer, a numeric one's array) straight into the event's float64
matrix and text columns, what builder._contract_features does with numpy arrays and
object lists. Parts that repeat (a version's identity, a layout's column names) are encoded
once and reused.
"""

from gateway.events.builder import EventHeader, event_columns, event_rows, output_columns

cimport numpy as cnp
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE, PyByteArray_Resize
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.stdint cimport int32_t, int64_t, uint64_t
from libc.string cimport memcpy, memmove

from _wire cimport MAX_VARINT_BYTES, next_element, store_f64le, store_varint, walk_bytes

import numpy as np

cnp.import_array()

cdef object _F64 = np.dtype("<f8")
cdef object _F32 = np.dtype("<f4")

cdef dict _identities = {}  # bounded: cleared when it reaches _CACHE_LIMIT
cdef dict _layouts = {}
cdef Py_ssize_t _CACHE_LIMIT = 1024

# Keys: field number << 3 | wire type (exposed as FIELD_KEYS below; tests/unit/
# test_native_codes.py checks each against events.proto's descriptors).
cdef enum:
    VARINT = 0
    I64 = 1
    LEN = 2

# PredictionEvent
cdef enum:
    EVENT_ID = 1 << 3 | LEN
    REQUEST_ID = 2 << 3 | LEN
    EVENT_TIME = 3 << 3 | VARINT
    TENANT = 5 << 3 | LEN
    SURFACE = 6 << 3 | LEN
    ROUTE = 7 << 3 | LEN
    MODEL = 8 << 3 | LEN
    VERSION = 9 << 3 | LEN
    ARM = 10 << 3 | LEN
    SEGMENTS = 11 << 3 | LEN
    CONTRACT_VERSION = 12 << 3 | LEN
    FEATURES = 13 << 3 | LEN
    OUTPUTS = 14 << 3 | LEN
    ROWS = 15 << 3 | VARINT
    CACHED_ROWS = 16 << 3 | VARINT
    FALLBACK = 17 << 3 | LEN
    COVERAGE = 18 << 3 | LEN
    QUEUE_MS = 19 << 3 | I64
    COMPUTE_MS = 20 << 3 | I64
    TOTAL_MS = 21 << 3 | I64
    COST = 22 << 3 | I64
    ENTITY_KEY = 23 << 3 | LEN
    MODEL_INPUT = 24 << 3 | LEN

# The nested messages: FeatureBlock, StringColumn, OutputColumn, FeatureCoverage, ModelInput
# and the segments map's entries
cdef enum:
    BLOCK_NUMERIC_NAMES = 1 << 3 | LEN
    BLOCK_NUMBERS = 2 << 3 | LEN
    BLOCK_STRINGS = 3 << 3 | LEN
    BLOCK_NUMERIC_KINDS = 4 << 3 | LEN
    STRING_NAME = 1 << 3 | LEN
    STRING_VALUES = 2 << 3 | LEN
    STRING_HASHED = 3 << 3 | VARINT
    OUTPUT_NAME = 1 << 3 | LEN
    OUTPUT_VALUES = 2 << 3 | LEN
    OUTPUT_WIDTH = 3 << 3 | VARINT
    COVERAGE_FEATURE = 1 << 3 | LEN
    COVERAGE_PRESENT = 2 << 3 | VARINT
    COVERAGE_DEFAULTED = 3 << 3 | VARINT
    COVERAGE_OUT_OF_RANGE = 4 << 3 | VARINT
    COVERAGE_OOV = 5 << 3 | VARINT
    SEGMENT_KEY = 1 << 3 | LEN
    SEGMENT_VALUE = 2 << 3 | LEN
    INPUT_COLUMNS = 1 << 3 | LEN
    INPUT_VALUES = 2 << 3 | LEN

# A coverage row's counts come in gateway.types.OUTCOMES order.
cdef unsigned char[4] _COUNT_KEYS = [
    COVERAGE_PRESENT, COVERAGE_DEFAULTED, COVERAGE_OUT_OF_RANGE, COVERAGE_OOV
]

FIELD_KEYS = {
    "PredictionEvent.event_id": EVENT_ID,
    "PredictionEvent.request_id": REQUEST_ID,
    "PredictionEvent.event_time_us": EVENT_TIME,
    "PredictionEvent.tenant": TENANT,
    "PredictionEvent.surface": SURFACE,
    "PredictionEvent.route": ROUTE,
    "PredictionEvent.model": MODEL,
    "PredictionEvent.version": VERSION,
    "PredictionEvent.arm": ARM,
    "PredictionEvent.segments": SEGMENTS,
    "PredictionEvent.contract_version": CONTRACT_VERSION,
    "PredictionEvent.features": FEATURES,
    "PredictionEvent.outputs": OUTPUTS,
    "PredictionEvent.rows": ROWS,
    "PredictionEvent.cached_rows": CACHED_ROWS,
    "PredictionEvent.fallback": FALLBACK,
    "PredictionEvent.coverage": COVERAGE,
    "PredictionEvent.queue_ms": QUEUE_MS,
    "PredictionEvent.compute_ms": COMPUTE_MS,
    "PredictionEvent.total_ms": TOTAL_MS,
    "PredictionEvent.cost": COST,
    "PredictionEvent.entity_key": ENTITY_KEY,
    "PredictionEvent.model_input": MODEL_INPUT,
    "FeatureBlock.numeric_names": BLOCK_NUMERIC_NAMES,
    "FeatureBlock.numbers": BLOCK_NUMBERS,
    "FeatureBlock.strings": BLOCK_STRINGS,
    "FeatureBlock.numeric_kinds": BLOCK_NUMERIC_KINDS,
    "ModelInput.columns": INPUT_COLUMNS,
    "ModelInput.values": INPUT_VALUES,
    "StringColumn.name": STRING_NAME,
    "StringColumn.values": STRING_VALUES,
    "StringColumn.hashed": STRING_HASHED,
    "OutputColumn.name": OUTPUT_NAME,
    "OutputColumn.values": OUTPUT_VALUES,
    "OutputColumn.width": OUTPUT_WIDTH,
    "FeatureCoverage.feature": COVERAGE_FEATURE,
    "FeatureCoverage.present": _COUNT_KEYS[0],
    "FeatureCoverage.defaulted": _COUNT_KEYS[1],
    "FeatureCoverage.out_of_range": _COUNT_KEYS[2],
    "FeatureCoverage.oov": _COUNT_KEYS[3],
    "PredictionEvent.SegmentsEntry.key": SEGMENT_KEY,
    "PredictionEvent.SegmentsEntry.value": SEGMENT_VALUE,
}


cdef class _Buffer:
    """A bytearray written at its end; ``mark``/``close_message`` wrap what follows a key in
    its length prefix (written after the body is known, then moved into place)."""

    cdef bytearray data
    cdef Py_ssize_t size

    def __cinit__(self):
        self.data = bytearray(1024)
        self.size = 0

    cdef inline unsigned char* _room(self, Py_ssize_t n) except NULL:
        cdef Py_ssize_t capacity = PyByteArray_GET_SIZE(self.data)
        if self.size + n > capacity:
            while self.size + n > capacity:
                capacity *= 2
            PyByteArray_Resize(self.data, capacity)
        return <unsigned char*>PyByteArray_AS_STRING(self.data) + self.size

    cdef inline int key(self, unsigned int key) except -1:
        """A field's key: one byte for fields 1-15, two for 16-2047 (folded for a constant)."""
        cdef unsigned char* p = self._room(2)
        if key < 0x80:
            p[0] = <unsigned char>key
            self.size += 1
        else:
            p[0] = <unsigned char>((key & 0x7F) | 0x80)
            p[1] = <unsigned char>(key >> 7)
            self.size += 2
        return 0

    cdef inline int byte(self, unsigned char value) except -1:
        self._room(1)[0] = value
        self.size += 1
        return 0

    cdef inline int varint(self, uint64_t value) except -1:
        self.size += store_varint(self._room(MAX_VARINT_BYTES), value)
        return 0

    cdef inline int raw(self, const char* data, Py_ssize_t n) except -1:
        memcpy(self._room(n), data, n)
        self.size += n
        return 0

    cdef inline int blob(self, bytes data) except -1:
        cdef Py_ssize_t n = len(data)
        self.varint(n)
        self.raw(data, n)
        return 0

    cdef inline int text(self, str value) except -1:
        return self.blob(value.encode("utf-8"))

    cdef inline int double(self, double value) except -1:
        store_f64le(self._room(8), value)
        self.size += 8
        return 0

    cdef inline Py_ssize_t mark(self):
        return self.size

    cdef int close_message(self, Py_ssize_t start) except -1:
        """Prefix the bytes written since ``start`` with their length (a varint)."""
        cdef Py_ssize_t body = self.size - start
        cdef unsigned char prefix[MAX_VARINT_BYTES]
        cdef Py_ssize_t n = store_varint(prefix, <uint64_t>body)
        self._room(n)
        cdef char* base = PyByteArray_AS_STRING(self.data)
        memmove(base + start + n, base + start, body)
        memcpy(base + start, prefix, n)
        self.size += n
        return 0

    cdef bytes result(self):
        return PyByteArray_AS_STRING(self.data)[: self.size]


cdef inline int _string_field(_Buffer out, unsigned int key, str value) except -1:
    if value:
        out.key(key)
        out.text(value)
    return 0


cdef bytes _identity(header):
    """The header's identity fields, encoded (cached: they repeat across a version's events)."""
    cache_key = (
        header.tenant,
        header.surface,
        header.route,
        header.model,
        header.version,
        header.arm,
        header.contract_version,
    )
    found = _identities.get(cache_key)
    if found is not None:
        return found
    cdef _Buffer out = _Buffer()
    _string_field(out, TENANT, header.tenant)
    _string_field(out, SURFACE, header.surface)
    _string_field(out, ROUTE, header.route)
    _string_field(out, MODEL, header.model)
    _string_field(out, VERSION, header.version)
    _string_field(out, ARM, header.arm)
    _string_field(out, CONTRACT_VERSION, header.contract_version)
    encoded = out.result()
    if len(_identities) >= _CACHE_LIMIT:
        _identities.clear()
    _identities[cache_key] = encoded
    return encoded


cdef bytes _layout(tuple names):
    """FeatureBlock.numeric_names of one column layout (the same bytes as ModelInput.columns:
    both are field 1, repeated string)."""
    found = _layouts.get(names)
    if found is not None:
        return found
    cdef _Buffer out = _Buffer()
    for name in names:
        out.key(BLOCK_NUMERIC_NAMES)
        out.text(name)
    encoded = out.result()
    if len(_layouts) >= _CACHE_LIMIT:
        _layouts.clear()
    _layouts[names] = encoded
    return encoded


cdef int _string_column(_Buffer out, str name, list values, bint hashed) except -1:
    out.key(BLOCK_STRINGS)
    cdef Py_ssize_t start = out.mark()
    out.key(STRING_NAME)
    out.text(name)
    for value in values:
        out.key(STRING_VALUES)
        out.text(value)
    if hashed:
        out.key(STRING_HASHED)
        out.byte(1)
    out.close_message(start)
    return 0


cdef list _texts(tensor):
    """A BYTES feature's values as text (UTF-8, bad bytes replaced), from its wire buffer when
    it kept one."""
    cdef bytes raw = tensor.raw
    cdef const unsigned char* base
    cdef const unsigned char* value
    cdef Py_ssize_t offset = 0, length, index, count
    if raw is None:
        return [
            v.decode("utf-8", errors="replace") if isinstance(v, bytes) else str(v)
            for v in tensor.data.ravel().tolist()
        ]
    count = 1
    for dim in tensor.shape:
        count *= dim
    base = <const unsigned char*>PyBytes_AS_STRING(raw)
    walk_bytes(base, len(raw), count, None)  # checked at decoding; a guard, not a cost
    values = [None] * count
    for index in range(count):
        length = next_element(base, &offset, &value)
        values[index] = PyUnicode_DecodeUTF8(<const char*>value, length, "replace")
    return values


cdef inline bint _readable(int kind):
    """A numeric kind _contract_columns reads as it is (any other becomes float64 first)."""
    return (
        kind == cnp.NPY_FLOAT32 or kind == cnp.NPY_FLOAT64 or kind == cnp.NPY_INT32
        or kind == cnp.NPY_INT64 or kind == cnp.NPY_BOOL
    )


cdef tuple _contract_columns(request, coverage, bytes hash_key, redact):
    """Raw features under a contract: (numeric names, float64 row-major matrix bytes, string
    columns, numeric kinds), as builder._contract_features and event_columns make them."""
    cdef dict positions = coverage.positions
    sensitive = coverage.sensitive
    cdef list names = []
    cdef list kinds = []
    cdef list arrays = []
    cdef list strings = []
    cdef Py_ssize_t rows = -1, n, j, r, length
    cdef cnp.ndarray array
    cdef cnp.dtype descr
    cdef int kind
    for tensor in request.inputs:
        name = tensor.name
        if name not in positions:
            continue
        hidden = name in sensitive
        if tensor.datatype == "BYTES":
            values = _texts(tensor)
            if hidden:
                values = [redact(v, hash_key) for v in values]
            strings.append((name, values, hidden))
            continue
        data = tensor.data
        if hidden:
            column = data.astype(np.float64).ravel()
            strings.append((name, [redact(v, hash_key) for v in column.tolist()], True))
            continue
        if isinstance(data, cnp.ndarray):  # as sent, before any conversion below
            descr = <cnp.dtype>cnp.PyArray_DESCR(<cnp.ndarray>data)
            kinds.append(chr(descr.kind))
        else:
            kinds.append(data.dtype.kind)
        # A decoded tensor is already C-ordered, aligned, native (ISCARRAY_RO checks all
        # three) and of a kind read below: read in place (its flat length is its size
        # whatever its shape), no numpy calls.
        if not (
            isinstance(data, cnp.ndarray)
            and cnp.PyArray_ISCARRAY_RO(<cnp.ndarray>data)
            and _readable(cnp.PyArray_TYPE(<cnp.ndarray>data))
        ):
            data = np.ascontiguousarray(data.reshape(-1))
            if not (
                cnp.PyArray_ISNOTSWAPPED(<cnp.ndarray>data)
                and _readable(cnp.PyArray_TYPE(<cnp.ndarray>data))
            ):
                data = np.ascontiguousarray(data, dtype=np.float64)
        array = data
        length = cnp.PyArray_SIZE(array)
        if rows < 0:
            rows = length
        elif length != rows:
            raise ValueError(f"feature '{name}' has {length} values, others {rows}")
        names.append(name)
        arrays.append(array)
    n = len(arrays)
    if not n:
        return names, b"", strings, ""
    numbers = PyBytes_FromStringAndSize(NULL, rows * n * 8)
    cdef unsigned char* out = <unsigned char*>PyBytes_AS_STRING(numbers)
    cdef const void* p
    cdef double number
    for j in range(n):
        array = arrays[j]
        kind = cnp.PyArray_TYPE(array)
        p = cnp.PyArray_DATA(array)
        for r in range(rows):
            if kind == cnp.NPY_FLOAT64:
                number = (<const double*>p)[r]
            elif kind == cnp.NPY_FLOAT32:
                number = (<const float*>p)[r]
            elif kind == cnp.NPY_INT64:
                number = <double>(<const int64_t*>p)[r]
            elif kind == cnp.NPY_INT32:
                number = (<const int32_t*>p)[r]
            else:  # bool: any byte but 0 is True, as numpy reads it
                number = 1.0 if (<const unsigned char*>p)[r] else 0.0
            store_f64le(out + (r * n + j) * 8, number)
    return names, numbers, strings, "".join(kinds)


cdef Py_ssize_t _varint_size(uint64_t value):
    cdef Py_ssize_t n = 1
    while value >= 0x80:
        value >>= 7
        n += 1
    return n


cdef int _model_input(_Buffer out, model_input, Py_ssize_t max_columns) except -1:
    """PredictionEvent.model_input, as builder.served_input decides it: its length is known
    before it is written, so the matrix is copied once (not moved behind a late prefix)."""
    if model_input is None:
        return 0
    columns = model_input.columns
    if len(columns) > max_columns:
        return 0
    cdef cnp.ndarray matrix = np.ascontiguousarray(model_input.matrix, _F32)
    cdef Py_ssize_t nbytes = cnp.PyArray_NBYTES(matrix)
    names = _layout(tuple(columns))
    cdef Py_ssize_t body = len(names)
    if nbytes:
        body += 1 + _varint_size(<uint64_t>nbytes) + nbytes
    out.key(MODEL_INPUT)
    out.varint(<uint64_t>body)
    out.raw(names, len(names))
    if nbytes:
        out.key(INPUT_VALUES)
        out.varint(<uint64_t>nbytes)
        out.raw(<const char*>cnp.PyArray_DATA(matrix), nbytes)
    return 0


def encode_event(pending, str event_id, bytes hash_key, redact, Py_ssize_t max_columns):
    """The event's wire bytes: parsed, the message build_event makes of the same arguments."""
    header = EventHeader(pending)
    cdef list numeric_names, strings, outputs
    cdef bytes numbers
    cdef str numeric_kinds
    cdef long long rows
    if pending.coverage is not None:
        request, response = pending.request, pending.response
        rows = event_rows(request, response)
        numeric_names, numbers, strings, numeric_kinds = _contract_columns(
            request, pending.coverage, hash_key, redact
        )
        outputs = output_columns(response, rows)
    else:
        columns = event_columns(pending, hash_key, redact, max_columns)
        rows, numeric_names, numbers = columns.rows, columns.numeric_names, columns.numbers
        strings, outputs = columns.strings, columns.outputs
        numeric_kinds = columns.numeric_kinds
    cdef _Buffer out = _Buffer()
    cdef Py_ssize_t start, block_start, field, row
    cdef long long count

    _string_field(out, EVENT_ID, event_id)
    _string_field(out, REQUEST_ID, header.request_id)
    cdef long long event_time_us = header.event_time_us
    if event_time_us:
        out.key(EVENT_TIME)
        out.varint(<uint64_t>event_time_us)
    identity = _identity(header)
    out.raw(identity, len(identity))
    if rows:
        out.key(ROWS)
        out.varint(<uint64_t>rows)
    cdef long long cached = header.cached_rows
    if cached:
        out.key(CACHED_ROWS)
        out.varint(<uint64_t>cached)
    _string_field(out, FALLBACK, header.fallback)
    out.key(QUEUE_MS)
    out.double(header.queue_ms)
    out.key(COMPUTE_MS)
    out.double(header.compute_ms)
    out.key(TOTAL_MS)
    out.double(header.total_ms)
    out.key(COST)
    out.double(header.cost)
    _string_field(out, ENTITY_KEY, header.entity_key)
    segments = header.segments
    for key, value in segments.items() if segments else ():
        out.key(SEGMENTS)
        start = out.mark()
        out.key(SEGMENT_KEY)
        out.text(key)
        out.key(SEGMENT_VALUE)
        out.text(value)
        out.close_message(start)
    cdef list coverage_counts = header.coverage_counts
    cdef list counts
    coverage_features = header.coverage_features
    if len(coverage_counts) != len(coverage_features):
        raise ValueError("coverage: a row of counts per feature")
    for row in range(len(coverage_counts)):
        out.key(COVERAGE)
        start = out.mark()
        out.key(COVERAGE_FEATURE)
        out.text(coverage_features[row])
        counts = coverage_counts[row]
        for field in range(<Py_ssize_t>sizeof(_COUNT_KEYS)):
            count = counts[field]
            if count:
                out.key(_COUNT_KEYS[field])
                out.varint(<uint64_t>count)
        out.close_message(start)
    if strings or numeric_names:
        out.key(FEATURES)
        block_start = out.mark()
        for name, values, hashed in strings:
            _string_column(out, name, values, hashed)
        if numeric_names:
            layout = _layout(tuple(numeric_names))
            out.raw(layout, len(layout))
            out.key(BLOCK_NUMBERS)
            out.blob(numbers)
            _string_field(out, BLOCK_NUMERIC_KINDS, numeric_kinds)
        out.close_message(block_start)
    for name, data, width in outputs:
        out.key(OUTPUTS)
        start = out.mark()
        out.key(OUTPUT_NAME)
        out.text(name)
        out.key(OUTPUT_VALUES)
        out.blob(data)
        if width:
            out.key(OUTPUT_WIDTH)
            out.varint(<uint64_t><long long>width)
        out.close_message(start)
    _model_input(out, pending.model_input, max_columns)
    return out.result()
