# cython: language_level=3
"""COPY TO STDOUT on one connection piped into COPY FROM STDIN on another.

The bytes are never decoded, and the loop runs in C without the GIL, so
several table ranges copy in parallel threads at the speed of the servers.
Both connections must be from the libpq psycopg loaded (their PGconn
pointers and the function addresses come from it).
"""

from libc.stdint cimport int64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy

from replicator._libpq cimport freemem_fn, getcopydata_fn, putcopydata_fn

# Rows are gathered into CopyData messages of about this size: one libpq call
# and one protocol message per 256 kB instead of per row, for us and for the
# destination backend alike.
cdef enum:
    CHUNK = 262144



cdef class Pipe:
    """Counts what went through; read `rows` and `bytes` from any thread."""

    cdef getcopydata_fn _get
    cdef putcopydata_fn _put
    cdef freemem_fn _free
    cdef public int64_t rows
    cdef public int64_t bytes
    cdef public bint cancelled
    # True while waiting for the source's next CopyData (not for the destination): the
    # watchdog tells a dead source from one held up by a slow destination by it.
    cdef public bint reading

    def __init__(self, size_t getcopydata, size_t putcopydata, size_t freemem):
        self._get = <getcopydata_fn>getcopydata
        self._put = <putcopydata_fn>putcopydata
        self._free = <freemem_fn>freemem
        self.rows = 0
        self.bytes = 0
        self.cancelled = False
        self.reading = False

    def run(self, size_t src, size_t dst):
        """Move CopyData until the source's COPY ends.

        Returns 0 when the source finished (read its result next), -2 when
        the source failed, -3 when the destination refused data, -4 when
        cancelled. The caller ends the destination's COPY either way.
        """
        cdef void *s = <void *>src
        cdef void *d = <void *>dst
        cdef char *buf = NULL
        cdef char *chunk = <char *>malloc(CHUNK)
        cdef int used = 0
        cdef int n = 0
        cdef int rc = 0
        if chunk == NULL:
            raise MemoryError()
        with nogil:
            while True:
                if self.cancelled:
                    rc = -4
                    break
                self.reading = True
                n = self._get(s, &buf, 0)
                self.reading = False
                if n == -1:
                    rc = 0
                    break
                if n < 0:
                    rc = -2
                    break
                if used + n > CHUNK and used:
                    if self._put(d, chunk, used) != 1:
                        rc = -3
                    used = 0
                if rc == 0:
                    if n >= CHUNK:
                        if self._put(d, buf, n) != 1:
                            rc = -3
                    else:
                        memcpy(chunk + used, buf, n)
                        used += n
                self._free(buf)
                if rc:
                    break
                self.rows += 1
                self.bytes += n
            if rc == 0 and used:
                if self._put(d, chunk, used) != 1:
                    rc = -3
        free(chunk)
        return rc
