# cython: language_level=3
"""pgoutput decoding into COPY BINARY staging rows.

The hot path (Begin, Insert, Update, Delete inside XLogData frames) runs
without the GIL and without creating a Python object per message or per
field: tuple fields are spliced into a per-table COPY BINARY buffer exactly as
they arrived. pgoutput's text ('t') and binary ('b') fields both have the
layout of a COPY BINARY field (Int32 length + bytes), so binary mode feeds
staging columns of the source type and text mode feeds text staging columns
that the MERGE casts.

Every other message (Commit, Relation, Truncate, Type, Origin, Message, the
Stream* family, keepalives) is rare and is handed to Python as an event.

A staging row is: _seq int8, _lsn int8 (its transaction's commit LSN), _op
"char", the table's columns, the old key (set only when an UPDATE changed the
key), _u bytea (bit i set when column i was sent as unchanged TOAST; NULL when
none was).
"""

from cpython.buffer cimport PyBUF_WRITABLE, PyBuffer_FillInfo
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.stdint cimport int16_t, int32_t, int64_t, uint8_t, uint32_t, uint64_t, INT64_MAX
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcmp, memcpy, memmove, memset

from replicator._wire cimport rd16, rd32, rd64, wr16, wr32, wr64

# The Python names of the event codes, from the one enum in _decode.pxd: plain
# ints, so the receive loop's comparisons cost what they did.
globals().update({_name: int(_code) for _name, _code in Event.__members__.items()})

cdef enum:
    HEADER_LEN = 19
    TRAILER_LEN = 2
    MAX_COLS = 1664
    UBITS_MAX = 208  # (MAX_COLS + 7) / 8
    # A value this big is not copied out of the libpq buffer it arrived in (pump() only):
    # a 96 MB document would otherwise be held three times at once (libpq's input buffer,
    # the buffer PQgetCopyData returns, the relation's COPY buffer).
    BIG_VALUE = 1 << 20

# The 11-byte signature, flags and header extension length of COPY BINARY, and
# the field count -1 that ends the rows. Written here only: every buffer starts
# with the header, and batch.py takes both from this module.
cdef const char *HEADER = b"PGCOPY\n\xff\r\n\x00\x00\x00\x00\x00\x00\x00\x00\x00"
cdef const char *TRAILER = b"\xff\xff"
COPY_HEADER = HEADER[:HEADER_LEN]
COPY_TRAILER = TRAILER[:TRAILER_LEN]


class DecodeError(Exception):
    """The stream does not look like pgoutput as we understand it."""


cdef int buf_reserve(Buf *b, Py_ssize_t extra) noexcept nogil:
    cdef Py_ssize_t need = b.len + extra
    cdef Py_ssize_t cap
    cdef char *data
    if need <= b.cap:
        return 0
    cap = b.cap * 2 if b.cap else 65536
    while cap < need:
        cap *= 2
    data = <char *>realloc(b.data, cap)
    if data == NULL:
        return -1
    b.data = data
    b.cap = cap
    return 0


cdef int buf_reset(Buf *b) noexcept nogil:
    # Every buffer starts with the COPY BINARY header so that taking it is
    # one copy, not a concatenation.
    b.len = 0
    if buf_reserve(b, HEADER_LEN) < 0:
        return -1
    memcpy(b.data, HEADER, HEADER_LEN)
    b.len = HEADER_LEN
    return 0


cdef const char *parse_tuple(const char *p, const char *end, int ncols, Field *out) noexcept nogil:
    """Point `out` at the fields of a TupleData; NULL when malformed."""
    cdef int i
    cdef int32_t flen
    cdef char kind
    if p + 2 > end:
        return NULL
    if rd16(p) != ncols:
        return NULL
    p += 2
    for i in range(ncols):
        if p >= end:
            return NULL
        kind = p[0]
        p += 1
        out[i].kind = kind
        out[i].ptr = NULL
        out[i].len = -1
        if kind == b't' or kind == b'b':
            if p + 4 > end:
                return NULL
            flen = <int32_t>rd32(p)
            p += 4
            if flen < 0 or p + flen > end:
                return NULL
            out[i].ptr = p
            out[i].len = flen
            p += flen
        elif kind != b'n' and kind != b'u':
            return NULL
    return p


cdef inline int has_value(Field *f) noexcept nogil:
    return f.kind == b't' or f.kind == b'b'


