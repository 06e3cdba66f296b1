# Included by core.pyx: snapshot rows. A table read with ``COPY ... TO STDOUT`` (text format) gives
# one line per row: fields separated by tabs, NULL as \N, backslash escapes for \ and control
# characters. The output functions are the ones pgoutput uses, so once unescaped the values are
# byte for byte what the stream sends, and the decoder writes the same Insert record for them.


cdef inline uint8_t copy_escape_value(uint8_t c) noexcept nogil:
    """The byte a backslash escape stands for in COPY text format (\\X for any other X is X)."""
    if c == 0x62:    # b
        return 0x08
    if c == 0x66:    # f
        return 0x0C
    if c == 0x6E:    # n
        return 0x0A
    if c == 0x72:    # r
        return 0x0D
    if c == 0x74:    # t
        return 0x09
    if c == 0x76:    # v
        return 0x0B
    return c


cdef int copy_split(const uint8_t* s, Py_ssize_t n, Buf* out, Col* cols, int max_cols) except -1:
    """Unescape the fields of one COPY text line into ``out``; ``cols`` point at them (kind 't' or
    'n' for NULL). Returns how many fields the line has (only the first ``max_cols`` are kept)."""
    if n and s[n - 1] == 0x0A:
        n -= 1
    out.len = 0
    buf_reserve(out, n + 1)  # unescaped text is never longer than escaped text
    cdef char* dst = out.data
    cdef Py_ssize_t i = 0
    cdef Py_ssize_t start
    cdef int count = 0
    cdef uint8_t c
    while True:
        if i + 2 <= n and s[i] == 0x5C and s[i + 1] == 0x4E and (i + 2 == n or s[i + 2] == 0x09):
            if count < max_cols:
                cols[count].kind = K_NULL
            i += 2
        else:
            start = out.len
            while i < n and s[i] != 0x09:
                c = s[i]
                if c == 0x5C:
                    if i + 1 >= n:
                        raise DecodeError("COPY row ends in a lone backslash", "S", i)
                    c = copy_escape_value(s[i + 1])
                    i += 2
                else:
                    i += 1
                dst[out.len] = <char>c
                out.len += 1
            if count < max_cols:
                cols[count].kind = K_TEXT
                cols[count].off = start
                cols[count].len = <int32_t>(out.len - start)
        count += 1
        if i >= n:
            return count
        i += 1  # the tab


def encode_copy_rows(Decoder decoder, uint32_t relid, list rows, uint64_t lsn, uint64_t first_seq):
    """Snapshot rows as Insert records: ``rows`` are COPY text lines of the table registered as
    ``relid`` (``define_relation``); the records take positions ``(lsn, first_seq)``, ``(lsn,
    first_seq + 1)``... and get keys and partitions exactly as stream records do. Returns a ``Batch``."""
    cdef Relation rel = decoder._relations.get(relid)
    if rel is None:
        raise ConfigError(f"relation id {relid} was not defined for snapshot rows")
    if rel.config_problem is not None:
        raise ConfigError(rel.config_problem)
    cdef Batch batch = Batch()
    cdef Reader r
    cdef Py_ssize_t index
    cdef bytes line
    cdef int fields
    cdef uint64_t saved_lsn = decoder._tx_lsn
    cdef uint64_t saved_seq = decoder._seq
    decoder._clear_slots()
    decoder._tx_lsn = lsn
    decoder._seq = first_seq
    try:
        for index in range(len(rows)):
            line = rows[index]
            fields = copy_split(<const uint8_t*>PyBytes_AS_STRING(line), PyBytes_GET_SIZE(line),
                                &decoder._scratch, decoder._new, rel.ncols)
            if fields != rel.ncols:
                raise DecodeError(f"COPY row has {fields} fields but table {rel.qualified_name} has {rel.ncols} "
                                  "columns", "S", 0, index)
            r.p = <const uint8_t*>decoder._scratch.data
            r.pos = 0
            r.end = decoder._scratch.len
            r.msg_type = 0x53  # 'S': a snapshot row
            r.index = index
            decoder._emit(&r, rel, batch, 0x49)
        decoder._collect_markers(batch)
    finally:
        decoder._clear_slots()
        decoder._tx_lsn = saved_lsn
        decoder._seq = saved_seq
    return batch


def copy_row_values(bytes line):
    """The fields of one COPY text line, unescaped: ``str`` values, ``None`` for NULL."""
    cdef const uint8_t* s = <const uint8_t*>PyBytes_AS_STRING(line)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(line)
    cdef int width = <int>line.count(b"\t") + 1
    cdef Buf out
    out.data = NULL
    out.len = 0
    out.cap = 0
    cdef Col* cols = <Col*>PyMem_Malloc(sizeof(Col) * width)
    if cols == NULL:
        raise MemoryError()
    cdef int i
    try:
        copy_split(s, n, &out, cols, width)
        values = []
        for i in range(width):
            if cols[i].kind == K_NULL:
                values.append(None)
            else:
                values.append(PyUnicode_DecodeUTF8(out.data + cols[i].off, cols[i].len, "strict"))
        return values
    finally:
        PyMem_Free(cols)
        PyMem_Free(out.data)


def copy_row_keys(list rows, tuple positions, int width):
    """Each COPY row's identity: the unescaped fields at ``positions`` (of ``width``), joined by NUL
    bytes, NULL written as a 0xFF byte (neither can occur in PostgreSQL text)."""
    cdef Buf out
    cdef Buf key
    out.data = NULL
    out.len = 0
    out.cap = 0
    key.data = NULL
    key.len = 0
    key.cap = 0
    cdef Col* cols = <Col*>PyMem_Malloc(sizeof(Col) * (width + 1))
    if cols == NULL:
        raise MemoryError()
    cdef list keys = []
    cdef bytes line
    cdef int j
    cdef int c
    cdef int npos = len(positions)
    try:
        for line in rows:
            if copy_split(<const uint8_t*>PyBytes_AS_STRING(line), PyBytes_GET_SIZE(line), &out, cols, width) != width:
                raise DecodeError(f"COPY row does not have {width} fields", "S", 0)
            key.len = 0
            for j in range(npos):
                c = positions[j]
                if j:
                    buf_put(&key, b"\x00", 1)
                if cols[c].kind == K_NULL:
                    buf_put(&key, b"\xff", 1)
                else:
                    buf_put(&key, out.data + cols[c].off, cols[c].len)
            keys.append(PyBytes_FromStringAndSize(key.data, key.len))
        return keys
    finally:
        PyMem_Free(cols)
        PyMem_Free(out.data)
        PyMem_Free(key.data)
