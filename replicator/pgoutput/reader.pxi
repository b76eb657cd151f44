# Included by _decode.pyx: the rare messages, read with bounds checks into Python objects.


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