cdef int rel_seg(Rel *r, Py_ssize_t at, Field *f, int held) noexcept nogil:
    cdef Seg *grown
    if r.nsegs == r.segcap:
        grown = <Seg *>realloc(r.segs, (r.segcap * 2 if r.segcap else 4) * sizeof(Seg))
        if grown == NULL:
            return -1
        r.segs = grown
        r.segcap = r.segcap * 2 if r.segcap else 4
    r.segs[r.nsegs].at = at
    r.segs[r.nsegs].ptr = f.ptr
    r.segs[r.nsegs].len = f.len
    r.segs[r.nsegs].held = held
    r.nsegs += 1
    r.seg_bytes += f.len
    return 0


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

    size = 2 + 12 + 12 + 5 + 4 + ulen
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
    w += 2
    wr32(w, 8)
    wr64(w + 4, seq)
    w += 12
    wr32(w, 8)
    wr64(w + 4, <int64_t>lsn)
    w += 12
    wr32(w, 1)
    w[4] = op
    w += 5
    for i in range(ncols):
        if key_only and not r.is_key[i]:
            wr32(w, -1)
            w += 4
            continue
        f = &src[i]
        if f.kind == b'u' and fill != NULL and has_value(&fill[i]):
            f = &fill[i]
        if has_value(f) and left_in_place(f, held):
            wr32(w, f.len)
            w += 4
            if rel_seg(r, w - r.buf.data, f, held) < 0:
                r.nsegs, r.seg_bytes = nsegs, seg_bytes
                return -1
            kept = 1
        elif has_value(f):
            wr32(w, f.len)
            memcpy(w + 4, f.ptr, f.len)
            w += 4 + f.len
        else:
            if f.kind == b'u':
                ubits[i >> 3] |= <uint8_t>(1 << (i & 7))
                nbits += 1
            wr32(w, -1)
            w += 4
    for k in range(r.nkey):
        if okey != NULL and has_value(&okey[r.key_idx[k]]):
            f = &okey[r.key_idx[k]]
            wr32(w, f.len)
            if left_in_place(f, held):
                w += 4
                if rel_seg(r, w - r.buf.data, f, held) < 0:
                    r.nsegs, r.seg_bytes = nsegs, seg_bytes
                    return -1
                kept = 1
            else:
                memcpy(w + 4, f.ptr, f.len)
                w += 4 + f.len
        else:
            wr32(w, -1)
            w += 4
    if nbits:
        wr32(w, ulen)
        memcpy(w + 4, ubits, ulen)
        w += 4 + ulen
        r.n_unchanged += 1
    else:
        wr32(w, -1)
        w += 4
    r.buf.len = w - r.buf.data
    r.rows += 1
    return kept


cdef int key_changed(Rel *r, Field *old, Field *new) noexcept nogil:
    cdef int k, i
    for k in range(r.nkey):
        i = r.key_idx[k]
        if new[i].kind == b'u' or old[i].kind == b'u':
            continue
        if old[i].kind == b'n' and new[i].kind == b'n':
            continue
        if has_value(&old[i]) != has_value(&new[i]):
            return 1
        if old[i].len != new[i].len or memcmp(old[i].ptr, new[i].ptr, old[i].len) != 0:
            return 1
    return 0


cdef void rel_free(Rel *r) noexcept nogil:
    free(r.key_idx)
    free(r.is_key)
    free(r.old_fields)
    free(r.new_fields)
    free(r.buf.data)
    free(r.segs)
    memset(r, 0, sizeof(Rel))


cdef class Held:
    """A message buffer libpq allocated (PQgetCopyData), freed with the last Span in it."""
    cdef char *ptr
    cdef freemem_fn free

    def __dealloc__(self):
        if self.ptr != NULL:
            self.free(self.ptr)


cdef class Span:
    """A big value where it arrived: read-only bytes in a Held buffer (buffer protocol)."""
    cdef Held owner
    cdef const char *ptr
    cdef Py_ssize_t size

    def __len__(self):
        return self.size

    def __getbuffer__(self, Py_buffer *view, int flags):
        if flags & PyBUF_WRITABLE:
            raise BufferError("a Span is read-only")
        PyBuffer_FillInfo(view, self, <void *>self.ptr, self.size, 1, flags)

    def __releasebuffer__(self, Py_buffer *view):
        pass


