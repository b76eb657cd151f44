# Included by _decode.pyx: the staging row, as COPY BINARY. Written by the decoder; restaged
# and cut for streamed transactions; read back for tests and dead letters.

# Its fixed start: Int16 field count, then _seq, _lsn and _op as COPY BINARY fields (Int32
# length, value: 8, 8 and 1 bytes). The table's columns, the old key and _u follow.
cdef enum:
    ROW_NFIELDS = 0
    ROW_SEQ_LEN = 2
    ROW_SEQ = 6
    ROW_LSN_LEN = 14
    ROW_LSN = 18
    ROW_OP_LEN = 26
    ROW_OP = 30
    ROW_HEAD = 31              # through _op
    FIELD_LEN = 4              # a field's Int32 length word (-1: NULL)
    COPY_SIGNATURE_LEN = 11    # of the COPY BINARY header
    COPY_HEADER_EXTENSION = 15  # its Int32 header extension length


cdef struct OpCounts:
    int64_t rows
    int64_t inserts
    int64_t updates
    int64_t deletes


cdef inline void count_op(OpCounts *c, char op) noexcept nogil:
    c.rows += 1
    if op == b'I':
        c.inserts += 1
    elif op == b'U':
        c.updates += 1
    else:
        c.deletes += 1


cdef inline char *put_int8(char *w, int64_t v) noexcept nogil:
    wr32(w, 8)
    wr64(w + FIELD_LEN, v)
    return w + FIELD_LEN + 8


cdef inline char *put_char(char *w, char v) noexcept nogil:
    wr32(w, 1)
    w[FIELD_LEN] = v
    return w + FIELD_LEN + 1


cdef inline char *put_bytes(char *w, const void *ptr, int32_t n) noexcept nogil:
    wr32(w, n)
    memcpy(w + FIELD_LEN, ptr, n)
    return w + FIELD_LEN + n


cdef inline char *put_null(char *w) noexcept nogil:
    wr32(w, -1)
    return w + FIELD_LEN


cdef inline int left_in_place(Field *f, int held) noexcept nogil:
    return held >= 0 and f.len >= BIG_VALUE


cdef int write_row(Rel *r, int64_t seq, uint64_t lsn, char op, Field *src, int key_only,
                   Field *okey, Field *fill, int held) noexcept nogil:
    """Append one staging row to the relation's COPY buffer.

    src: the row's fields; key_only: write only the key columns of src (a
    delete); okey: the old key, written into the _ok columns (a key change);
    fill: an old full image whose values replace unchanged-TOAST fields
    (REPLICA IDENTITY FULL sends it). held >= 0: the message may be kept as
    Decoder.held[held], and its big values are left there (a Seg each).
    0, 1 if a value was left in the message, -1 when out of memory.
    """
    cdef int kept = 0
    cdef int nsegs = r.nsegs
    cdef Py_ssize_t seg_bytes = r.seg_bytes
    cdef int i, k, ncols = r.ncols
    cdef int nbits = 0
    cdef Py_ssize_t size
    cdef Field *f
    cdef char *w
    cdef int ulen = (ncols + 7) >> 3
    cdef uint8_t ubits[UBITS_MAX]

    size = ROW_HEAD + FIELD_LEN + ulen    # the fixed start, and _u at its largest
    for i in range(ncols):
        size += 4
        if key_only and not r.is_key[i]:
            continue
        f = &src[i]
        if f.kind == b'u' and fill != NULL and has_value(&fill[i]):
            f = &fill[i]
        if has_value(f) and not left_in_place(f, held):
            size += f.len
    for k in range(r.nkey):
        size += 4
        if okey != NULL and has_value(&okey[r.key_idx[k]]) \
                and not left_in_place(&okey[r.key_idx[k]], held):
            size += okey[r.key_idx[k]].len
    if buf_reserve(&r.buf, size) < 0:
        return -1
    # The row is written whole or not at all: a failure takes its Segs back.

    memset(ubits, 0, ulen)
    w = r.buf.data + r.buf.len
    wr16(w, <int16_t>(3 + ncols + r.nkey + 1))
    w = put_int8(w + ROW_SEQ_LEN, seq)
    w = put_int8(w, <int64_t>lsn)
    w = put_char(w, op)
    for i in range(ncols):
        if key_only and not r.is_key[i]:
            w = put_null(w)
            continue
        f = &src[i]
        if f.kind == b'u' and fill != NULL and has_value(&fill[i]):
            f = &fill[i]
        if has_value(f) and left_in_place(f, held):
            wr32(w, f.len)      # its bytes stay in the message (a Seg)
            w += FIELD_LEN
            if rel_seg(r, w - r.buf.data, f, held) < 0:
                r.nsegs, r.seg_bytes = nsegs, seg_bytes
                return -1
            kept = 1
        elif has_value(f):
            w = put_bytes(w, f.ptr, f.len)
        else:
            if f.kind == b'u':
                ubits[i >> 3] |= <uint8_t>(1 << (i & 7))
                nbits += 1
            w = put_null(w)
    for k in range(r.nkey):
        if okey != NULL and has_value(&okey[r.key_idx[k]]):
            f = &okey[r.key_idx[k]]
            if left_in_place(f, held):
                wr32(w, f.len)
                w += FIELD_LEN
                if rel_seg(r, w - r.buf.data, f, held) < 0:
                    r.nsegs, r.seg_bytes = nsegs, seg_bytes
                    return -1
                kept = 1
            else:
                w = put_bytes(w, f.ptr, f.len)
        else:
            w = put_null(w)
    if nbits:
        w = put_bytes(w, ubits, ulen)
        r.n_unchanged += 1
    else:
        w = put_null(w)
    r.buf.len = w - r.buf.data
    r.rows += 1
    return kept


