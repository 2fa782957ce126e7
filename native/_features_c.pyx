# cython: language_level=3
"""Feature assembly kernel, native twin of gateway/features/_kernel_py.py (the specification).

Numeric features are processed a column at a time without the GIL: values are read in their
own dtype (float32/64, int32/64, bool; no conversion copy per request) into a float64 scratch
column, nulls and the range policy are applied, then each transform step runs as a tight loop
over the column, and the result is written as float32 into the output's strided column.
Categorical values are looked up in one open-addressing hash table per feature over the
vocabulary's UTF-8 bytes: no Python call per value, a pointer read and a short hash.
"""

cimport cython
cimport numpy as cnp
from cpython.ref cimport PyObject
from libc.math cimport INFINITY, NAN, isnan, log1p
from libc.stdint cimport int8_t, int32_t, int64_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcmp, memcpy

from _wire cimport next_element, walk_bytes

import numpy as np

cnp.import_array()

cdef extern from *:
    void _prefetch "__builtin_prefetch"(const void* address) nogil

cdef extern from "Python.h":
    bint _is_bytes "PyBytes_Check"(PyObject* o) nogil
    Py_ssize_t _bytes_size "PyBytes_GET_SIZE"(PyObject* o) nogil
    char* _bytes_data "PyBytes_AS_STRING"(PyObject* o) nogil
    PyObject* _none "Py_None"
    void* _type_of "Py_TYPE"(PyObject* o) nogil
    void* _bytes_type "(&PyBytes_Type)"

# The kernel's codes: the values of gateway/features/_plan.py, where each is defined (exposed
# as CODES below; tests/unit/test_native_codes.py checks them against _plan's).
cdef enum:
    NUMERIC = 0
    CATEGORICAL = 1
    RANGE_NONE = 0
    RANGE_REJECT = 1
    RANGE_CLIP = 2
    RANGE_FLAG = 3  # counted out of range, kept as is
    STEP_STANDARDIZE = 1
    STEP_LOG1P = 2
    STEP_CLIP = 3
    STEP_BUCKETIZE = 4
    ERROR_NULL_REJECTED = 1
    ERROR_OUT_OF_RANGE = 2
    ERROR_NOT_BYTES = 3
    COUNT_PRESENT = 0
    COUNT_DEFAULTED = 1
    COUNT_OUT_OF_RANGE = 2
    COUNT_OOV = 3

CODES = {
    "NUMERIC": NUMERIC,
    "CATEGORICAL": CATEGORICAL,
    "RANGE_NONE": RANGE_NONE,
    "RANGE_REJECT": RANGE_REJECT,
    "RANGE_CLIP": RANGE_CLIP,
    "RANGE_FLAG": RANGE_FLAG,
    "STEP_STANDARDIZE": STEP_STANDARDIZE,
    "STEP_LOG1P": STEP_LOG1P,
    "STEP_CLIP": STEP_CLIP,
    "STEP_BUCKETIZE": STEP_BUCKETIZE,
    "ERROR_NULL_REJECTED": ERROR_NULL_REJECTED,
    "ERROR_OUT_OF_RANGE": ERROR_OUT_OF_RANGE,
    "ERROR_NOT_BYTES": ERROR_NOT_BYTES,
    "COUNT_PRESENT": COUNT_PRESENT,
    "COUNT_DEFAULTED": COUNT_DEFAULTED,
    "COUNT_OUT_OF_RANGE": COUNT_OUT_OF_RANGE,
    "COUNT_OOV": COUNT_OOV,
}

# The kernel's own sizes (the parity tests draw cases past both).
cdef enum:
    LINEAR_BUCKETS = 32  # up to this many boundaries, count them branch-free
    PREFETCH_AHEAD = 8  # categorical rows: each value is its own heap object
    BLOCK = 256  # rows per pass over the features: the block's output stays in L1

SIZES = {"block_rows": BLOCK, "linear_buckets": LINEAR_BUCKETS}

# How a column is read.
cdef enum:
    COL_OBJECTS = -3  # categorical: an object array of bytes / None
    COL_RAW = -4  # categorical: the raw OIP BYTES buffer (length-prefixed values)
    COL_ABSENT = 0
    COL_F64 = 1
    COL_F32 = 2
    COL_I64 = 3
    COL_I32 = 4
    COL_BOOL = 5