class Pieces:
    """One COPY BINARY stream of a relation in parts, header in the first and trailer in
    the last: bytes, and a Span for each big value left in its message. Written part by
    part (memoryview() of each), so the value is never copied whole again."""

    __slots__ = ("parts", "size")

    def __init__(self, parts):
        self.parts = parts
        self.size = sum(len(p) for p in parts)

    def __len__(self):
        return self.size


cdef object _pieces(Rel *r, list owners):
    cdef int i
    cdef Span span
    cdef Py_ssize_t pos = 0
    parts = []
    for i in range(r.nsegs):
        parts.append(PyBytes_FromStringAndSize(r.buf.data + pos, r.segs[i].at - pos))
        span = Span.__new__(Span)
        span.owner = owners[r.segs[i].held]
        span.ptr = r.segs[i].ptr
        span.size = r.segs[i].len
        parts.append(span)
        pos = r.segs[i].at
    parts.append(PyBytes_FromStringAndSize(r.buf.data + pos, r.buf.len + TRAILER_LEN - pos))
    return Pieces(parts)


cdef class Decoder:
    """Decodes one pgoutput stream into per-relation COPY BINARY buffers.

    Python tells the decoder which relations to keep (define()); the decoder
    tells Python about everything that is not a row (events), and hands over
    the buffered rows on take().
    """

    def __cinit__(self):
        self.rels = NULL
        self.nrels = 0
        self.relcap = 0
        self.last_rel = -1
        self.seq = 0
        self.skip_before = 0
        self.event = None
        self._conn = NULL
        self.errbuf[0] = 0
        self.nmarks = 0
        self.marks_lost = 0
        self.taken_marks = ((), False)

    def __dealloc__(self):
        cdef int i
        for i in range(self.nrels):
            rel_free(&self.rels[i])
        free(self.rels)
        for i in range(self.nheld):
            self._freemem(self.held[i])
        free(self.held)

    # -- relations -------------------------------------------------------

    cdef Rel *_find(self, uint32_t relid) noexcept nogil:
        cdef int i
        if self.last_rel >= 0 and self.rels[self.last_rel].relid == relid:
            return &self.rels[self.last_rel]
        for i in range(self.nrels):
            if self.rels[i].relid == relid:
                self.last_rel = i
                return &self.rels[i]
        return NULL

    def set_skip(self, uint32_t relid, uint64_t skip_before):
        """Drop the relation's changes from transactions committed before skip_before."""
        cdef Rel *r = self._find(relid)
        if r == NULL:
            raise DecodeError(f"relation {relid} was never defined")
        r.skip_before = skip_before

    def define(self, uint32_t relid, int ncols, key_idx, bint active, uint64_t skip_before=0):
        """(Re)declare a relation's layout.

        The same layout again (the server resends Relation messages after any
        cache invalidation) keeps the rows already buffered; a different one
        needs them taken first.
        """
        cdef Rel *r
        cdef Rel *grown
        cdef int i
        keys = [int(k) for k in key_idx]
        if ncols < 0 or ncols > MAX_COLS:
            raise DecodeError(f"relation {relid} has {ncols} columns, at most {MAX_COLS} are supported")
        if len(set(keys)) != len(keys) or any(not 0 <= k < ncols for k in keys):
            raise DecodeError(f"relation {relid}: key columns {keys} out of range or repeated")
        r = self._find(relid)
        if r != NULL:
            same = r.ncols == ncols and r.nkey == len(keys) and all(
                r.key_idx[i] == k for i, k in enumerate(keys))
            if same and (r.active == active or not r.rows):
                r.active = active
                r.skip_before = skip_before
                return
            if r.rows:
                raise DecodeError(f"relation {relid} redefined with rows still buffered")
            rel_free(r)
        else:
            if self.nrels == self.relcap:
                self.relcap = self.relcap * 2 if self.relcap else 16
                grown = <Rel *>realloc(self.rels, self.relcap * sizeof(Rel))
                if grown == NULL:
                    raise MemoryError()
                self.rels = grown
            r = &self.rels[self.nrels]
            self.nrels += 1
            memset(r, 0, sizeof(Rel))
        r.relid = relid
        r.ncols = ncols
        r.nkey = len(keys)
        r.key_idx = <int *>malloc(max(1, r.nkey) * sizeof(int))
        r.is_key = <uint8_t *>malloc(max(1, ncols))
        r.old_fields = <Field *>malloc(max(1, ncols) * sizeof(Field))
        r.new_fields = <Field *>malloc(max(1, ncols) * sizeof(Field))
        if r.key_idx == NULL or r.is_key == NULL or r.old_fields == NULL or r.new_fields == NULL \
                or buf_reset(&r.buf) < 0:
            rel_free(r)
            r.relid = relid   # an inactive husk: its changes are dropped, not misread
            raise MemoryError()
        memset(r.is_key, 0, max(1, ncols))
        for i, k in enumerate(keys):
            r.key_idx[i] = k
            r.is_key[k] = 1
        # Only a fully built relation becomes active.
        r.active = active
        r.skip_before = skip_before
        self.last_rel = -1

    def reserve_seq(self, int64_t n):
        """Advance the staging sequence by n: the first of the n numbers reserved.

        A streamed transaction's rows were numbered as its chunks arrived, among
        those of transactions that commit before it; at its commit they are moved
        into a fresh range (restage) so every later change still sorts after them.
        """
        if n < 0:
            raise ValueError("n must not be negative")
        base = self.seq
        self.seq += n
        return base

    def take(self):
        """Hand over every buffered table as (relid, copy_data, counts) and reset.

        counts = (rows, inserts, updates, deletes, rows_with_unchanged_toast,
        key_changes). copy_data is a complete COPY BINARY stream.

        In a streamed transaction, ``taken_marks`` then holds where the rows taken
        change (sub)transaction: ([(seq of the first row, xid), ...], lost), lost
        when there were more changes than noted.
        """
        cdef int i
        cdef Rel *r
        cdef Held h
        out = []
        owners = []
        for i in range(self.nheld):
            h = Held.__new__(Held)
            h.ptr = self.held[i]
            h.free = self._freemem
            owners.append(h)
        self.nheld = 0
        self.taken_marks = ([(self.mark_seq[i], self.mark_xid[i]) for i in range(self.nmarks)],
                            bool(self.marks_lost))
        self.nmarks = 0
        self.marks_lost = 0
        for i in range(self.nrels):
            r = &self.rels[i]
            if not r.rows:
                continue
            if buf_reserve(&r.buf, TRAILER_LEN) < 0:
                raise MemoryError()
            memcpy(r.buf.data + r.buf.len, TRAILER, TRAILER_LEN)
            if r.nsegs:
                data = _pieces(r, owners)
                r.nsegs = 0
                r.seg_bytes = 0
            else:
                data = PyBytes_FromStringAndSize(r.buf.data, r.buf.len + TRAILER_LEN)
            out.append((r.relid, data, (r.rows, r.n_insert, r.n_update, r.n_delete,
                                        r.n_unchanged, r.n_moves)))
            r.rows = r.n_insert = r.n_update = r.n_delete = r.n_unchanged = r.n_moves = 0
            if buf_reset(&r.buf) < 0:
                raise MemoryError()
            if r.buf.cap > 16 * 1024 * 1024:
                # Give a month-end batch's memory back instead of keeping it.
                free(r.buf.data)
                r.buf.data = NULL
                r.buf.cap = 0
                if buf_reset(&r.buf) < 0:
                    raise MemoryError()
        self.batch_rows = 0
        self.buffered_bytes = 0
        return out

    # -- decoding --------------------------------------------------------

    cdef int _row(self, const char *p, Py_ssize_t n, char tag) noexcept nogil:
        """Insert, Update or Delete. 0 on success, -1 with errbuf set."""
        cdef const char *end = p + n
        cdef const char *q = p + 1
        cdef Rel *r
        cdef uint32_t relid
        cdef char c
        cdef int has_old = 0, full_old = 0, moved
        cdef Py_ssize_t before, seg_before
        cdef int rc
        cdef int held = self.nheld if self._zero_copy else -1
        cdef uint64_t lsn = self.final_lsn
        if self.in_stream:
            # An in-progress transaction: its commit LSN is not known yet. The row
            # carries its (sub)transaction's xid instead, which restage() turns into
            # the commit LSN at Stream Commit (or drops, for an aborted subtransaction).
            if q + 4 > end:
                return self._fail(b"truncated change message")
            lsn = rd32(q)
            q += 4
        if q + 5 > end:
            return self._fail(b"truncated change message")
        relid = rd32(q)
        q += 4
        r = self._find(relid)
        if r == NULL:
            return self._fail(b"change for a relation that was never described")
        if not r.active or self.skipping:
            return 0
        if not self.in_stream and self.final_lsn < r.skip_before:
            return 0
        if self.in_stream and <uint32_t>lsn != self.prev_xid:
            self.prev_xid = <uint32_t>lsn
            if self.nmarks < MAX_MARKS:
                self.mark_seq[self.nmarks] = self.seq
                self.mark_xid[self.nmarks] = <uint32_t>lsn
                self.nmarks += 1
            else:
                self.marks_lost = 1
        before = r.buf.len
        seg_before = r.seg_bytes
        c = q[0]
        q += 1
        if tag == b'I':
            if c != b'N':
                return self._fail(b"insert without a new tuple")
            if parse_tuple(q, end, r.ncols, r.new_fields) == NULL:
                return self._fail(b"malformed tuple in insert")
            rc = write_row(r, self.seq, lsn, b'I', r.new_fields, 0, NULL, NULL, held)
            if rc < 0:
                return self._fail(b"out of memory")
            self._keep_msg |= rc
            self.seq += 1
            r.n_insert += 1
        elif tag == b'U':
            if c == b'K' or c == b'O':
                has_old = 1
                full_old = c == b'O'
                q = parse_tuple(q, end, r.ncols, r.old_fields)
                if q == NULL or q >= end:
                    return self._fail(b"malformed old tuple in update")
                c = q[0]
                q += 1
            if c != b'N' or parse_tuple(q, end, r.ncols, r.new_fields) == NULL:
                return self._fail(b"malformed new tuple in update")
            moved = has_old and key_changed(r, r.old_fields, r.new_fields)
            if moved:
                # The old key goes away; the new row remembers it so that its
                # unchanged-TOAST columns can be taken from the old image.
                rc = write_row(r, self.seq, lsn, b'D', r.old_fields, 1, NULL, NULL, held)
                if rc < 0:
                    return self._fail(b"out of memory")
                self._keep_msg |= rc
                self.seq += 1
                self.batch_rows += 1
                r.n_moves += 1
            rc = write_row(r, self.seq, lsn, b'U', r.new_fields, 0,
                           r.old_fields if moved else NULL,
                           r.old_fields if full_old else NULL, held)
            if rc < 0:
                return self._fail(b"out of memory")
            self._keep_msg |= rc
            self.seq += 1
            r.n_update += 1
        else:
            if c != b'K' and c != b'O':
                return self._fail(b"delete without an old tuple")
            if parse_tuple(q, end, r.ncols, r.old_fields) == NULL:
                return self._fail(b"malformed old tuple in delete")
            rc = write_row(r, self.seq, lsn, b'D', r.old_fields, 1, NULL, NULL, held)
            if rc < 0:
                return self._fail(b"out of memory")
            self._keep_msg |= rc
            self.seq += 1
            r.n_delete += 1
        self.txn_rows += 1
        self.batch_rows += 1
        self.buffered_bytes += r.buf.len - before + r.seg_bytes - seg_before
        return 0

    cdef str _error(self):
        return (<char *>self.errbuf).decode("utf-8", "replace")

    cdef int _fail(self, const char *msg) noexcept nogil:
        cdef int i = 0
        while msg[i] and i < 255:
            self.errbuf[i] = msg[i]
            i += 1
        self.errbuf[i] = 0
        return -1

    cdef int _begin(self, const char *p, Py_ssize_t n) noexcept nogil:
        if n < 21:
            return self._fail(b"truncated Begin")
        self.final_lsn = rd64(p + 1)
        self.commit_ts = <int64_t>rd64(p + 9)
        self.xid = rd32(p + 17)
        self.in_txn = 1
        self.txn_rows = 0
        # A transaction whose commit record starts before the applied end LSN
        # is already in the destination (end_lsn <= applied).
        self.skipping = self.final_lsn < self.skip_before
        return 0

    cdef int _hot(self, const char *p, Py_ssize_t n) noexcept nogil:
        """A CopyData frame: 0 when handled here, 1 for Python, -1 on error."""
        cdef char tag
        if n < 1 or p[0] != b'w':
            return 1
        if n < 26:
            return self._fail(b"truncated XLogData frame")
        self.wal_start = rd64(p + 1)
        self.wal_end = rd64(p + 9)
        self.send_time = <int64_t>rd64(p + 17)
        tag = p[25]
        if tag == b'I' or tag == b'U' or tag == b'D':
            return self._row(p + 25, n - 25, tag)
        if tag == b'B':
            return self._begin(p + 25, n - 25)
        return 1

    cdef int _cold(self, const char *p, Py_ssize_t n) except -1:
        """A CopyData frame that needs Python: an event code."""
        if n >= 1 and p[0] == b'w':
            if n < 26:
                raise DecodeError("truncated XLogData frame")
            self.wal_start = rd64(p + 1)
            self.wal_end = rd64(p + 9)
            self.send_time = <int64_t>rd64(p + 17)
            return self._message(p + 25, n - 25)
        if n >= 1 and p[0] == b'k':
            if n < 18:
                raise DecodeError("truncated keepalive")
            self.wal_end = rd64(p + 1)
            self.send_time = <int64_t>rd64(p + 9)
            self.reply_requested = p[17] != 0
            return EV_KEEPALIVE
        raise DecodeError(f"unexpected CopyData message type 0x{<unsigned char>p[0]:02x}" if n else
                          "empty CopyData message")

    cdef int _message(self, const char *p, Py_ssize_t n) except -1:
        """One pgoutput message: an event code."""
        cdef char tag
        cdef const char *q
        cdef const char *end = p + n
        cdef int rc
        if n < 1:
            raise DecodeError("empty pgoutput message")
        tag = p[0]
        if tag == b'I' or tag == b'U' or tag == b'D':
            if self._row(p, n, tag) < 0:
                raise DecodeError(self._error())
            return EV_NONE
        if tag == b'B':
            if self._begin(p, n) < 0:
                raise DecodeError(self._error())
            return EV_BEGIN
        reader = _Reader(p[1:n])
        if tag == b'C':
            reader.u8()
            self.commit_lsn = reader.u64()
            self.end_lsn = reader.u64()
            self.commit_ts = reader.i64()
            self.in_txn = 0
            self.event = None
            return EV_COMMIT
        if tag == b'R':
            xid = reader.u32() if self.in_stream else None
            relid = reader.u32()
            nspname = reader.cstr()
            relname = reader.cstr()
            replident = chr(reader.u8())
            cols = []
            for _ in range(reader.u16()):
                flags = reader.u8()
                name = reader.cstr()
                typoid = reader.u32()
                typmod = reader.i32()
                cols.append((flags, name, typoid, typmod))
            self.event = (relid, nspname, relname, replident, cols, xid)
            return EV_RELATION
        if tag == b'Y':
            xid = reader.u32() if self.in_stream else None
            self.event = (reader.u32(), reader.cstr(), reader.cstr(), xid)
            return EV_TYPE
        if tag == b'T':
            xid = reader.u32() if self.in_stream else None
            nrels = reader.u32()
            options = reader.u8()
            relids = [reader.u32() for _ in range(nrels)]
            if self.skipping:
                return EV_NONE
            self.event = (options, relids, xid)
            return EV_TRUNCATE
        if tag == b'M':
            xid = reader.u32() if self.in_stream else None
            flags = reader.u8()
            lsn = reader.u64()
            prefix = reader.cstr()
            content = reader.take(reader.u32())
            self.event = (bool(flags & 1), lsn, prefix, content, xid)
            return EV_MESSAGE
        if tag == b'O':
            self.event = (reader.u64(), reader.cstr())
            return EV_ORIGIN
        if tag == b'S':
            self.stream_xid = reader.u32()
            first = reader.u8()
            self.in_stream = 1
            # A block's first row of a subtransaction is a change from the top one.
            self.prev_xid = self.stream_xid
            # Whatever the last Begin said about skipping is not about this transaction:
            # a streamed one is kept or dropped as a whole at its Stream Commit.
            self.skipping = 0
            self.event = (self.stream_xid, bool(first))
            return EV_STREAM_START
        if tag == b'E':
            self.in_stream = 0
            self.event = None
            return EV_STREAM_STOP
        if tag == b'c':
            xid = reader.u32()
            flags = reader.u8()
            self.commit_lsn = reader.u64()
            self.end_lsn = reader.u64()
            self.commit_ts = reader.i64()
            self.event = (xid, flags, self.commit_lsn, self.end_lsn, self.commit_ts)
            return EV_STREAM_COMMIT
        if tag == b'A':
            xid = reader.u32()
            subxid = reader.u32()
            # Protocol 4 with streaming = parallel adds the abort LSN and time.
            abort_lsn = reader.u64() if reader.left() >= 16 else None
            abort_ts = reader.i64() if abort_lsn is not None else None
            self.event = (xid, subxid, abort_lsn, abort_ts)
            return EV_STREAM_ABORT
        raise DecodeError(f"unsupported pgoutput message type 0x{<unsigned char>tag:02x}")

    def feed(self, data):
        """Decode one pgoutput message (no XLogData header): an event code."""
        cdef const unsigned char[:] view = data
        if view.shape[0] == 0:
            raise DecodeError("empty pgoutput message")
        return self._message(<const char *>&view[0], view.shape[0])

    def feed_frame(self, data):
        """Decode one CopyData frame of the replication stream ('w' or 'k')."""
        cdef const unsigned char[:] view = data
        cdef int rc
        if view.shape[0] == 0:
            raise DecodeError("empty CopyData frame")
        rc = self._hot(<const char *>&view[0], view.shape[0])
        if rc == 0:
            return EV_NONE
        if rc < 0:
            raise DecodeError(self._error())
        return self._cold(<const char *>&view[0], view.shape[0])

    # -- the receive loop ------------------------------------------------

    def attach(self, size_t conn, size_t getcopydata, size_t consumeinput, size_t freemem):
        """Use libpq directly: `conn` is a PGconn*, the others libpq functions.

        They must come from the libpq that owns `conn` (psycopg's ctypes
        handle), so the two never disagree on the PGconn layout.
        """
        self._conn = <void *>conn
        self._getcopydata = <getcopydata_fn>getcopydata
        self._consumeinput = <consumeinput_fn>consumeinput
        self._freemem = <freemem_fn>freemem

    def pump(self, Py_ssize_t max_messages=1000000):
        """Read and decode CopyData until Python is needed: an event code.

        EV_WOULD_BLOCK: nothing more on the socket (wait for it to be
        readable); EV_LIMIT: max_messages decoded; EV_COPY_DONE / EV_ERROR:
        the COPY ended (read the connection's result); anything else: a
        message for Python, details in .event and the LSN attributes.
        """
        cdef char *buf = NULL
        cdef int n = 0
        cdef int rc = 0
        cdef int ev = EV_NONE
        cdef Py_ssize_t count = 0
        cdef int consumed = 0
        cdef int kept = 0
        if self._conn == NULL:
            raise RuntimeError("pump() before attach()")
        with nogil:
            while True:
                if count >= max_messages:
                    ev = EV_LIMIT
                    break
                n = self._getcopydata(self._conn, &buf, 1)
                if n == 0:
                    # Read the socket only once what libpq holds is decoded: each
                    # PQconsumeInput moves the unread rest of its buffer to the front,
                    # and far behind the source that rest is megabytes, once per
                    # transaction (a commit returns to Python) if read every call.
                    if consumed:
                        ev = EV_WOULD_BLOCK
                        break
                    consumed = 1
                    if self._consumeinput(self._conn) == 0:
                        ev = EV_ERROR
                        break
                    continue
                if n == -1:
                    ev = EV_COPY_DONE
                    break
                if n < 0:
                    ev = EV_ERROR
                    break
                count += 1
                self._keep_msg = 0
                self._zero_copy = n >= BIG_VALUE and self._hold_room() == 0
                rc = self._hot(buf, n)
                self._zero_copy = 0
                if self._keep_msg:
                    # Rows point into it now: take() hands it to its Spans.
                    self.held[self.nheld] = buf
                    self.nheld += 1
                    kept = 1
                if rc == 0:
                    if not kept:
                        self._freemem(buf)
                    buf = NULL
                    kept = 0
                    continue
                break
        if buf != NULL:
            try:
                if rc < 0:
                    raise DecodeError(self._error())
                ev = self._cold(buf, n)
            finally:
                if not kept:
                    self._freemem(buf)
        return ev

    cdef int _hold_room(self) noexcept nogil:
        cdef char **grown
        if self.nheld < self.heldcap:
            return 0
        grown = <char **>realloc(self.held, (self.heldcap * 2 if self.heldcap else 4)
                                 * sizeof(char *))
        if grown == NULL:
            return -1   # then the message's values are copied, as small ones are
        self.held = grown
        self.heldcap = self.heldcap * 2 if self.heldcap else 4
        return 0


