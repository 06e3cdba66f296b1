# Included by core.pyx: the consumer's hot path, ReplicationOp JSON back into objects.
#
# Parses exactly the layout the producer (and the original Rust library) writes: no spaces,
# fields in order, rows of strings and nulls. Anything else (other key order, whitespace, a
# \u escape of a surrogate, wrong widths, invalid UTF-8) returns None, and the caller takes
# the general orjson path, which accepts or rejects with the precise error.

# (prefix bytes b'{"table_name":…,"col_names":[…],', table_name, columns) of the last record;
# one tuple so that threads always see a consistent triple
cdef tuple _last_prefix = None
cdef str KIND_INSERT = "Insert"
cdef str KIND_UPDATE = "Update"
cdef str KIND_DELETE = "Delete"


cdef struct JScan:
    const char* p
    Py_ssize_t pos
    Py_ssize_t end
    Buf tmp


cdef inline bint js_lit(JScan* j, const char* lit, Py_ssize_t n) noexcept:
    if j.end - j.pos < n or memcmp(j.p + j.pos, lit, n) != 0:
        return False
    j.pos += n
    return True


cdef inline int hexval(char c) noexcept:
    if b'0' <= c <= b'9':
        return c - 48
    if b'a' <= c <= b'f':
        return c - 87
    if b'A' <= c <= b'F':
        return c - 55
    return -1


cdef object js_string(JScan* j):
    """A JSON string at j.pos (opening quote) as str, or None (fall back)."""
    if j.pos >= j.end or j.p[j.pos] != b'"':
        return None
    cdef Py_ssize_t start = j.pos + 1
    cdef Py_ssize_t i = start
    cdef unsigned char c
    while i < j.end:
        c = <unsigned char>j.p[i]
        if c == 0x22:
            try:
                text = PyUnicode_DecodeUTF8(j.p + start, i - start, "strict")
            except UnicodeDecodeError:
                return None
            j.pos = i + 1
            return text
        if c == 0x5C:
            return js_escaped_string(j, start)
        if c < 0x20:
            return None
        i += 1
    return None


cdef object js_escaped_string(JScan* j, Py_ssize_t start):
    """Slow path of js_string: unescape into the scratch buffer, then decode."""
    cdef Py_ssize_t i = start
    cdef Py_ssize_t run
    cdef unsigned char c
    cdef int h0, h1, h2, h3
    cdef unsigned int cp
    cdef char utf8[3]
    j.tmp.len = 0
    while i < j.end:
        c = <unsigned char>j.p[i]
        if c == 0x22:
            try:
                text = PyUnicode_DecodeUTF8(j.tmp.data, j.tmp.len, "strict")
            except UnicodeDecodeError:
                return None
            j.pos = i + 1
            return text
        if c < 0x20:
            return None
        if c != 0x5C:
            run = i
            while i < j.end and <unsigned char>j.p[i] >= 0x20 and j.p[i] != b'"' and j.p[i] != b'\\':
                i += 1
            buf_put(&j.tmp, j.p + run, i - run)
            continue
        if i + 1 >= j.end:
            return None
        c = <unsigned char>j.p[i + 1]
        if c == 0x22 or c == 0x5C or c == 0x2F:
            buf_put(&j.tmp, j.p + i + 1, 1)
        elif c == 0x62:
            buf_put(&j.tmp, b"\b", 1)
        elif c == 0x66:
            buf_put(&j.tmp, b"\f", 1)
        elif c == 0x6E:
            buf_put(&j.tmp, b"\n", 1)
        elif c == 0x72:
            buf_put(&j.tmp, b"\r", 1)
        elif c == 0x74:
            buf_put(&j.tmp, b"\t", 1)
        elif c == 0x75:
            if i + 6 > j.end:
                return None
            h0 = hexval(j.p[i + 2])
            h1 = hexval(j.p[i + 3])
            h2 = hexval(j.p[i + 4])
            h3 = hexval(j.p[i + 5])
            if h0 < 0 or h1 < 0 or h2 < 0 or h3 < 0:
                return None
            cp = (h0 << 12) | (h1 << 8) | (h2 << 4) | h3
            if 0xD800 <= cp <= 0xDFFF:
                return None  # surrogates: leave them to the general path
            if cp < 0x80:
                utf8[0] = <char>cp
                buf_put(&j.tmp, utf8, 1)
            elif cp < 0x800:
                utf8[0] = <char>(0xC0 | (cp >> 6))
                utf8[1] = <char>(0x80 | (cp & 0x3F))
                buf_put(&j.tmp, utf8, 2)
            else:
                utf8[0] = <char>(0xE0 | (cp >> 12))
                utf8[1] = <char>(0x80 | ((cp >> 6) & 0x3F))
                utf8[2] = <char>(0x80 | (cp & 0x3F))
                buf_put(&j.tmp, utf8, 3)
            i += 6
            continue
        else:
            return None
        i += 2
    return None


