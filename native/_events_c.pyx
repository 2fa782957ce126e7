# cython: language_level=3
"""Prediction events, native twin of gateway/events/builder.py's encode_event_py (the same
event: parsing either's bytes gives equal messages, tested for parity).

The writer encodes every answered prediction, so this writes the PredictionEvent's wire
format (https://protobuf.dev/programming-guides/encoding/) straight into one growing buffer
instead of building a message object field by field. What goes into the event (features,
sensitive values hashed, outputs) is the builder's ``event_columns``; only the writing is
here. Parts that repeat (a version's identity, a layout's column names) are encoded once and
reused.
"""

from gateway.events.builder import event_columns, fallback_text

from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE, PyByteArray_Resize
from libc.stdint cimport uint64_t
from libc.string cimport memcpy, memmove

cdef dict _identities = {}  # bounded: cleared when it reaches _CACHE_LIMIT
cdef dict _layouts = {}
cdef Py_ssize_t _CACHE_LIMIT = 1024

# Keys (field number << 3 | wire type). 0: varint, 1: 64-bit, 2: length-delimited.
cdef enum:
    EVENT_ID = 0x0A
    REQUEST_ID = 0x12
    EVENT_TIME = 0x18
    TENANT = 0x2A
    SURFACE = 0x32
    ROUTE = 0x3A
    MODEL = 0x42
    VERSION = 0x4A
    ARM = 0x52
    SEGMENTS = 0x5A
    CONTRACT_VERSION = 0x62
    FEATURES = 0x6A
    OUTPUTS = 0x72
    ROWS = 0x78
# two-byte keys (fields 16 and up): first byte, then 0x01
cdef enum:
    CACHED_ROWS = 0x80
    FALLBACK = 0x8A
    COVERAGE = 0x92
    QUEUE_MS = 0x99
    COMPUTE_MS = 0xA1
    TOTAL_MS = 0xA9
    COST = 0xB1
    ENTITY_KEY = 0xBA
# inside FeatureBlock, StringColumn, OutputColumn, FeatureCoverage and map entries
cdef enum:
    F1_LEN = 0x0A
    F2_LEN = 0x12
    F3_LEN = 0x1A
    F3_VARINT = 0x18


cdef class _Buffer:
    """A bytearray written at its end; ``mark``/``close_message`` wrap what follows a key in
    its length prefix (written after the body is known, then moved into place)."""

    cdef bytearray data
    cdef Py_ssize_t size

    def __cinit__(self):
        self.data = bytearray(1024)
        self.size = 0

    cdef inline char* _room(self, Py_ssize_t n) except NULL:
        cdef Py_ssize_t capacity = PyByteArray_GET_SIZE(self.data)
        if self.size + n > capacity:
            while self.size + n > capacity:
                capacity *= 2
            PyByteArray_Resize(self.data, capacity)
        return PyByteArray_AS_STRING(self.data) + self.size

    cdef inline int byte(self, unsigned char value) except -1:
        self._room(1)[0] = <char>value
        self.size += 1
        return 0

    cdef inline int key2(self, unsigned char first) except -1:
        cdef char* p = self._room(2)
        p[0] = <char>first
        p[1] = 0x01
        self.size += 2
        return 0

    cdef inline int varint(self, uint64_t value) except -1:
        cdef char* p = self._room(10)
        cdef Py_ssize_t n = 0
        while value >= 0x80:
            p[n] = <char>((value & 0x7F) | 0x80)
            value >>= 7
            n += 1
        p[n] = <char>value
        self.size += n + 1
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
        memcpy(self._room(8), &value, 8)  # x86-64 and aarch64: little-endian, as the wire
        self.size += 8
        return 0

    cdef inline Py_ssize_t mark(self):
        return self.size

    cdef int close_message(self, Py_ssize_t start) except -1:
        """Prefix the bytes written since ``start`` with their length (a varint)."""
        cdef Py_ssize_t body = self.size - start
        cdef unsigned char prefix[10]
        cdef Py_ssize_t n = 0
        cdef uint64_t value = body
        while value >= 0x80:
            prefix[n] = <unsigned char>((value & 0x7F) | 0x80)
            value >>= 7
            n += 1
        prefix[n] = <unsigned char>value
        n += 1
        self._room(n)
        cdef char* base = PyByteArray_AS_STRING(self.data)
        memmove(base + start + n, base + start, body)
        memcpy(base + start, prefix, n)
        self.size += n
        return 0

    cdef bytes result(self):
        return PyByteArray_AS_STRING(self.data)[: self.size]


cdef inline str _text(object value):
    return "" if value is None else str(value)


cdef inline int _string_field(_Buffer out, unsigned char key, str value) except -1:
    if value:
        out.byte(key)
        out.text(value)
    return 0


