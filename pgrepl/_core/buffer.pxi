# Included by core.pyx: the output buffer (struct Buf in core.pxd). It grows geometrically and
# is reused record after record, so writing JSON allocates nothing per row.

cdef int buf_grow(Buf* b, Py_ssize_t need) except -1:
    cdef Py_ssize_t cap = b.cap if b.cap > 0 else 512
    while cap < b.len + need:
        cap *= 2
    cdef char* data = <char*>PyMem_Realloc(b.data, cap)
    if data == NULL:
        raise MemoryError()
    b.data = data
    b.cap = cap
    return 0


cdef inline int buf_reserve(Buf* b, Py_ssize_t need) except -1:
    if b.len + need > b.cap:
        buf_grow(b, need)
    return 0


cdef inline int buf_put(Buf* b, const char* s, Py_ssize_t n) except -1:
    if b.len + n > b.cap:
        buf_grow(b, n)
    memcpy(b.data + b.len, s, n)
    b.len += n
    return 0


cdef inline int buf_put_bytes(Buf* b, bytes s) except -1:
    return buf_put(b, PyBytes_AS_STRING(s), PyBytes_GET_SIZE(s))


cdef inline int buf_put_u64(Buf* b, uint64_t v) except -1:
    cdef char tmp[20]
    cdef int i = 20
    while True:
        i -= 1
        tmp[i] = <char>(48 + v % 10)
        v //= 10
        if v == 0:
            break
    return buf_put(b, tmp + i, 20 - i)