cdef int xid_in(const uint32_t *xids, Py_ssize_t n, uint32_t xid) noexcept nogil:
    cdef Py_ssize_t lo = 0, hi = n, mid
    while lo < hi:
        mid = (lo + hi) >> 1
        if xids[mid] < xid:
            lo = mid + 1
        else:
            hi = mid
    return lo < n and xids[lo] == xid


cdef int row_fields(const char *q, const char *end) noexcept nogil:
    """The field count of the staging row at q, -1 unless it starts _seq, _lsn, _op."""
    cdef int nf
    if end - q < ROW_HEAD:
        return -1
    nf = <int16_t>rd16(q + ROW_NFIELDS)
    if nf < 4 or rd32(q + ROW_SEQ_LEN) != 8 or rd32(q + ROW_LSN_LEN) != 8 \
            or rd32(q + ROW_OP_LEN) != 1:
        return -1
    return nf


cdef const char *row_end(const char *q, const char *end, int nf, int32_t *last) noexcept nogil:
    """Past the staging row at q (nf fields); *last = its last field's length. NULL if cut short."""
    cdef int i
    cdef int32_t flen = -1
    q += ROW_SEQ_LEN      # the first field's length word
    for i in range(nf):
        if end - q < 4:
            return NULL
        flen = <int32_t>rd32(q)
        q += 4
        if flen > 0:
            if end - q < flen:
                return NULL
            q += flen
    last[0] = flen
    return q