cdef bytes _identity(str tenant, str surface, str route, str model, str version, str arm,
                     str contract):
    cache_key = (tenant, surface, route, model, version, arm, contract)
    found = _identities.get(cache_key)
    if found is not None:
        return found
    cdef _Buffer out = _Buffer()
    _string_field(out, TENANT, tenant)
    _string_field(out, SURFACE, surface)
    _string_field(out, ROUTE, route)
    _string_field(out, MODEL, model)
    _string_field(out, VERSION, version)
    _string_field(out, ARM, arm)
    _string_field(out, CONTRACT_VERSION, contract)
    encoded = out.result()
    if len(_identities) >= _CACHE_LIMIT:
        _identities.clear()
    _identities[cache_key] = encoded
    return encoded


cdef bytes _layout(tuple names):
    """FeatureBlock.numeric_names of one column layout."""
    found = _layouts.get(names)
    if found is not None:
        return found
    cdef _Buffer out = _Buffer()
    for name in names:
        out.byte(F1_LEN)
        out.text(name)
    encoded = out.result()
    if len(_layouts) >= _CACHE_LIMIT:
        _layouts.clear()
    _layouts[names] = encoded
    return encoded


cdef int _string_column(_Buffer out, str name, list values, bint hashed) except -1:
    out.byte(F3_LEN)  # FeatureBlock.strings
    cdef Py_ssize_t start = out.mark()
    out.byte(F1_LEN)
    out.text(name)
    for value in values:
        out.byte(F2_LEN)
        out.text(value)
    if hashed:
        out.byte(F3_VARINT)
        out.byte(1)
    out.close_message(start)
    return 0


def encode_event(pending, str event_id, bytes hash_key, redact, Py_ssize_t max_columns):
    request = pending.request
    response = pending.response
    options = request.options
    cdef dict answered = response.parameters
    coverage = pending.coverage
    columns = event_columns(pending, hash_key, redact, max_columns)
    cdef Py_ssize_t rows = columns.rows
    cdef _Buffer out = _Buffer()
    cdef Py_ssize_t start, block_start

    _string_field(out, EVENT_ID, event_id)
    _string_field(out, REQUEST_ID, pending.request_id)
    if pending.event_time_us:
        out.byte(EVENT_TIME)
        out.varint(<uint64_t><long long>pending.event_time_us)
    identity = _identity(
        options.tenant,
        options.surface,
        _text(answered.get("route")) or request.model_name,
        response.model_name,
        response.model_version,
        _text(answered.get("arm")) or "primary",
        coverage.contract_version if coverage is not None else "",
    )
    out.raw(identity, len(identity))
    if rows:
        out.byte(ROWS)
        out.varint(<uint64_t><long long>rows)
    cdef long long cached = int(answered.get("cached_rows", 0))
    if cached:
        out.key2(CACHED_ROWS)
        out.varint(<uint64_t>cached)
    fallback = fallback_text(answered)
    if fallback:
        out.key2(FALLBACK)
        out.text(fallback)
    out.key2(QUEUE_MS)
    out.double(float(answered.get("queue_us", 0)) / 1000)
    out.key2(COMPUTE_MS)
    out.double(float(answered.get("compute_us", 0)) / 1000)
    out.key2(TOTAL_MS)
    out.double(pending.total_ms)
    out.key2(COST)
    out.double(float(answered.get("cost", 0.0)))
    entity = options.entity_key
    if entity:
        out.key2(ENTITY_KEY)
        out.text(entity)
    for key, value in options.segments.items():
        out.byte(SEGMENTS)
        start = out.mark()
        out.byte(F1_LEN)
        out.text(key)
        out.byte(F2_LEN)
        out.text(value)
        out.close_message(start)
    if coverage is not None:
        for feature, counts in zip(coverage.features, coverage.counts.tolist(), strict=True):
            out.key2(COVERAGE)
            start = out.mark()
            out.byte(F1_LEN)
            out.text(feature)
            for field, count in enumerate(counts):
                if count:
                    out.byte(<unsigned char>((field + 2) << 3))
                    out.varint(<uint64_t><long long>count)
            out.close_message(start)
    if columns.strings or columns.numeric_names:
        out.byte(FEATURES)
        block_start = out.mark()
        for name, values, hashed in columns.strings:
            _string_column(out, name, values, hashed)
        if columns.numeric_names:
            layout = _layout(tuple(columns.numeric_names))
            out.raw(layout, len(layout))
            out.byte(F2_LEN)
            out.blob(columns.numbers)
        out.close_message(block_start)
    for name, data, width in columns.outputs:
        out.byte(OUTPUTS)
        start = out.mark()
        out.byte(F1_LEN)
        out.text(name)
        out.byte(F2_LEN)
        out.blob(data)
        if width:
            out.byte(F3_VARINT)
            out.varint(<uint64_t><long long>width)
        out.close_message(start)
    return out.result()
