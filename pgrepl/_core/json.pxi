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


cdef extern from *:
    """
    /* The first of 16 bytes that JSON string escaping must look at: '"', '\\\\', a control byte
     * (< 0x20) or the start of a multi-byte UTF-8 sequence (>= 0x80); 16 when there is none.
     * Values of kilobytes are mostly plain ASCII, so this scan is most of the work: SSE2 (part of
     * every x86-64) looks at 16 bytes in a handful of instructions, where the portable version
     * below needs about four times as many. Byte order matters for the portable version: on a
     * little-endian machine the lowest flagged bit is the first flagged byte (the subtractions
     * only borrow upwards from a byte that is itself flagged). */
    #if defined(__SSE2__) && !defined(PGREPL_NO_SIMD)
    #include <emmintrin.h>
    static inline int pgrepl_json_scan16(const unsigned char* s) {
        __m128i v = _mm_loadu_si128((const __m128i*)s);
        /* signed compare: bytes >= 0x80 are negative, so "< 0x20" catches them with the controls */
        __m128i care = _mm_or_si128(_mm_cmplt_epi8(v, _mm_set1_epi8(0x20)),
                                    _mm_or_si128(_mm_cmpeq_epi8(v, _mm_set1_epi8(0x22)),
                                                 _mm_cmpeq_epi8(v, _mm_set1_epi8(0x5C))));
        int mask = _mm_movemask_epi8(care);
        return mask ? __builtin_ctz((unsigned)mask) : 16;
    }
    #elif (defined(__GNUC__) || defined(__clang__)) && defined(__BYTE_ORDER__) \\
          && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    static inline uint64_t pgrepl_json_care8(const unsigned char* s) {
        uint64_t w, ones = 0x0101010101010101ULL, quote, backslash;
        memcpy(&w, s, 8);
        quote = w ^ (ones * 0x22);
        backslash = w ^ (ones * 0x5C);
        return (w | ((w - ones * 0x20) & ~w) | ((quote - ones) & ~quote)
                | ((backslash - ones) & ~backslash)) & (ones * 0x80);
    }
    static inline int pgrepl_json_scan16(const unsigned char* s) {
        uint64_t m = pgrepl_json_care8(s);
        if (m) return __builtin_ctzll(m) >> 3;
        m = pgrepl_json_care8(s + 8);
        return m ? 8 + (__builtin_ctzll(m) >> 3) : 16;
    }
    #else
    static inline int pgrepl_json_scan16(const unsigned char* s) {
        int i;
        for (i = 0; i < 16; i++) {
            unsigned char c = s[i];
            if (c < 0x20 || c >= 0x80 || c == 0x22 || c == 0x5C) return i;
        }
        return 16;
    }
    #endif
    """
    int json_scan16 "pgrepl_json_scan16"(const uint8_t* s) noexcept nogil


cdef Py_ssize_t put_json_string(Buf* b, const uint8_t* s, Py_ssize_t n) except -2:
    """Append ``"<escaped s>"``; returns -1 (writing nothing useful) when s is not valid UTF-8."""
    # 6 output bytes per input byte at worst (\u00XX), the quotes, and 16 bytes of slack: the
    # loop below stores 16 bytes at a time whatever they are and keeps only the clean ones
    # (at input i the output is at most 6i + 1 bytes long), so a run of plain text costs no
    # length bookkeeping and a quote every few bytes (JSON documents) no memcpy call.
    buf_reserve(b, n * 6 + 18)
    cdef char* out = b.data + b.len
    cdef Py_ssize_t o = 0
    cdef Py_ssize_t i = 0
    cdef Py_ssize_t seq
    cdef int k
    cdef uint8_t c
    cdef uint8_t tail[16]
    out[o] = b'"'
    o += 1
    while i < n:
        if n - i >= 16:
            k = json_scan16(s + i)
            memcpy(out + o, s + i, 16)
        else:
            # the last bytes, padded with spaces (never flagged): reading past ``s + n`` could
            # leave the message's memory
            memset(tail, 0x20, 16)
            memcpy(tail, s + i, n - i)
            k = json_scan16(tail)
            memcpy(out + o, tail, 16)
            if k >= n - i:
                o += n - i
                break
        i += k
        o += k
        if k == 16:
            continue
        c = s[i]
        if BYTE_CLASS[c] == 1:
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