cdef class _Reader:
    """Bounds-checked reads for the rare messages (Python objects are fine there)."""
    cdef bytes data
    cdef Py_ssize_t pos

    def __init__(self, bytes data):
        self.data = data
        self.pos = 0

    cdef const char *_need(self, Py_ssize_t k) except NULL:
        if self.pos + k > len(self.data):
            raise DecodeError("truncated pgoutput message")
        cdef const char *p = PyBytes_AS_STRING(self.data) + self.pos
        self.pos += k
        return p

    cdef Py_ssize_t left(self):
        return len(self.data) - self.pos

    cdef int u8(self) except -1:
        return <uint8_t>self._need(1)[0]

    cdef int u16(self) except -1:
        return rd16(self._need(2))

    cdef uint32_t u32(self) except? 0xffffffff:
        return rd32(self._need(4))

    cdef int32_t i32(self) except? -1:
        return <int32_t>rd32(self._need(4))

    cdef uint64_t u64(self) except? 0xffffffffffffffff:
        return rd64(self._need(8))

    cdef int64_t i64(self) except? -1:
        return <int64_t>rd64(self._need(8))

    cdef bytes take(self, Py_ssize_t k):
        cdef const char *p = self._need(k)
        return p[:k]

    cdef str cstr(self):
        end = self.data.find(b"\x00", self.pos)
        if end < 0:
            raise DecodeError("unterminated string in pgoutput message")
        try:
            s = self.data[self.pos:end].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DecodeError(f"invalid UTF-8 in a name of a pgoutput message: {exc}") from None
        self.pos = end + 1
        return s


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
    if end - q < 2 + 12 + 12 + 5:
        return -1
    nf = <int16_t>rd16(q)
    if nf < 4 or rd32(q + 2) != 8 or rd32(q + 14) != 8 or rd32(q + 26) != 1:
        return -1
    return nf


