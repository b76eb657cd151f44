# The libpq functions the compiled loops call, as function-pointer types.
#
# They are not linked against: replicator.libpq resolves their addresses in the
# libpq psycopg loaded (its ctypes handle), so the PGconn pointers psycopg
# hands out and the functions reading them always come from one library.
# Prototypes as in libpq-fe.h; PGconn is opaque here.

ctypedef int (*getcopydata_fn)(void *conn, char **buf, int async_) noexcept nogil
ctypedef int (*putcopydata_fn)(void *conn, const char *buf, int nbytes) noexcept nogil
ctypedef int (*consumeinput_fn)(void *conn) noexcept nogil
ctypedef void (*freemem_fn)(void *ptr) noexcept nogil
