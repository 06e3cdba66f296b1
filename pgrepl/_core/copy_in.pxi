# Included by core.pyx: ops into ``COPY ... FROM STDIN`` text, for sink handlers.
#
# A batch handler that writes its ops with COPY spends most of its time building the COPY text
# in Python (a join and a few replaces per value). Here the lines are written in C into one
# buffer: per value only the four characters COPY's text format needs escaped are looked at.

# 1: the byte needs a backslash escape in COPY text format (backslash, tab, newline, carriage return)
cdef uint8_t COPY_NEEDS_ESCAPE[256]


cdef void _init_copy_in():
    cdef int c
    for c in range(256):
        COPY_NEEDS_ESCAPE[c] = 1 if c in (0x5C, 0x09, 0x0A, 0x0D) else 0

_init_copy_in()


cdef int _put_copy_value(Buf* b, object value) except -1:
    """Append one value in COPY text format: ``\\N`` for None, else its UTF-8 with \\\\ \\t \\n \\r escaped."""
    cdef Py_ssize_t n
    cdef const char* s
    cdef Py_ssize_t i
    cdef Py_ssize_t run
    cdef uint8_t c
    cdef char* out
    if value is None:
        return buf_put(b, b"\\N", 2)
    if not isinstance(value, str):
        raise TypeError(f"COPY values must be str or None, got {type(value).__name__}")
    s = PyUnicode_AsUTF8AndSize(value, &n)
    buf_reserve(b, 2 * n)
    out = b.data + b.len
    i = 0
    while i < n:
        run = i
        while i < n and not COPY_NEEDS_ESCAPE[<uint8_t>s[i]]:
            i += 1
        if i > run:
            memcpy(out, s + run, i - run)
            out += i - run
            if i >= n:
                break
        c = <uint8_t>s[i]
        out[0] = b'\\'
        out[1] = <char>(b'\\' if c == 0x5C else b't' if c == 0x09 else b'n' if c == 0x0A else b'r')
        out += 2
        i += 1
    b.len = out - b.data
    return 0


def copy_rows(ops, bint with_kind=False):
    """The ops' rows as ``COPY ... FROM STDIN`` text (bytes, one line per op): the new row of an
    Insert or Update, the old row of a Delete, values tab-separated, ``\\N`` for NULL; with
    ``with_kind`` the op's kind letter (I, U or D) comes first."""
    cdef Buf b
    b.data = NULL
    b.len = 0
    b.cap = 0
    cdef object op
    cdef object change
    cdef object row
    cdef object kind
    cdef Py_ssize_t j
    cdef Py_ssize_t width
    try:
        buf_reserve(&b, 256 * len(ops) + 64)
        for op in ops:
            change = op.op
            row = change.new
            if row is None:
                row = change.old
            if with_kind:
                kind = change.kind
                buf_put(&b, b"I\t" if kind == "Insert" else b"U\t" if kind == "Update" else b"D\t", 2)
            width = len(row)
            for j in range(width):
                if j:
                    buf_put(&b, b"\t", 1)
                _put_copy_value(&b, row[j])
            buf_put(&b, b"\n", 1)
        return PyBytes_FromStringAndSize(b.data, b.len)
    finally:
        PyMem_Free(b.data)