cdef bint js_uint(JScan* j, uint64_t* out) noexcept:
    """A JSON non-negative integer that fits in 64 bits (no sign, no fraction, no leading zero)."""
    cdef Py_ssize_t start = j.pos
    cdef uint64_t v = 0
    cdef uint64_t d
    while j.pos < j.end and b'0' <= j.p[j.pos] <= b'9':
        d = <uint64_t>(j.p[j.pos] - 48)
        if v > (~(<uint64_t>0) - d) // 10:
            return False
        v = v * 10 + d
        j.pos += 1
    if j.pos == start or (j.p[start] == b'0' and j.pos - start > 1):
        return False
    out[0] = v
    return True


cdef object js_row(JScan* j, Py_ssize_t width):
    """``[value, …]`` of exactly ``width`` strings/nulls as a tuple, or None."""
    if not js_lit(j, b"[", 1):
        return None
    cdef tuple row = PyTuple_New(width)
    cdef Py_ssize_t k
    cdef object item
    for k in range(width):
        if k and not js_lit(j, b",", 1):
            return None
        if js_lit(j, b"null", 4):
            item = None
        else:
            item = js_string(j)
            if item is None:
                return None
        Py_INCREF(item)
        PyTuple_SET_ITEM(row, k, item)
    if not js_lit(j, b"]", 1):
        return None
    return row


def parse_canonical(value, build):
    """Parse a ReplicationOp record written in the canonical layout; None means "not canonical".

    The op is made by ``build(table_name, col_names, lsn, seq_id, kind, old, new)``, the one
    constructor ``pgrepl.model`` uses for every parsed record.
    """
    if type(value) is not bytes:
        return None
    cdef JScan j
    j.p = PyBytes_AS_STRING(value)
    j.pos = 0
    j.end = PyBytes_GET_SIZE(value)
    j.tmp.data = NULL
    j.tmp.len = 0
    j.tmp.cap = 0
    try:
        return _parse_op(&j, value, build)
    finally:
        PyMem_Free(j.tmp.data)


cdef object _parse_op(JScan* j, bytes value, object build):
    global _last_prefix
    cdef uint64_t lsn
    cdef uint64_t seq_id
    cdef Py_ssize_t width
    cdef object old = None
    cdef object new = None
    cdef str kind
    cdef tuple cached = _last_prefix
    cdef bytes last = cached[0] if cached is not None else None
    # the prefix (table and columns) repeats record after record: reuse the parsed one
    if last is not None and j.end > len(last) and memcmp(j.p, PyBytes_AS_STRING(last), len(last)) == 0:
        j.pos = len(last)
        table_name = cached[1]
        columns = cached[2]
    else:
        if not js_lit(j, b'{"table_name":', 14):
            return None
        table_name = js_string(j)
        if table_name is None or not js_lit(j, b',"col_names":[', 14):
            return None
        names = []
        if not js_lit(j, b"]", 1):
            while True:
                name = js_string(j)
                if name is None:
                    return None
                names.append(name)
                if js_lit(j, b"]", 1):
                    break
                if not js_lit(j, b",", 1):
                    return None
        if not js_lit(j, b",", 1):
            return None
        columns = tuple(names)
        _last_prefix = (value[:j.pos], table_name, columns)
    width = len(columns)
    if not js_lit(j, b'"lsn":', 6) or not js_uint(j, &lsn):
        return None
    if not js_lit(j, b',"seq_id":', 10) or not js_uint(j, &seq_id):
        return None
    if js_lit(j, b',"op":{"Insert":', 16):
        kind = KIND_INSERT
        new = js_row(j, width)
        if new is None:
            return None
    elif js_lit(j, b',"op":{"Update":[', 17):
        kind = KIND_UPDATE
        old = js_row(j, width)
        if old is None or not js_lit(j, b",", 1):
            return None
        new = js_row(j, width)
        if new is None or not js_lit(j, b"]", 1):
            return None
    elif js_lit(j, b',"op":{"Delete":', 16):
        kind = KIND_DELETE
        old = js_row(j, width)
        if old is None:
            return None
    else:
        return None
    if not js_lit(j, b"}}", 2) or j.pos != j.end:
        return None
    return build(table_name, columns, lsn, seq_id, kind, old, new)