def restage(data, aborted, uint64_t lsn, int64_t delta):
    """A streamed transaction's staging rows, made those of a committed one.

    data: whole staging rows (no COPY header or trailer) whose _lsn field holds
    the (sub)transaction xid the decoder wrote. Rows of an xid in ``aborted``
    are dropped (a subtransaction the source rolled back); the others get
    _lsn = lsn (the commit LSN) and _seq + delta. In place: data must be writable
    (a bytearray), and the rows kept are moved to its front. Returns (bytes kept,
    rows, inserts, updates, deletes, rows_with_unchanged_toast).
    """
    cdef unsigned char[:] view = data
    cdef Py_ssize_t n = view.shape[0]
    cdef char *p = <char *>&view[0] if n else NULL
    cdef const char *row
    cdef const char *end = p + n
    cdef const char *q
    cdef char *w
    cdef char *out
    cdef Py_ssize_t size, nabort
    cdef int nf, i, bad = 0
    cdef int32_t flen = -1
    cdef OpCounts counts
    cdef int64_t unch = 0, old_seq
    cdef char op
    cdef uint32_t xid
    cdef uint32_t *xids
    ordered = sorted(int(x) for x in aborted)
    nabort = len(ordered)
    xids = <uint32_t *>malloc(max(1, nabort) * sizeof(uint32_t))
    if xids == NULL:
        raise MemoryError()
    for i, x in enumerate(ordered):
        xids[i] = <uint32_t>x
    out = p
    w = out
    memset(&counts, 0, sizeof(OpCounts))
    with nogil:
        q = p
        while q < end:
            row = q
            nf = row_fields(q, end)
            if nf < 0:
                bad = 1
                break
            xid = <uint32_t>rd64(q + ROW_LSN)
            q = row_end(q, end, nf, &flen)
            if q == NULL:
                bad = 1
                break
            if nabort and xid_in(xids, nabort, xid):
                continue
            size = q - row
            # Read before the move: kept rows slide over the dropped ones' bytes.
            old_seq = <int64_t>rd64(row + ROW_SEQ)
            op = row[ROW_OP]
            if w != row:
                memmove(w, row, size)
            wr64(w + ROW_SEQ, old_seq + delta)
            wr64(w + ROW_LSN, <int64_t>lsn)
            count_op(&counts, op)
            if flen >= 0:      # the last field, _u: set when a column came as unchanged TOAST
                unch += 1
            w += size
    free(xids)
    if bad:
        raise DecodeError("malformed staging rows")
    return w - out, counts.rows, counts.inserts, counts.updates, counts.deletes, unch


def cut_rows(data, bounds):
    """Staging rows (no COPY header or trailer) cut before the first row whose _seq
    reaches each of ``bounds`` (ascending).

    Returns one (offset, size, rows, inserts, updates, deletes) per piece,
    len(bounds) + 1 of them: a streamed chunk is merged piece by piece with a
    savepoint between them, where a subtransaction begins.
    """
    cdef const unsigned char[:] view = data
    cdef Py_ssize_t n = view.shape[0]
    cdef const char *p = <const char *>&view[0] if n else NULL
    cdef const char *end = p + n
    cdef const char *q = p
    cdef const char *row
    cdef int nf, bad = 0
    cdef int32_t flen = -1
    cdef int64_t bound
    cdef Py_ssize_t start = 0
    cdef OpCounts counts
    limits = [int(b) for b in bounds]
    if limits != sorted(limits):
        raise ValueError("bounds must be ascending")
    pieces = []
    for bound in limits + [INT64_MAX]:
        memset(&counts, 0, sizeof(OpCounts))
        with nogil:
            while q < end:
                row = q
                nf = row_fields(q, end)
                if nf < 0:
                    bad = 1
                    break
                if <int64_t>rd64(q + ROW_SEQ) >= bound:
                    break
                q = row_end(q, end, nf, &flen)
                if q == NULL:
                    bad = 1
                    break
                count_op(&counts, row[ROW_OP])
        if bad:
            raise DecodeError("malformed staging rows")
        pieces.append((start, (q - p) - start, counts.rows, counts.inserts, counts.updates,
                       counts.deletes))
        start = q - p
    return pieces


def iter_copy_binary(data):
    """Yield the rows of a COPY BINARY stream as tuples of bytes/None.

    Not for the hot path: tests and dead-letter reporting read staging rows
    with it.
    """
    cdef bytes b = bytes(data)
    cdef Py_ssize_t pos, n = len(b)
    cdef const char *p = PyBytes_AS_STRING(b)
    cdef int nf, i
    cdef int32_t flen = -1
    if n < HEADER_LEN or b[:COPY_SIGNATURE_LEN] != COPY_HEADER[:COPY_SIGNATURE_LEN]:
        raise DecodeError("not a COPY BINARY stream")
    pos = HEADER_LEN + <Py_ssize_t>rd32(p + COPY_HEADER_EXTENSION)
    while pos + 2 <= n:
        nf = <int16_t>rd16(p + pos)
        pos += 2
        if nf == -1:
            return
        row = []
        for i in range(nf):
            flen = <int32_t>rd32(p + pos)
            pos += 4
            if flen < 0:
                row.append(None)
            else:
                row.append(b[pos:pos + flen])
                pos += flen
        yield tuple(row)
    raise DecodeError("COPY BINARY stream without trailer")