cdef const char *row_end(const char *q, const char *end, int nf, int32_t *last) noexcept nogil:
    """Past the staging row at q (nf fields); *last = its last field's length. NULL if cut short."""
    cdef int i
    cdef int32_t flen = -1
    q += 2
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
    cdef Py_ssize_t pos = 0, size, nabort
    cdef int nf, i, bad = 0
    cdef int32_t flen
    cdef int64_t rows = 0, ins = 0, upd = 0, dels = 0, unch = 0, old_seq
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
    with nogil:
        q = p
        while q < end:
            row = q
            nf = row_fields(q, end)
            if nf < 0:
                bad = 1
                break
            xid = <uint32_t>rd64(q + 18)
            q = row_end(q, end, nf, &flen)
            if q == NULL:
                bad = 1
                break
            if nabort and xid_in(xids, nabort, xid):
                continue
            size = q - row
            # Read before the move: kept rows slide over the dropped ones' bytes.
            old_seq = <int64_t>rd64(row + 6)
            op = row[30]
            if w != row:
                memmove(w, row, size)
            wr64(w + 6, old_seq + delta)
            wr64(w + 18, <int64_t>lsn)
            rows += 1
            if op == b'I':
                ins += 1
            elif op == b'U':
                upd += 1
            else:
                dels += 1
            if flen >= 0:      # the last field, _u: set when a column came as unchanged TOAST
                unch += 1
            w += size
    free(xids)
    if bad:
        raise DecodeError("malformed staging rows")
    return w - out, rows, ins, upd, dels, unch


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
    cdef int32_t flen
    cdef int64_t bound
    cdef Py_ssize_t start = 0
    cdef int64_t rows = 0, ins = 0, upd = 0, dels = 0
    limits = [int(b) for b in bounds]
    if limits != sorted(limits):
        raise ValueError("bounds must be ascending")
    pieces = []
    for bound in limits + [INT64_MAX]:
        with nogil:
            while q < end:
                row = q
                nf = row_fields(q, end)
                if nf < 0:
                    bad = 1
                    break
                if <int64_t>rd64(q + 6) >= bound:
                    break
                q = row_end(q, end, nf, &flen)
                if q == NULL:
                    bad = 1
                    break
                rows += 1
                if row[30] == b'I':
                    ins += 1
                elif row[30] == b'U':
                    upd += 1
                else:
                    dels += 1
        if bad:
            raise DecodeError("malformed staging rows")
        pieces.append((start, (q - p) - start, rows, ins, upd, dels))
        start = q - p
        rows = ins = upd = dels = 0
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
    cdef int32_t flen
    if n < HEADER_LEN or b[:11] != COPY_HEADER[:11]:
        raise DecodeError("not a COPY BINARY stream")
    pos = HEADER_LEN + <Py_ssize_t>rd32(p + 15)
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
