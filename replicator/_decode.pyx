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
from cpython.bytearray cimport PyByteArray_AS_STRING
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

# The replication stream's CopyData frames. XLogData 'w': Int64 WAL start, Int64 WAL end,
# Int64 send time, then one pgoutput message. Primary keepalive 'k': Int64 WAL end, Int64
# send time, Byte1 reply requested. pgoutput Begin 'B': Int64 final LSN, Int64 commit time,
# Int32 xid. Offsets from the tag byte.
cdef enum:
    XLOG_WAL_START = 1
    XLOG_WAL_END = 9
    XLOG_SEND_TIME = 17
    XLOG_MESSAGE = 25          # the header's length: where the pgoutput message starts
    KEEPALIVE_WAL_END = 1
    KEEPALIVE_SEND_TIME = 9
    KEEPALIVE_REPLY = 17
    KEEPALIVE_LEN = 18
    BEGIN_FINAL_LSN = 1
    BEGIN_COMMIT_TS = 9
    BEGIN_XID = 17
    BEGIN_LEN = 21

# The 11-byte signature, flags and header extension length of COPY BINARY, and
# the field count -1 that ends the rows. Written here only: every buffer starts
# with the header, and batch.py takes both from this module.
cdef const char *HEADER = b"PGCOPY\n\xff\r\n\x00\x00\x00\x00\x00\x00\x00\x00\x00"
cdef const char *TRAILER = b"\xff\xff"
COPY_HEADER = HEADER[:HEADER_LEN]
COPY_TRAILER = TRAILER[:TRAILER_LEN]


class DecodeError(Exception):
    """The stream does not look like pgoutput as we understand it."""


# The parts, in the order C needs them (asyncpg's way: one module, several files).
include "pgoutput/copy_buffer.pxi"     # growable buffers, big values left in place
include "pgoutput/tuple_data.pxi"      # a TupleData's fields, pointed at in the message
include "pgoutput/staging_rows.pxi"    # the staging row: written, restaged, cut, read


cdef void rel_free(Rel *r) noexcept nogil:
    free(r.key_idx)
    free(r.is_key)
    free(r.old_fields)
    free(r.new_fields)
    free(r.buf.data)
    free(r.segs)
    memset(r, 0, sizeof(Rel))


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
            if self._write(r, lsn, b'I', r.new_fields, 0, NULL, NULL, held) < 0:
                return -1
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
                if self._write(r, lsn, b'D', r.old_fields, 1, NULL, NULL, held) < 0:
                    return -1
                self.batch_rows += 1
                r.n_moves += 1
            if self._write(r, lsn, b'U', r.new_fields, 0,
                           r.old_fields if moved else NULL,
                           r.old_fields if full_old else NULL, held) < 0:
                return -1
            r.n_update += 1
        else:
            if c != b'K' and c != b'O':
                return self._fail(b"delete without an old tuple")
            if parse_tuple(q, end, r.ncols, r.old_fields) == NULL:
                return self._fail(b"malformed old tuple in delete")
            if self._write(r, lsn, b'D', r.old_fields, 1, NULL, NULL, held) < 0:
                return -1
            r.n_delete += 1
        self.txn_rows += 1
        self.batch_rows += 1
        self.buffered_bytes += r.buf.len - before + r.seg_bytes - seg_before
        return 0

    cdef int _write(self, Rel *r, uint64_t lsn, char op, Field *src, int key_only,
                    Field *okey, Field *fill, int held) noexcept nogil:
        """One staging row with the next sequence number: 0, or -1 with errbuf set."""
        cdef int rc = write_row(r, self.seq, lsn, op, src, key_only, okey, fill, held)
        if rc < 0:
            return self._fail(b"out of memory")
        self._keep_msg |= rc
        self.seq += 1
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
        if n < BEGIN_LEN:
            return self._fail(b"truncated Begin")
        self.final_lsn = rd64(p + BEGIN_FINAL_LSN)
        self.commit_ts = <int64_t>rd64(p + BEGIN_COMMIT_TS)
        self.xid = rd32(p + BEGIN_XID)
        self.in_txn = 1
        self.txn_rows = 0
        # A transaction whose commit record starts before the applied end LSN
        # is already in the destination (end_lsn <= applied).
        self.skipping = self.final_lsn < self.skip_before
        return 0

    cdef int _hot(self, const char *p, Py_ssize_t n) noexcept nogil:
        """A CopyData frame: 0 when handled here, 1 for Python, -1 on error.

        Every frame comes here first: an XLogData header is read here only.
        """
        cdef char tag
        if n < 1 or p[0] != b'w':
            return 1
        if n < XLOG_MESSAGE + 1:
            return self._fail(b"truncated XLogData frame")
        self.wal_start = rd64(p + XLOG_WAL_START)
        self.wal_end = rd64(p + XLOG_WAL_END)
        self.send_time = <int64_t>rd64(p + XLOG_SEND_TIME)
        tag = p[XLOG_MESSAGE]
        if tag == b'I' or tag == b'U' or tag == b'D':
            return self._row(p + XLOG_MESSAGE, n - XLOG_MESSAGE, tag)
        if tag == b'B':
            return self._begin(p + XLOG_MESSAGE, n - XLOG_MESSAGE)
        return 1

    cdef int _cold(self, const char *p, Py_ssize_t n) except -1:
        """A CopyData frame that needs Python, after _hot: an event code."""
        if n >= 1 and p[0] == b'w':
            # _hot read its header, and refused one too short for a message.
            return self._message(p + XLOG_MESSAGE, n - XLOG_MESSAGE)
        if n >= 1 and p[0] == b'k':
            if n < KEEPALIVE_LEN:
                raise DecodeError("truncated keepalive")
            self.wal_end = rd64(p + KEEPALIVE_WAL_END)
            self.send_time = <int64_t>rd64(p + KEEPALIVE_SEND_TIME)
            self.reply_requested = p[KEEPALIVE_REPLY] != 0
            return EV_KEEPALIVE
        raise DecodeError(f"unexpected CopyData message type 0x{<unsigned char>p[0]:02x}" if n else
                          "empty CopyData message")

    cdef int _message(self, const char *p, Py_ssize_t n) except -1:
        """One pgoutput message: an event code."""
        cdef char tag
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


include "pgoutput/reader.pxi"          # bounds-checked reads for the rare messages
