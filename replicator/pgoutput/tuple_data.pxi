# Included by _decode.pyx: a TupleData's fields (protocol-logicalrep-message-formats),
# pointed at where they are in the message, never copied.


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
