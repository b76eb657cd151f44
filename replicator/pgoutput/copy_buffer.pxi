# Included by _decode.pyx: the relation's COPY buffer, and big values left where they arrived.


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
