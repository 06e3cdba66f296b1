# Included by core.pyx: JSON string escaping, exactly as Rust's serde_json writes strings.

# JSON string escaping, as serde_json does it: '"' and '\\' backslash-escaped, \b \f \n \r \t,
# every other byte below 0x20 as \u00XX (lowercase hex), everything else raw UTF-8 (validated).

# 0: copy as is; 1: needs an escape; 2: start of a multi-byte UTF-8 sequence (or invalid byte)
cdef uint8_t BYTE_CLASS[256]
cdef char SHORT_ESCAPE[32]
cdef const char* HEX = b"0123456789abcdef"


cdef void _init_tables():
    cdef int c
    for c in range(256):
        if c < 0x20 or c == 0x22 or c == 0x5C:
            BYTE_CLASS[c] = 1
        elif c < 0x80:
            BYTE_CLASS[c] = 0
        else:
            BYTE_CLASS[c] = 2
    for c in range(32):
        SHORT_ESCAPE[c] = 0
    SHORT_ESCAPE[0x08] = b'b'
    SHORT_ESCAPE[0x09] = b't'
    SHORT_ESCAPE[0x0A] = b'n'
    SHORT_ESCAPE[0x0C] = b'f'
    SHORT_ESCAPE[0x0D] = b'r'

_init_tables()


cdef inline Py_ssize_t utf8_seq_len(const uint8_t* s, Py_ssize_t i, Py_ssize_t n) nogil:
    """Length of the valid UTF-8 sequence starting at s[i] (a byte >= 0x80), or 0 when invalid."""
    cdef uint8_t c = s[i]
    cdef uint8_t lo = 0x80
    cdef uint8_t hi = 0xBF
    cdef Py_ssize_t length
    cdef Py_ssize_t k
    if 0xC2 <= c <= 0xDF:
        length = 2
    elif 0xE0 <= c <= 0xEF:
        length = 3
        if c == 0xE0:
            lo = 0xA0
        elif c == 0xED:
            hi = 0x9F
    elif 0xF0 <= c <= 0xF4:
        length = 4
        if c == 0xF0:
            lo = 0x90
        elif c == 0xF4:
            hi = 0x8F
    else:
        return 0
    if i + length > n:
        return 0
    if s[i + 1] < lo or s[i + 1] > hi:
        return 0
    for k in range(2, length):
        if s[i + k] < 0x80 or s[i + k] > 0xBF:
            return 0
    return length


cdef inline uint64_t load64(const uint8_t* p) noexcept nogil:
    cdef uint64_t v
    memcpy(&v, p, 8)
    return v


cdef inline bint needs_care(uint64_t w) noexcept nogil:
    # True when any byte of w is >= 0x80, < 0x20, '"' or '\\' (SWAR: works for any byte order)
    cdef uint64_t ones = 0x0101010101010101ULL
    cdef uint64_t highs = 0x8080808080808080ULL
    cdef uint64_t quote = w ^ (ones * 0x22)
    cdef uint64_t backslash = w ^ (ones * 0x5C)
    return ((w | ((w - ones * 0x20) & ~w)
             | ((quote - ones) & ~quote)
             | ((backslash - ones) & ~backslash)) & highs) != 0


cdef Py_ssize_t put_json_string(Buf* b, const uint8_t* s, Py_ssize_t n) except -2:
    """Append ``"<escaped s>"``; returns -1 (writing nothing useful) when s is not valid UTF-8."""
    buf_reserve(b, n * 6 + 2)
    cdef char* out = b.data + b.len
    cdef Py_ssize_t o = 0
    cdef Py_ssize_t i = 0
    cdef Py_ssize_t run
    cdef Py_ssize_t seq
    cdef uint8_t c
    cdef uint8_t cls
    out[o] = b'"'
    o += 1
    while i < n:
        run = i
        # 8 bytes at a time while none needs escaping or UTF-8 validation
        while i + 8 <= n and not needs_care(load64(s + i)):
            i += 8
        while i < n and BYTE_CLASS[s[i]] == 0:
            i += 1
        if i > run:
            memcpy(out + o, s + run, i - run)
            o += i - run
            if i >= n:
                break
        c = s[i]
        cls = BYTE_CLASS[c]
        if cls == 1:
            out[o] = b'\\'
            if c == 0x22 or c == 0x5C:
                out[o + 1] = <char>c
                o += 2
            elif SHORT_ESCAPE[c] != 0:
                out[o + 1] = SHORT_ESCAPE[c]
                o += 2
            else:
                out[o + 1] = b'u'
                out[o + 2] = b'0'
                out[o + 3] = b'0'
                out[o + 4] = HEX[c >> 4]
                out[o + 5] = HEX[c & 15]
                o += 6
            i += 1
        else:
            seq = utf8_seq_len(s, i, n)
            if seq == 0:
                return -1
            memcpy(out + o, s + i, seq)
            o += seq
            i += seq
    out[o] = b'"'
    o += 1
    b.len += o
    return o


def escape_json_string(text):
    """Return ``text`` (str, or UTF-8 bytes) as a JSON string literal exactly as serde_json writes it.

    Used for table and column names (once per Relation message) and exposed for tests and
    tools; values go through the same C routine in place. ``ValueError`` on invalid UTF-8.
    """
    cdef bytes raw = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else bytes(text)
    cdef Buf b
    b.data = NULL
    b.len = 0
    b.cap = 0
    try:
        if put_json_string(&b, <const uint8_t*>PyBytes_AS_STRING(raw), len(raw)) < 0:
            raise ValueError(f"not valid UTF-8: {text!r}")
        return PyBytes_FromStringAndSize(b.data, b.len)
    finally:
        PyMem_Free(b.data)


