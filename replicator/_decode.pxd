from libc.stdint cimport int16_t, int32_t, int64_t, uint8_t, uint32_t, uint64_t

from replicator._libpq cimport consumeinput_fn, freemem_fn, getcopydata_fn


# What Decoder.pump(), feed() and feed_frame() return. This list is the only
# place the codes are written: C uses these names, and the module exports each
# one as a plain int of the same name (EV_COMMIT, ...), plus the Event IntEnum.
cpdef enum Event:
    EV_NONE = 0
    EV_WOULD_BLOCK = 1
    EV_COPY_DONE = 2
    EV_ERROR = 3
    EV_KEEPALIVE = 4
    EV_COMMIT = 5
    EV_RELATION = 6
    EV_TRUNCATE = 7
    EV_MESSAGE = 8
    EV_ORIGIN = 9
    EV_TYPE = 10
    EV_STREAM_START = 11
    EV_STREAM_STOP = 12
    EV_STREAM_COMMIT = 13
    EV_STREAM_ABORT = 14
    EV_LIMIT = 15
    EV_BEGIN = 16


# Transitions between (sub)transactions noted per take(); more are counted as lost.
cdef enum:
    MAX_MARKS = 1024


# A growable byte buffer owned by C: rows are appended here without touching
# a Python object, then handed to COPY as one bytes object per table.
cdef struct Buf:
    char *data
    Py_ssize_t len
    Py_ssize_t cap


# One field of a TupleData, pointing into the message being decoded.
cdef struct Field:
    char kind          # 'n', 'u', 't' or 'b'
    const char *ptr
    int32_t len


# A value of BIG_VALUE bytes or more, left in the libpq buffer its message came in
# (Decoder.held[held]) instead of copied into the relation's buffer: its bytes belong at
# offset `at` of Rel.buf, after the length word written there.
cdef struct Seg:
    Py_ssize_t at
    const char *ptr
    Py_ssize_t len
    int held


# The decoder's view of one source relation: what the hot loop needs to turn
# an Insert/Update/Delete into a staging row.
cdef struct Rel:
    uint32_t relid
    int active         # 0: not replicated, its changes are dropped
    uint64_t skip_before  # drop changes of transactions committed before (a table's sync LSN)
    int ncols
    int nkey
    int *key_idx       # positions of the key columns among ncols
    uint8_t *is_key    # ncols flags, 1 for a key column
    Field *old_fields
    Field *new_fields
    Buf buf
    Seg *segs
    int nsegs
    int segcap
    Py_ssize_t seg_bytes
    int64_t rows
    int64_t n_insert
    int64_t n_update
    int64_t n_delete
    int64_t n_unchanged   # rows that carry at least one unchanged-TOAST column
    int64_t n_moves       # primary-key changes


cdef class Decoder:
    cdef Rel *rels
    cdef int nrels
    cdef int relcap
    cdef int last_rel

    cdef readonly int64_t seq
    cdef public uint64_t skip_before
    cdef readonly int in_txn
    cdef readonly int skipping
    cdef readonly int in_stream
    cdef readonly uint32_t xid
    cdef readonly uint32_t stream_xid
    cdef readonly uint64_t final_lsn
    cdef readonly uint64_t commit_lsn
    cdef readonly uint64_t end_lsn
    cdef readonly int64_t commit_ts
    cdef readonly int64_t txn_rows
    cdef readonly int64_t batch_rows
    cdef readonly Py_ssize_t buffered_bytes

    # In a streamed transaction: where the rows' (sub)transaction changes, as
    # (seq of the first row, xid), so that a subtransaction can get a savepoint.
    cdef uint32_t prev_xid
    cdef int nmarks
    cdef int marks_lost
    cdef int64_t mark_seq[MAX_MARKS]
    cdef uint32_t mark_xid[MAX_MARKS]
    cdef readonly object taken_marks

    # replication stream position (from the CopyData headers)
    cdef readonly uint64_t wal_start
    cdef readonly uint64_t wal_end
    cdef readonly int64_t send_time
    cdef readonly int reply_requested

    cdef readonly object event
    cdef char errbuf[256]

    # libpq buffers of messages whose big values rows still point to (Seg.held), until
    # take() hands them to the Span objects that free them.
    cdef char **held
    cdef int nheld
    cdef int heldcap
    cdef int _zero_copy    # the message being decoded may be kept: its big values are not copied
    cdef int _keep_msg     # and one of them was left in it

    cdef getcopydata_fn _getcopydata
    cdef consumeinput_fn _consumeinput
    cdef freemem_fn _freemem
    cdef void *_conn

    cdef Rel *_find(self, uint32_t relid) noexcept nogil
    cdef int _hot(self, const char *p, Py_ssize_t n) noexcept nogil
    cdef int _row(self, const char *p, Py_ssize_t n, char tag) noexcept nogil
    cdef int _write(self, Rel *r, uint64_t lsn, char op, Field *src, int key_only,
                    Field *okey, Field *fill, int held) noexcept nogil
    cdef int _begin(self, const char *p, Py_ssize_t n) noexcept nogil
    cdef int _fail(self, const char *msg) noexcept nogil
    cdef int _hold_room(self) noexcept nogil
    cdef str _error(self)
    cdef int _cold(self, const char *p, Py_ssize_t n) except -1
    cdef int _message(self, const char *p, Py_ssize_t n) except -1