cdef inline uint64_t _tail(const unsigned char* p, Py_ssize_t n) noexcept nogil:
    """1 to 7 bytes as one word, from at most two overlapping fixed-size loads."""
    cdef uint32_t a, b
    if n >= 4:
        memcpy(&a, p, 4)
        memcpy(&b, p + n - 4, 4)
        return (<uint64_t>a << 32) | b
    return (<uint64_t>p[0] << 16) | (<uint64_t>p[n >> 1] << 8) | p[n - 1]


cdef inline uint64_t _hash(const unsigned char* p, Py_ssize_t n) noexcept nogil:
    """8 bytes per step (multiply-rotate, as FxHash), then a final avalanche."""
    cdef uint64_t h = <uint64_t>n * 0x9E3779B97F4A7C15ULL
    cdef uint64_t word
    while n >= 8:
        memcpy(&word, p, 8)
        h = (((h << 5) | (h >> 59)) ^ word) * 0x517CC1B727220A95ULL
        p += 8
        n -= 8
    if n > 0:
        h = (((h << 5) | (h >> 59)) ^ _tail(p, n)) * 0x517CC1B727220A95ULL
    h ^= h >> 33
    h *= 0xFF51AFD7ED558CCDULL
    h ^= h >> 33
    return h


cdef inline bint _same(const unsigned char* a, const unsigned char* b, Py_ssize_t n) noexcept nogil:
    """Equal bytes, compared a word at a time (the last word may overlap the one before)."""
    cdef uint64_t x, y
    cdef Py_ssize_t i = 0
    if n < 8:
        return n == 0 or _tail(a, n) == _tail(b, n)
    while i + 8 < n:
        memcpy(&x, a + i, 8)
        memcpy(&y, b + i, 8)
        if x != y:
            return False
        i += 8
    memcpy(&x, a + n - 8, 8)
    memcpy(&y, b + n - 8, 8)
    return x == y


cdef inline double _c_log1p(double x) noexcept nogil:
    if x > -1.0:
        return log1p(x)
    return -INFINITY if x == -1.0 else NAN


cdef inline const void* _data(object array):
    return cnp.PyArray_DATA(<cnp.ndarray>array)


