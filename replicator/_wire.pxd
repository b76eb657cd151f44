# Big-endian integers of the PostgreSQL wire protocol and of COPY BINARY.
# Inline, so every module that cimports them gets its own copy in C and no
# call crosses a module boundary.

from libc.stdint cimport int16_t, int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t


cdef inline uint16_t rd16(const char *p) noexcept nogil:
    cdef const uint8_t *u = <const uint8_t *>p
    return <uint16_t>((u[0] << 8) | u[1])


cdef inline uint32_t rd32(const char *p) noexcept nogil:
    cdef const uint8_t *u = <const uint8_t *>p
    return (<uint32_t>u[0] << 24) | (<uint32_t>u[1] << 16) | (<uint32_t>u[2] << 8) | u[3]


cdef inline uint64_t rd64(const char *p) noexcept nogil:
    return (<uint64_t>rd32(p) << 32) | rd32(p + 4)


cdef inline void wr16(char *p, int16_t v) noexcept nogil:
    cdef uint16_t u = <uint16_t>v
    p[0] = <char>(u >> 8)
    p[1] = <char>(u & 0xff)


cdef inline void wr32(char *p, int32_t v) noexcept nogil:
    cdef uint32_t u = <uint32_t>v
    p[0] = <char>(u >> 24)
    p[1] = <char>((u >> 16) & 0xff)
    p[2] = <char>((u >> 8) & 0xff)
    p[3] = <char>(u & 0xff)


cdef inline void wr64(char *p, int64_t v) noexcept nogil:
    wr32(p, <int32_t>(<uint64_t>v >> 32))
    wr32(p + 4, <int32_t>(<uint32_t>(<uint64_t>v)))
