# cython: language_level=3
"""Feature assembly kernel, native twin of gateway/features/_kernel_py.py (the specification).

One pass per feature over the batch. Numeric features run without the GIL on typed
memoryviews. Categorical values are looked up in an open-addressing hash table (FNV-1a 64) over
the vocabulary's UTF-8 bytes: no Python dict call per value, only a pointer read per element.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_Check, PyBytes_GET_SIZE
from cpython.ref cimport PyObject
from libc.math cimport INFINITY, NAN, isnan, log1p
from libc.stdint cimport int8_t, int32_t, int64_t, uint64_t
from libc.string cimport memcmp

import numpy as np


# The codes of gateway/features/contract.py and _kernel_py.py (checked by the parity tests).
cdef enum:
    K_CATEGORICAL = 1
    NULL_REJECTED = 1
    OUT_OF_RANGE = 2
    NOT_BYTES = 3
    RANGE_NONE = 0
    RANGE_REJECT = 1
    RANGE_CLIP = 2
    STEP_STANDARDIZE = 1
    STEP_LOG1P = 2
    STEP_CLIP = 3
    STEP_BUCKETIZE = 4


cdef inline uint64_t _fnv1a(const unsigned char* p, Py_ssize_t n) noexcept nogil:
    cdef uint64_t h = 14695981039346656037ULL
    cdef Py_ssize_t i
    for i in range(n):
        h ^= p[i]
        h *= 1099511628211ULL
    return h


cdef inline double _c_log1p(double x) noexcept nogil:
    if x > -1.0:
        return log1p(x)
    return -INFINITY if x == -1.0 else NAN


cdef class Prepared:
    """The plan's arrays as typed views, plus one hash table per categorical feature."""

    cdef readonly object plan
    cdef const int8_t[::1] kinds, null_reject, range_policy, one_hot, step_code
    cdef const int64_t[::1] offsets, step_start, step_count, bound_start, bound_count
    cdef const double[::1] defaults, range_lo, range_hi, step_a, step_b, bounds
    # Hash tables: feature f owns slots[table_start[f] : table_start[f] + table_mask[f] + 1];
    # a slot holds 0 (empty) or 1 + the index of a vocabulary entry into entry_*.
    cdef int32_t[::1] slots
    cdef int64_t[::1] table_start, table_mask, vocab_first
    cdef int64_t[::1] entry_offset, entry_length
    cdef bytes blob
    cdef const unsigned char* blob_ptr

    def __init__(self, plan):
        self.plan = plan
        self.kinds = plan.kinds
        self.null_reject = plan.null_reject
        self.range_policy = plan.range_policy
        self.one_hot = plan.one_hot
        self.step_code = plan.step_code
        self.offsets = plan.offsets
        self.step_start = plan.step_start
        self.step_count = plan.step_count
        self.bound_start = plan.bound_start
        self.bound_count = plan.bound_count
        self.defaults = plan.defaults
        self.range_lo = plan.range_lo
        self.range_hi = plan.range_hi
        self.step_a = plan.step_a
        self.step_b = plan.step_b
        self.bounds = plan.bounds
        self._build_tables(plan.vocab)

    def _build_tables(self, vocab):
        n_features = len(vocab)
        starts = np.zeros(n_features, dtype=np.int64)
        masks = np.zeros(n_features, dtype=np.int64)
        firsts = np.zeros(n_features, dtype=np.int64)
        values = []
        total = 0
        for f, words in enumerate(vocab):
            firsts[f] = len(values)
            if words is None:
                continue
            size = 8
            while size < 2 * len(words):
                size *= 2
            starts[f] = total
            masks[f] = size - 1
            total += size
            values.extend(words)
        offsets = np.zeros(len(values), dtype=np.int64)
        lengths = np.zeros(len(values), dtype=np.int64)
        position = 0
        for i, word in enumerate(values):
            offsets[i] = position
            lengths[i] = len(word)
            position += len(word)
        self.blob = b"".join(values) + b"\0"
        self.blob_ptr = <const unsigned char*>PyBytes_AS_STRING(self.blob)
        self.entry_offset = offsets
        self.entry_length = lengths
        self.table_start = starts
        self.table_mask = masks
        self.vocab_first = firsts
        self.slots = np.zeros(max(total, 1), dtype=np.int32)
        self._fill([0 if words is None else len(words) for words in vocab])

    cdef void _fill(self, list sizes):
        cdef Py_ssize_t g, i, entry, slot, length
        cdef int64_t mask, start
        for g in range(len(sizes)):
            mask = self.table_mask[g]
            start = self.table_start[g]
            for i in range(<Py_ssize_t>sizes[g]):
                entry = self.vocab_first[g] + i
                length = self.entry_length[entry]
                slot = <Py_ssize_t>(
                    _fnv1a(self.blob_ptr + self.entry_offset[entry], length) & <uint64_t>mask
                )
                while self.slots[start + slot] != 0:
                    slot = (slot + 1) & mask
                self.slots[start + slot] = <int32_t>(entry + 1)

    cdef inline int64_t bucket(self, Py_ssize_t f, const unsigned char* p, Py_ssize_t n) noexcept nogil:
        """1 + the value's vocabulary position, or 0 when it is out of vocabulary."""
        cdef int64_t mask = self.table_mask[f]
        cdef int64_t start = self.table_start[f]
        cdef int64_t slot = <int64_t>(_fnv1a(p, n) & <uint64_t>mask)
        cdef int32_t held
        cdef int64_t entry
        while True:
            held = self.slots[start + slot]
            if held == 0:
                return 0
            entry = held - 1
            if self.entry_length[entry] == n and memcmp(
                self.blob_ptr + self.entry_offset[entry], p, n
            ) == 0:
                return entry - self.vocab_first[f] + 1
            slot = (slot + 1) & mask