@cython.final  # methods called directly (and inlined), not through a vtable
cdef class Prepared:
    """The plan's arrays as raw pointers (the plan keeps them alive), plus the hash tables."""

    cdef readonly object plan
    cdef Py_ssize_t n_features
    cdef const int8_t* kinds
    cdef const int8_t* null_reject
    cdef const int8_t* range_policy
    cdef const int8_t* one_hot
    cdef const int8_t* step_code
    cdef const int64_t* offsets
    cdef const int64_t* step_start
    cdef const int64_t* step_count
    cdef const int64_t* bound_start
    cdef const int64_t* bound_count
    cdef const double* defaults
    cdef const double* range_lo
    cdef const double* range_hi
    cdef const double* step_a
    cdef const double* step_b
    cdef const double* bounds
    # Feature f's table: slots[table_start[f] : table_start[f] + table_mask[f] + 1], each 0
    # (empty) or 1 + a global vocabulary entry; entry e spans blob[entry_offset[e]:+length].
    cdef object _keep
    cdef const int32_t* slots
    cdef const int64_t* table_start
    cdef const int64_t* table_mask
    cdef const int64_t* vocab_first
    cdef const int64_t* entry_offset
    cdef const int64_t* entry_length
    cdef const uint64_t* entry_hash
    cdef const unsigned char* blob

    def __init__(self, plan):
        self.plan = plan
        self.n_features = len(plan.kinds)
        self.kinds = <const int8_t*>_data(plan.kinds)
        self.null_reject = <const int8_t*>_data(plan.null_reject)
        self.range_policy = <const int8_t*>_data(plan.range_policy)
        self.one_hot = <const int8_t*>_data(plan.one_hot)
        self.step_code = <const int8_t*>_data(plan.step_code)
        self.offsets = <const int64_t*>_data(plan.offsets)
        self.step_start = <const int64_t*>_data(plan.step_start)
        self.step_count = <const int64_t*>_data(plan.step_count)
        self.bound_start = <const int64_t*>_data(plan.bound_start)
        self.bound_count = <const int64_t*>_data(plan.bound_count)
        self.defaults = <const double*>_data(plan.defaults)
        self.range_lo = <const double*>_data(plan.range_lo)
        self.range_hi = <const double*>_data(plan.range_hi)
        self.step_a = <const double*>_data(plan.step_a)
        self.step_b = <const double*>_data(plan.step_b)
        self.bounds = <const double*>_data(plan.bounds)
        self._build_tables(plan.vocab)

    def _build_tables(self, vocab):
        starts = np.zeros(len(vocab), dtype=np.int64)
        masks = np.zeros(len(vocab), dtype=np.int64)
        firsts = np.zeros(len(vocab), dtype=np.int64)
        words = []
        total = 0
        for f, values in enumerate(vocab):
            firsts[f] = len(words)
            if values is None:
                continue
            size = 8
            while size < 4 * len(values):  # load <= 1/4: probes rarely go past one slot
                size *= 2
            starts[f] = total
            masks[f] = size - 1
            total += size
            words.extend(values)
        lengths = np.array([len(w) for w in words], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        blob = b"".join(words) + b"\0"
        slots = np.zeros(max(total, 1), dtype=np.int32)
        hashes = np.zeros(max(len(words), 1), dtype=np.uint64)
        self._keep = (starts, masks, firsts, lengths, offsets, blob, slots, hashes)
        self.entry_hash = <const uint64_t*>_data(hashes)
        self.table_start = <const int64_t*>_data(starts)
        self.table_mask = <const int64_t*>_data(masks)
        self.vocab_first = <const int64_t*>_data(firsts)
        self.entry_length = <const int64_t*>_data(lengths)
        self.entry_offset = <const int64_t*>_data(offsets)
        self.blob = <const unsigned char*>(<char*>blob)
        self.slots = <const int32_t*>_data(slots)
        _fill(
            self,
            <int32_t*>_data(slots),
            <uint64_t*>_data(hashes),
            [0 if v is None else len(v) for v in vocab],
        )

    cdef inline int64_t bucket(self, Py_ssize_t f, const unsigned char* p, Py_ssize_t n) noexcept nogil:
        """1 + the value's vocabulary position, or 0 when it is out of vocabulary."""
        cdef int64_t mask = self.table_mask[f]
        cdef const int32_t* table = self.slots + self.table_start[f]
        cdef uint64_t h = _hash(p, n)
        cdef int64_t slot = <int64_t>(h & <uint64_t>mask)
        cdef int32_t held
        cdef int64_t entry
        while True:
            held = table[slot]
            if held == 0:
                return 0
            entry = held - 1
            if self.entry_hash[entry] == h and self.entry_length[entry] == n and _same(
                self.blob + self.entry_offset[entry], p, n
            ):
                return entry - self.vocab_first[f] + 1
            slot = (slot + 1) & mask


cdef void _fill(Prepared prep, int32_t* slots, uint64_t* hashes, list sizes):
    cdef Py_ssize_t f, i, entry, slot
    cdef int64_t mask
    cdef int32_t* table
    for f in range(len(sizes)):
        mask = prep.table_mask[f]
        table = slots + prep.table_start[f]
        for i in range(<Py_ssize_t>sizes[f]):
            entry = prep.vocab_first[f] + i
            hashes[entry] = _hash(prep.blob + prep.entry_offset[entry], prep.entry_length[entry])
            slot = <Py_ssize_t>(hashes[entry] & <uint64_t>mask)
            while table[slot] != 0:
                slot = (slot + 1) & mask
            table[slot] = <int32_t>(entry + 1)


def prepare(plan):
    return Prepared(plan)


cdef void _convert(int kind, const void* src, Py_ssize_t first, Py_ssize_t rows, double* v) noexcept nogil:
    """Rows [first, first + rows) of a column as float64 (NaN for an absent column)."""
    cdef Py_ssize_t r
    if kind == COL_F64:
        memcpy(v, (<const double*>src) + first, rows * sizeof(double))
    elif kind == COL_F32:
        for r in range(rows):
            v[r] = (<const float*>src)[first + r]
    elif kind == COL_I64:
        for r in range(rows):
            v[r] = <double>(<const int64_t*>src)[first + r]
    elif kind == COL_I32:
        for r in range(rows):
            v[r] = <double>(<const int32_t*>src)[first + r]
    elif kind == COL_BOOL:
        for r in range(rows):
            v[r] = <double>((<const uint8_t*>src)[first + r] != 0)
    else:
        for r in range(rows):
            v[r] = NAN


cdef int _load(
    Prepared prep, Py_ssize_t f, int kind, const void* src, Py_ssize_t first, Py_ssize_t rows,
    double* v, int64_t* counts, Py_ssize_t* bad_row,
) noexcept nogil:
    """Rows [first, first + rows) of a column -> v (float64): nulls defaulted (or rejected),
    the range policy applied. On a bad value, its row and code; counts are then incomplete.

    Each step is its own loop over the block, with no data-dependent branch (random values
    would mispredict) so the compiler can vectorise it; a rejected value is looked for only
    when one exists. A default lies within the range (the contract checks it), so a null
    replaced by it is never outside.
    """
    cdef Py_ssize_t r
    cdef int8_t policy = prep.range_policy[f]
    cdef double lo = prep.range_lo[f], hi = prep.range_hi[f], default = prep.defaults[f], x
    cdef int64_t defaulted = 0, outside = 0
    cdef Py_ssize_t null_row = -1, range_row = -1
    _convert(kind, src, first, rows, v)
    for r in range(rows):
        defaulted += v[r] != v[r]
    if defaulted and prep.null_reject[f]:
        for r in range(rows):
            if v[r] != v[r]:
                null_row = r
                break
    for r in range(rows):
        x = v[r]
        v[r] = default if x != x else x
    if policy != RANGE_NONE:
        for r in range(rows):
            outside += (v[r] < lo) | (v[r] > hi)
        if outside and policy == RANGE_REJECT:
            for r in range(rows):
                if v[r] < lo or v[r] > hi:
                    range_row = r
                    break
        elif policy == RANGE_CLIP:
            for r in range(rows):
                x = v[r]
                x = lo if x < lo else x
                v[r] = hi if x > hi else x
    if null_row >= 0 or range_row >= 0:
        # A rejected null wins a tie: its row then holds the placeholder, not a value.
        if range_row < 0 or (null_row >= 0 and null_row <= range_row):
            bad_row[0] = first + null_row
            return ERROR_NULL_REJECTED
        bad_row[0] = first + range_row
        return ERROR_OUT_OF_RANGE
    counts[COUNT_PRESENT] += rows - defaulted
    counts[COUNT_DEFAULTED] += defaulted
    counts[COUNT_OUT_OF_RANGE] += outside
    return 0


cdef void _steps(Prepared prep, Py_ssize_t f, double* v, double* acc, Py_ssize_t rows) noexcept nogil:
    """Each transform step as one loop over the block."""
    cdef Py_ssize_t s, r, i, lo, hi, mid, n
    cdef double a, b, x, edge
    cdef int8_t code
    cdef const double* edges
    cdef Py_ssize_t start = prep.step_start[f]
    for s in range(start, start + prep.step_count[f]):
        a = prep.step_a[s]
        b = prep.step_b[s]
        code = prep.step_code[s]
        if code == STEP_STANDARDIZE:
            for r in range(rows):
                v[r] = (v[r] - a) / b
        elif code == STEP_LOG1P:
            for r in range(rows):
                v[r] = _c_log1p(v[r])
        elif code == STEP_CLIP:
            for r in range(rows):
                x = v[r]
                x = a if x < a else x
                v[r] = b if x > b else x
        elif code == STEP_BUCKETIZE:
            edges = prep.bounds + prep.bound_start[s]
            n = prep.bound_count[s]
            if n <= LINEAR_BUCKETS:  # the number of boundaries <= x (NaN counts none)
                for r in range(rows):
                    acc[r] = 0.0
                for i in range(n):
                    edge = edges[i]
                    for r in range(rows):
                        acc[r] += <double>(edge <= v[r])
                memcpy(v, acc, rows * sizeof(double))
            else:
                for r in range(rows):
                    x = v[r]
                    lo = 0
                    if not isnan(x):
                        hi = n
                        while lo < hi:
                            mid = (lo + hi) // 2
                            if edges[mid] <= x:
                                lo = mid + 1
                            else:
                                hi = mid
                    v[r] = <double>lo


cdef int _categorical(
    Prepared prep, Py_ssize_t f, int kind, const void* source, Py_ssize_t* cursor,
    Py_ssize_t first, Py_ssize_t rows, float* out, Py_ssize_t width, int64_t* counts,
    Py_ssize_t* bad_row,
) noexcept nogil:
    """Rows [first, first + rows): buckets written to ``out`` (the block's first row).

    A raw buffer is read from ``cursor`` on (blocks come in order); it was checked to hold
    exactly the column's values, and reads stay within it.
    """
    cdef Py_ssize_t r, length
    cdef Py_ssize_t offset = prep.offsets[f]
    cdef bint reject_null = prep.null_reject[f] != 0
    cdef bint one_hot = prep.one_hot[f] != 0
    cdef int64_t default = <int64_t>prep.defaults[f]
    cdef int64_t bucket
    cdef int64_t present = 0, defaulted = 0, oov = 0
    cdef PyObject** items = <PyObject**>source
    cdef PyObject* item = NULL
    cdef const unsigned char* value = NULL
    cdef const unsigned char* buffer = <const unsigned char*>source
    cdef Py_ssize_t last = first + rows - 1
    for r in range(rows):
        length = 0
        if kind == COL_RAW:
            length = next_element(buffer, cursor, &value)
        elif kind == COL_OBJECTS:
            if first + r + PREFETCH_AHEAD <= last:
                _prefetch(items[first + r + PREFETCH_AHEAD])
            item = items[first + r]
            if item != _none:
                if _type_of(item) != _bytes_type and not _is_bytes(item):  # exact type first
                    bad_row[0] = first + r
                    return ERROR_NOT_BYTES
                length = _bytes_size(item)
                value = <const unsigned char*>_bytes_data(item)
        if length == 0:
            if reject_null:
                bad_row[0] = first + r
                return ERROR_NULL_REJECTED
            bucket = default
            defaulted += 1
        else:
            bucket = prep.bucket(f, value, length)
            present += 1
            oov += bucket == 0
        if one_hot:
            out[r * width + offset + bucket] = 1.0
        else:
            out[r * width + offset] = <float>bucket
    counts[COUNT_PRESENT] += present
    counts[COUNT_DEFAULTED] += defaulted
    counts[COUNT_OOV] += oov
    return 0


cdef int _column_kind(object column) except -1:
    if column is None:
        return COL_ABSENT
    cdef int typenum = cnp.PyArray_TYPE(<cnp.ndarray>column)
    if typenum == cnp.NPY_FLOAT64:
        return COL_F64
    if typenum == cnp.NPY_FLOAT32:
        return COL_F32
    if typenum == cnp.NPY_INT64:
        return COL_I64
    if typenum == cnp.NPY_INT32:
        return COL_I32
    if typenum == cnp.NPY_BOOL:
        return COL_BOOL
    return -2  # anything else is read through a float64 copy


cdef inline bint _plain(object column):
    """1-D, C-contiguous, aligned, native byte order: readable in place."""
    cdef cnp.ndarray array = <cnp.ndarray>column
    return (
        cnp.PyArray_NDIM(array) == 1
        and cnp.PyArray_ISCARRAY_RO(array)
        and cnp.PyArray_ISNOTSWAPPED(array)
    )


cdef int _block(
    Prepared prep, const int* kinds, const void** sources, Py_ssize_t* cursors,
    Py_ssize_t first, Py_ssize_t rows, float* out, Py_ssize_t width, int64_t* counts,
    double* v, double* acc, Py_ssize_t* bad_row, Py_ssize_t* bad_feature,
) noexcept nogil:
    """Every feature over one block of rows; on bad values, the lowest (row, feature)."""
    cdef Py_ssize_t f, r, offset, row
    cdef int code, found = 0
    cdef float* block = out + first * width
    for f in range(prep.n_features):
        if prep.kinds[f] == CATEGORICAL:
            code = _categorical(
                prep, f, kinds[f], sources[f], cursors + f, first, rows, block, width,
                counts + 4 * f, &row,
            )
        else:
            code = _load(prep, f, kinds[f], sources[f], first, rows, v, counts + 4 * f, &row)
            if code == 0:
                _steps(prep, f, v, acc, rows)
                offset = prep.offsets[f]
                for r in range(rows):
                    block[r * width + offset] = <float>v[r]
        if code != 0 and (found == 0 or row < bad_row[0]):
            found = code
            bad_row[0] = row
            bad_feature[0] = f
    return found


def run(Prepared prep, list columns, Py_ssize_t rows, cnp.ndarray out, cnp.ndarray counts):
    """Fill ``out`` and ``counts``; None, or (feature, row, code) of the first bad value.

    Columns must not change during the call (it reads them without the GIL).
    """
    if not (cnp.PyArray_TYPE(out) == cnp.NPY_FLOAT32 and cnp.PyArray_ISCARRAY(out)
            and cnp.PyArray_NDIM(out) == 2 and out.shape[0] == rows):
        raise ValueError("out must be a C-contiguous float32 [rows, width] array")
    if not (cnp.PyArray_TYPE(counts) == cnp.NPY_INT64 and cnp.PyArray_ISCARRAY(counts)
            and counts.shape[0] == prep.n_features and counts.shape[1] == 4):
        raise ValueError("counts must be a C-contiguous int64 [features, 4] array")
    cdef Py_ssize_t n = prep.n_features
    cdef Py_ssize_t width = out.shape[1]
    cdef float* out_p = <float*>cnp.PyArray_DATA(out)
    cdef int64_t* counts_p = <int64_t*>cnp.PyArray_DATA(counts)
    cdef Py_ssize_t f, first, size, bad_row = 0, bad_feature = 0
    cdef int code = 0, kind
    # One allocation: two scratch blocks; per feature, the column's data pointer, raw-buffer
    # cursor and kind.
    cdef char* memory = <char*>malloc(
        2 * BLOCK * sizeof(double) + n * (sizeof(void*) + sizeof(Py_ssize_t) + sizeof(int))
    )
    if memory == NULL:
        raise MemoryError()
    cdef double* v = <double*>memory
    cdef double* acc = v + BLOCK
    cdef const void** sources = <const void**>(memory + 2 * BLOCK * sizeof(double))
    cdef Py_ssize_t* cursors = <Py_ssize_t*>(sources + n)
    cdef int* kinds = <int*>(cursors + n)
    keep = []  # converted columns live until the pass is over
    try:
        for f in range(n):
            column = columns[f]
            cursors[f] = 0
            if column is None:
                kinds[f] = COL_ABSENT
                sources[f] = NULL
                continue
            if prep.kinds[f] == CATEGORICAL and isinstance(column, bytes):
                # Exactly the column's values: reads then stay within the buffer.
                walk_bytes(<const unsigned char*><const char*>column, len(column), rows, None)
                keep.append(column)
                kinds[f] = COL_RAW
                sources[f] = <const void*><const char*>column
                continue
            if prep.kinds[f] == CATEGORICAL:
                if not (cnp.PyArray_TYPE(<cnp.ndarray>column) == cnp.NPY_OBJECT and _plain(column)):
                    column = np.ascontiguousarray(column, dtype=object).reshape(-1)
                kind = COL_OBJECTS
            else:
                kind = _column_kind(column)
                if kind == -2 or not _plain(column):
                    column = np.ascontiguousarray(column, dtype=np.float64).reshape(-1)
                    kind = COL_F64
            keep.append(column)
            kinds[f] = kind
            sources[f] = cnp.PyArray_DATA(<cnp.ndarray>column)
        with nogil:
            first = 0
            while first < rows:
                size = min(BLOCK, rows - first)
                code = _block(prep, kinds, sources, cursors, first, size, out_p, width,
                              counts_p, v, acc, &bad_row, &bad_feature)
                if code != 0:
                    break
                first += size
        if code != 0:
            return bad_feature, bad_row, code
        return None
    finally:
        free(memory)


def gather(
    dict index, tuple accepted, tensors, bint ignore_unknown, Py_ssize_t n_features
):
    """A request's raw-feature columns in contract order, and its rows, when every tensor is
    as Contract.assemble takes it (a known or ignored name, shape [N] or [N, 1], an accepted
    datatype, each feature once, the same N throughout, at least one feature); else None,
    and Contract's own loop says what is wrong. The same columns that loop makes: a BYTES
    tensor's wire buffer when it kept one, else its array, flattened."""
    cdef list columns = [None] * n_features
    cdef Py_ssize_t rows = -1, f, n
    for tensor in tensors:
        found = index.get(tensor.name)
        if found is None:
            if ignore_unknown:
                continue
            return None
        f = found
        # Tensor's slots, not its properties (a Python call each): the array, or the shape
        # of the BYTES wire buffer it kept instead.
        array = tensor._data
        shape = tensor._shape if array is None else array.shape
        n = len(shape)
        if not (n == 1 or (n == 2 and shape[1] == 1)):
            return None
        if tensor.datatype not in accepted[f] or columns[f] is not None:
            return None
        if rows < 0:
            rows = shape[0]
        elif shape[0] != rows:
            return None
        data = tensor.raw
        if data is None:
            data = tensor.data if array is None else array
            if n != 1:
                data = data.reshape(-1)
        columns[f] = data
    if rows < 0:
        return None
    return columns, rows