def split_inserts(data, keep):
    """A table's staging rows (no COPY header or trailer) split into its inserts, as the
    mirror's own rows, and the rest, as staging rows: (mirror rows, rest, rows in rest),
    each a whole COPY BINARY stream. None if a row is a delete.

    The mirror rows have the columns whose byte in ``keep`` (one per table column) is
    nonzero, without _seq, _lsn, _op, the old key and _u: they are COPYed into the mirror,
    and the rest is staged and merged after them. Without a delete in the batch (a key
    change writes one too) every insert is the first change of its key in the batch, so
    the mirror does not have the key yet, and the rest's updates of it find its row.
    """
    cdef const unsigned char[:] view = data
    cdef const unsigned char[:] kv = keep
    cdef Py_ssize_t n = view.shape[0]
    cdef int ncols = kv.shape[0]
    cdef const char *p = <const char *>&view[0] if n else NULL
    cdef const char *k = <const char *>&kv[0] if ncols else NULL
    cdef const char *end = p + n
    cdef const char *q = p
    cdef const char *row
    cdef const char *f
    cdef char *w
    cdef char *base
    cdef char *rw
    cdef char *rbase
    cdef int nf, i, nkept = 0, bad = 0, deleted = 0
    cdef int32_t flen = -1
    cdef Py_ssize_t nrest = 0
    for i in range(ncols):
        if k[i]:
            nkept += 1
    # Neither is longer than the input: a row goes to one of them, an insert shorter.
    out = bytearray(HEADER_LEN + n + TRAILER_LEN)
    rest = bytearray(HEADER_LEN + n + TRAILER_LEN)
    base = PyByteArray_AS_STRING(out)
    rbase = PyByteArray_AS_STRING(rest)
    memcpy(base, HEADER, HEADER_LEN)
    memcpy(rbase, HEADER, HEADER_LEN)
    w = base + HEADER_LEN
    rw = rbase + HEADER_LEN
    with nogil:
        while q < end:
            row = q
            nf = row_fields(q, end)
            # _seq, _lsn, _op, the columns, at least one old key field, _u.
            if nf - 4 - ncols < 1:
                bad = 1
                break
            if q[ROW_OP] == b'D':
                deleted = 1
                break
            if q[ROW_OP] != b'I':
                q = row_end(q, end, nf, &flen)
                if q == NULL:
                    bad = 1
                    break
                memcpy(rw, row, q - row)
                rw += q - row
                nrest += 1
                continue
            wr16(w, <int16_t>nkept)
            w += 2
            f = q + ROW_HEAD
            for i in range(ncols):
                if end - f < FIELD_LEN:
                    bad = 1
                    break
                flen = <int32_t>rd32(f)
                if flen > 0 and end - f - FIELD_LEN < flen:
                    bad = 1
                    break
                if k[i]:
                    memcpy(w, f, FIELD_LEN + (flen if flen > 0 else 0))
                    w += FIELD_LEN + (flen if flen > 0 else 0)
                f += FIELD_LEN + (flen if flen > 0 else 0)
            if bad:
                break
            # Past the old key and _u, which is NULL: an insert sends every value.
            q = row_end(q, end, nf, &flen)
            if q == NULL or flen >= 0:
                bad = 1
                break
        if not bad and not deleted:
            memcpy(w, TRAILER, TRAILER_LEN)
            w += TRAILER_LEN
            memcpy(rw, TRAILER, TRAILER_LEN)
            rw += TRAILER_LEN
    if bad:
        raise DecodeError("malformed staging rows")
    if deleted:
        return None
    del out[w - base:]
    del rest[rw - rbase:]
    return out, rest, nrest