def prepare(plan):
    return Prepared(plan)


cdef double _apply_steps(Prepared prep, Py_ssize_t f, double v) noexcept nogil:
    cdef Py_ssize_t s, lo, hi, mid, first
    cdef int8_t code
    cdef Py_ssize_t start = prep.step_start[f]
    for s in range(start, start + prep.step_count[f]):
        code = prep.step_code[s]
        if code == STEP_STANDARDIZE:
            v = (v - prep.step_a[s]) / prep.step_b[s]
        elif code == STEP_LOG1P:
            v = _c_log1p(v)
        elif code == STEP_CLIP:
            if v < prep.step_a[s]:
                v = prep.step_a[s]
            elif v > prep.step_b[s]:
                v = prep.step_b[s]
        elif code == STEP_BUCKETIZE:
            if isnan(v):
                v = 0.0
            else:
                first = prep.bound_start[s]
                lo = 0
                hi = prep.bound_count[s]
                while lo < hi:  # the number of boundaries <= v
                    mid = (lo + hi) // 2
                    if prep.bounds[first + mid] <= v:
                        lo = mid + 1
                    else:
                        hi = mid
                v = <double>lo
    return v


cdef int _numeric(
    Prepared prep,
    Py_ssize_t f,
    const double[::1] column,
    bint absent,
    Py_ssize_t rows,
    float[:, ::1] out,
    int64_t[:, ::1] counts,
    Py_ssize_t* bad_row,
) noexcept nogil:
    cdef Py_ssize_t r
    cdef Py_ssize_t offset = prep.offsets[f]
    cdef bint reject_null = prep.null_reject[f] != 0
    cdef int8_t policy = prep.range_policy[f]
    cdef double lo = prep.range_lo[f]
    cdef double hi = prep.range_hi[f]
    cdef double default = prep.defaults[f]
    cdef double v
    cdef int64_t present = 0, defaulted = 0, outside = 0
    for r in range(rows):
        v = NAN if absent else column[r]
        if isnan(v):
            if reject_null:
                bad_row[0] = r
                return NULL_REJECTED
            v = default
            defaulted += 1
        else:
            present += 1
            if policy != RANGE_NONE and (v < lo or v > hi):
                if policy == RANGE_REJECT:
                    bad_row[0] = r
                    return OUT_OF_RANGE
                outside += 1
                if policy == RANGE_CLIP:
                    v = lo if v < lo else hi
        out[r, offset] = <float>_apply_steps(prep, f, v)
    counts[f, 0] += present
    counts[f, 1] += defaulted
    counts[f, 2] += outside
    return 0


cdef int _categorical(
    Prepared prep,
    Py_ssize_t f,
    object column,
    Py_ssize_t rows,
    float[:, ::1] out,
    int64_t[:, ::1] counts,
    Py_ssize_t* bad_row,
):
    cdef Py_ssize_t r
    cdef Py_ssize_t offset = prep.offsets[f]
    cdef bint reject_null = prep.null_reject[f] != 0
    cdef bint one_hot = prep.one_hot[f] != 0
    cdef int64_t default = <int64_t>prep.defaults[f]
    cdef int64_t bucket
    cdef int64_t present = 0, defaulted = 0, oov = 0
    cdef object[::1] items
    cdef object item
    cdef Py_ssize_t length
    cdef bint absent = column is None
    if not absent:
        items = column
    for r in range(rows):
        if absent:
            length = 0
        else:
            item = items[r]
            if item is None:
                length = 0
            elif PyBytes_Check(item):
                length = PyBytes_GET_SIZE(item)
            else:
                bad_row[0] = r
                return NOT_BYTES
        if length == 0:
            if reject_null:
                bad_row[0] = r
                return NULL_REJECTED
            bucket = default
            defaulted += 1
        else:
            bucket = prep.bucket(f, <const unsigned char*>PyBytes_AS_STRING(item), length)
            present += 1
            if bucket == 0:
                oov += 1
        if one_hot:
            out[r, offset + bucket] = 1.0
        else:
            out[r, offset] = <float>bucket
    counts[f, 0] += present
    counts[f, 1] += defaulted
    counts[f, 3] += oov
    return 0


_EMPTY = np.zeros(0, dtype=np.float64)


def run(Prepared prep, list columns, Py_ssize_t rows, float[:, ::1] out, int64_t[:, ::1] counts):
    """Fill ``out`` and ``counts``; None, or (feature, row, code) of the first bad value."""
    cdef Py_ssize_t f
    cdef Py_ssize_t bad_row = 0
    cdef int code
    cdef const double[::1] numbers
    cdef bint absent
    for f in range(prep.kinds.shape[0]):
        column = columns[f]
        if prep.kinds[f] == K_CATEGORICAL:
            code = _categorical(prep, f, column, rows, out, counts, &bad_row)
        else:
            absent = column is None
            numbers = _EMPTY if absent else column
            with nogil:
                code = _numeric(prep, f, numbers, absent, rows, out, counts, &bad_row)
        if code != 0:
            return f, bad_row, code
    return None
