# Included by core.pyx: bounds-checked big-endian reads over one pgoutput message (struct
# Reader in core.pxd). Every read names what it reads, so a truncated message says which field.

cdef int fail(Reader* r, str reason) except -1:
    raise DecodeError(reason, chr(r.msg_type) if r.msg_type >= 0 else None, r.pos, r.index)


cdef inline int need(Reader* r, Py_ssize_t n, const char* what) except -1:
    if n < 0 or r.end - r.pos < n:
        fail(r, f"message truncated: {what.decode('ascii')} needs {n} bytes, "
                f"{r.end - r.pos} left")
    return 0


cdef inline uint8_t read_u8(Reader* r, const char* what) except? 0xFF:
    if r.end - r.pos < 1:
        need(r, 1, what)
    r.pos += 1
    return r.p[r.pos - 1]


cdef inline uint16_t read_u16(Reader* r, const char* what) except? 0xFFFF:
    if r.end - r.pos < 2:
        need(r, 2, what)
    cdef const uint8_t* q = r.p + r.pos
    r.pos += 2
    return (<uint16_t>q[0] << 8) | q[1]


cdef inline uint32_t read_u32(Reader* r, const char* what) except? 0xFFFFFFFF:
    if r.end - r.pos < 4:
        need(r, 4, what)
    cdef const uint8_t* q = r.p + r.pos
    r.pos += 4
    return (<uint32_t>q[0] << 24) | (<uint32_t>q[1] << 16) | (<uint32_t>q[2] << 8) | q[3]


cdef inline uint64_t read_u64(Reader* r, const char* what) except? 0xFFFFFFFFFFFFFFFF:
    if r.end - r.pos < 8:
        need(r, 8, what)
    cdef const uint8_t* q = r.p + r.pos
    r.pos += 8
    return ((<uint64_t>q[0] << 56) | (<uint64_t>q[1] << 48) | (<uint64_t>q[2] << 40)
            | (<uint64_t>q[3] << 32) | (<uint64_t>q[4] << 24) | (<uint64_t>q[5] << 16)
            | (<uint64_t>q[6] << 8) | q[7])


cdef str read_cstring(Reader* r, const char* what):
    """A NUL-terminated UTF-8 string (names in Relation/Type/Origin/Message): off the hot path."""
    cdef const void* nul = memchr(r.p + r.pos, 0, r.end - r.pos) if r.end > r.pos else NULL
    if nul == NULL:
        fail(r, f"unterminated string ({what.decode('ascii')})")
    cdef Py_ssize_t n = <const uint8_t*>nul - (r.p + r.pos)
    try:
        text = (<const char*>(r.p + r.pos))[:n].decode("utf-8")
    except UnicodeDecodeError:
        fail(r, f"invalid UTF-8 in {what.decode('ascii')}")
    r.pos += n + 1
    return text


