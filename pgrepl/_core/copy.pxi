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


cdef class _Lines:
    """The COPY lines of ``rows``: a list of lines, or one block of newline-terminated lines (what
    ``copy_out`` hands over), walked without making a bytes object per line."""

    cdef object rows
    cdef list items
    cdef const char* block
    cdef Py_ssize_t pos
    cdef Py_ssize_t end
    cdef Py_ssize_t index

    def __init__(self, rows):
        self.rows = rows
        self.index = 0
        if isinstance(rows, bytes):
            self.items = None
            self.block = PyBytes_AS_STRING(rows)
            self.pos = 0
            self.end = PyBytes_GET_SIZE(rows)
        elif isinstance(rows, list):
            self.items = rows
        else:
            raise TypeError("COPY rows must be a list of lines or a bytes block of lines")

    cdef bint next(self, const uint8_t** line, Py_ssize_t* n) except -1:
        """The next line (its newline included when it has one); False at the end."""
        cdef const char* nl
        cdef bytes item
        if self.items is not None:
            if self.index >= len(self.items):
                return False
            item = self.items[self.index]
            line[0] = <const uint8_t*>PyBytes_AS_STRING(item)
            n[0] = PyBytes_GET_SIZE(item)
        else:
            if self.pos >= self.end:
                return False
            nl = <const char*>memchr(self.block + self.pos, 0x0A, self.end - self.pos)
            line[0] = <const uint8_t*>(self.block + self.pos)
            n[0] = (nl - (self.block + self.pos) + 1) if nl != NULL else self.end - self.pos
            self.pos += n[0]
        self.index += 1
        return True


def encode_copy_rows(Decoder decoder, uint32_t relid, rows, uint64_t lsn, uint64_t first_seq, keep=None):
    """Snapshot rows as Insert records: ``rows`` are COPY text lines (a list, or one bytes block of
    newline-terminated lines) of the table registered as ``relid`` (``define_relation``); with
    ``keep`` (one byte per line) only the lines whose byte is non-zero. The records take positions
    ``(lsn, first_seq)``, ``(lsn, first_seq + 1)``... and get keys and partitions exactly as stream
    records do. Returns a ``Batch``."""
    cdef Relation rel = decoder._relations.get(relid)
    if rel is None:
        raise ConfigError(f"relation id {relid} was not defined for snapshot rows")
    if rel.config_problem is not None:
        raise ConfigError(rel.config_problem)
    cdef Batch batch = Batch()
    cdef Reader r
    cdef _Lines lines = _Lines(rows)
    cdef const uint8_t* line
    cdef Py_ssize_t n
    cdef Py_ssize_t index
    cdef const char* mask = NULL
    cdef Py_ssize_t mask_len = 0
    cdef int fields
    cdef uint64_t saved_lsn = decoder._tx_lsn
    cdef uint64_t saved_seq = decoder._seq
    if keep is not None:
        mask = PyBytes_AS_STRING(keep)
        mask_len = PyBytes_GET_SIZE(keep)
    decoder._clear_slots()
    decoder._tx_lsn = lsn
    decoder._seq = first_seq
    try:
        while lines.next(&line, &n):
            index = lines.index - 1
            if mask != NULL and (index >= mask_len or not mask[index]):
                continue
            fields = copy_split(line, n, &decoder._scratch, decoder._new, rel.ncols)
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


def copy_row_keys(rows, tuple positions, int width):
    """Each COPY row's identity (``rows``: a list of lines or a bytes block of lines): the unescaped
    fields at ``positions`` (of ``width``), joined by NUL bytes, NULL written as a 0xFF byte
    (neither can occur in PostgreSQL text)."""
    cdef Buf out
    cdef Buf key
    out.data = NULL
    out.len = 0
    out.cap = 0
    key.data = NULL
    key.len = 0
    key.cap = 0
    cdef _Lines lines = _Lines(rows)
    cdef Col* cols = <Col*>PyMem_Malloc(sizeof(Col) * (width + 1))
    if cols == NULL:
        raise MemoryError()
    cdef list keys = []
    cdef const uint8_t* line
    cdef Py_ssize_t n
    cdef int j
    cdef int c
    cdef int npos = len(positions)
    try:
        while lines.next(&line, &n):
            if copy_split(line, n, &out, cols, width) != width:
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


def restamp_copy_records(Decoder decoder, uint32_t relid, Batch records, uint64_t lsn, uint64_t first_seq,
                         keep=None):
    """``records`` (what ``encode_copy_rows`` made for table ``relid`` ahead of time, at any
    position) at positions ``(lsn, first_seq)``, ``(lsn, first_seq + 1)``...: each value is
    written again with the new position, byte for byte what ``encode_copy_rows`` would give now;
    keys and partitions stay, markers are computed for the new batch. With ``keep`` (one byte per
    record) only the records whose byte is non-zero. Returns a ``Batch``."""
    cdef Relation rel = decoder._relations.get(relid)
    if rel is None:
        raise ConfigError(f"relation id {relid} was not defined for snapshot rows")
    cdef Py_ssize_t prefix = PyBytes_GET_SIZE(rel.prefix)
    cdef Batch batch = Batch()
    cdef Buf* out = &decoder._out
    cdef list values = records.values
    cdef Py_ssize_t n = len(values)
    cdef const char* mask = NULL
    cdef Py_ssize_t mask_len = 0
    cdef Py_ssize_t i
    cdef Py_ssize_t q
    cdef Py_ssize_t size
    cdef const char* v
    cdef bytes value
    cdef uint64_t seq = first_seq
    cdef dict last = {}
    cdef object partition
    cdef Py_ssize_t index
    if keep is not None:
        mask = PyBytes_AS_STRING(keep)
        mask_len = PyBytes_GET_SIZE(keep)
    for i in range(n):
        if mask != NULL and (i >= mask_len or not mask[i]):
            continue
        value = values[i]
        v = PyBytes_AS_STRING(value)
        size = PyBytes_GET_SIZE(value)
        # prefix, lsn digits, ,"seq_id":, seq digits, then the rest (,"op":...) as it is
        q = prefix
        while q < size and 48 <= <uint8_t>v[q] <= 57:
            q += 1
        if size - q < PyBytes_GET_SIZE(SEQ_ID) or memcmp(v + q, PyBytes_AS_STRING(SEQ_ID), PyBytes_GET_SIZE(SEQ_ID)) != 0:
            raise DecodeError("not a record of encode_copy_rows for this table", "S", 0, i)
        q += PyBytes_GET_SIZE(SEQ_ID)
        while q < size and 48 <= <uint8_t>v[q] <= 57:
            q += 1
        out.len = 0
        buf_put(out, v, prefix)
        buf_put_u64(out, lsn)
        buf_put_bytes(out, SEQ_ID)
        buf_put_u64(out, seq)
        buf_put(out, v + q, size - q)
        seq += 1
        index = len(batch.values)
        batch.values.append(PyBytes_FromStringAndSize(out.data, out.len))
        batch.topics.append(records.topics[i])
        batch.keys.append(records.keys[i])
        partition = records.partitions[i]
        batch.partitions.append(partition)
        last[(records.topics[i], partition) if partition >= 0 else index] = index
    batch.markers = sorted(last.values())
    return batch
