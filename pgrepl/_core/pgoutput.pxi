# Included by core.pyx: the pgoutput protocol-v1 decoder (fields declared in core.pxd). It keeps
# the Relation cache and the transaction state, decodes each row change in place and writes its
# ReplicationOp JSON into one reusable buffer.

cdef enum:
    K_NULL = 0x6E      # 'n'
    K_TOAST = 0x75     # 'u'
    K_TEXT = 0x74      # 't'
    K_BINARY = 0x62    # 'b'

cdef bytes OP_INSERT = b',"op":{"Insert":['
cdef bytes OP_UPDATE = b',"op":{"Update":[['
cdef bytes OP_DELETE = b',"op":{"Delete":['
cdef bytes SEQ_ID = b',"seq_id":'


# Values at least this long are compared with the old row's before they are escaped (shorter ones
# escape about as fast as they compare).
cdef Py_ssize_t SAME_TEXT_MIN = 64

# An output buffer above this size is given back after SMALL_RECORDS_BEFORE_SHRINK records in a
# row that each used less than 1/64 of it.
cdef Py_ssize_t BIG_OUT_BUFFER = 16 << 20
cdef int SMALL_RECORDS_BEFORE_SHRINK = 256


cdef inline bint same_text(const uint8_t* p, const Col* a, const Col* b) noexcept nogil:
    """Whether two text values of one message have the same bytes (both kind 't')."""
    if b.kind != K_TEXT or a.len != b.len:
        return False
    if a.off == b.off:  # the same bytes: an unchanged TOASTed value filled in from the old row
        return True
    return a.len >= SAME_TEXT_MIN and memcmp(p + a.off, p + b.off, a.len) == 0


cdef int _cmp_index(const void* a, const void* b) noexcept nogil:
    cdef Py_ssize_t x = (<const Py_ssize_t*>a)[0]
    cdef Py_ssize_t y = (<const Py_ssize_t*>b)[0]
    return (x > y) - (x < y)


cdef class Decoder:
    """Turns pgoutput protocol-v1 messages into Kafka records, one decoder per replication stream.

    ``topic_map`` maps table names (``table`` or ``schema.table``) to ``TopicInfo`` or dicts
    with ``name`` and ``partition_key``. ``truncate`` says what a TRUNCATE does: ``"error"``
    (default) raises ``ReplicationError``; ``"skip"`` logs a warning and produces nothing.
    Once ``set_partition_count`` knows a topic's partitions, records get explicit partitions
    that depend on the record alone: CRC-32 of the key modulo the count (librdkafka's default
    for keyed records) or, for a record without a key (or with an empty one), CRC-32 of the
    table's ``schema.table`` name, so a replay lands where the first delivery did.

    ``split_key_changes`` (default True): an Update that changes the partition-key value is
    written as a Delete of the old row (old key, old partition) and an Insert of the new row
    (new key, its partition), so each key's history stays in one partition and in order; False
    writes one Update under the new key, byte for byte what the original library writes.
    """

    def __cinit__(self):
        self._out.data = NULL
        self._out.len = 0
        self._out.cap = 0
        self._key.data = NULL
        self._key.len = 0
        self._key.cap = 0
        self._scratch.data = NULL
        self._scratch.len = 0
        self._scratch.cap = 0
        self._old = NULL
        self._new = NULL
        self._spans = NULL
        self._col_cap = 0
        self._small_records = 0
        self._emitted = 0
        self._part_count = NULL
        self._part_base = NULL
        self._last_index = NULL
        self._touched = NULL
        self._nslots = 0
        self._ntouched = 0

    def __init__(self, topic_map, truncate="error", split_key_changes=True):
        self._topic_map = normalize_topic_map(topic_map)
        self._topic_ids = {}
        for info in self._topic_map.values():
            if info.name not in self._topic_ids:
                self._topic_ids[info.name] = len(self._topic_ids)
        self._ntopics = len(self._topic_ids)
        self._part_count = <int*>PyMem_Malloc(sizeof(int) * self._ntopics)
        self._part_base = <Py_ssize_t*>PyMem_Malloc(sizeof(Py_ssize_t) * self._ntopics)
        if self._part_count == NULL or self._part_base == NULL:
            raise MemoryError()
        memset(self._part_count, 0, sizeof(int) * self._ntopics)
        memset(self._part_base, 0, sizeof(Py_ssize_t) * self._ntopics)
        if truncate not in ("error", "skip"):
            raise ConfigError(f"truncate must be 'error' or 'skip', got {truncate!r}")
        self._truncate_skip = truncate == "skip"
        self._split_key_changes = bool(split_key_changes)
        self._relations = {}
        self._last_rel = None
        self._in_tx = False
        buf_reserve(&self._out, 4096)
        buf_reserve(&self._key, 256)

    def __dealloc__(self):
        PyMem_Free(self._out.data)
        PyMem_Free(self._key.data)
        PyMem_Free(self._scratch.data)
        PyMem_Free(self._old)
        PyMem_Free(self._new)
        PyMem_Free(self._spans)
        PyMem_Free(self._part_count)
        PyMem_Free(self._part_base)
        PyMem_Free(self._last_index)
        PyMem_Free(self._touched)

    @property
    def topics(self):
        """The distinct topic names of the topic map."""
        return list(self._topic_ids)

    def set_partition_count(self, str topic, int count):
        """Tell the decoder how many partitions ``topic`` has, so records get explicit partitions."""
        if topic not in self._topic_ids:
            raise ConfigError(f"topic {topic!r} is not in the topic map")
        if count <= 0:
            raise ConfigError(f"topic {topic!r} must have at least one partition, got {count}")
        self._part_count[<int>self._topic_ids[topic]] = count
        cdef Py_ssize_t total = 0
        cdef int t
        for t in range(self._ntopics):
            self._part_base[t] = total
            total += self._part_count[t]
        cdef Py_ssize_t* last = <Py_ssize_t*>PyMem_Realloc(self._last_index, sizeof(Py_ssize_t) * (total + 1))
        if last == NULL:
            raise MemoryError()
        self._last_index = last
        cdef Py_ssize_t* touched = <Py_ssize_t*>PyMem_Realloc(self._touched, sizeof(Py_ssize_t) * (total + 1))
        if touched == NULL:
            raise MemoryError()
        self._touched = touched
        self._nslots = total
        cdef Py_ssize_t k
        for k in range(total):
            self._last_index[k] = -1
        self._ntouched = 0

    @property
    def in_transaction(self):
        """True between a Begin and its Commit."""
        return self._in_tx

    @property
    def relations(self):
        """The cached relations, by relation id (a copy)."""
        return dict(self._relations)

    def reset(self):
        """Forget transaction state and cached relations: call when a new stream starts."""
        self._relations.clear()
        self._last_rel = None
        self._in_tx = False
        self._seq = 0

    def decode(self, payload):
        """Decode one message: a ``Record``, ``Begin`` or ``Commit``, or ``None`` for the rest.

        An Update split into a Delete and an Insert (``split_key_changes``) gives a tuple of
        the two ``Record``s.
        """
        cdef Batch batch = Batch()
        cdef int msg_type = self._decode_any(payload, batch, 0)
        cdef Record rec
        cdef Begin begin
        cdef Py_ssize_t i
        cdef Py_ssize_t n = len(batch.values)
        if n:
            records = []
            for i in range(n):
                rec = Record.__new__(Record)
                rec.topic = batch.topics[i]
                rec.key = batch.keys[i]
                rec.value = batch.values[i]
                rec.lsn = self._tx_lsn
                rec.seq_id = self._seq - n + i
                records.append(rec)
            return records[0] if n == 1 else tuple(records)
        if batch.commits:
            return batch.commits[0]
        if msg_type == 0x42:  # 'B'
            begin = Begin.__new__(Begin)
            begin.final_lsn = self._tx_lsn
            begin.commit_time = self._begin_time
            begin.xid = self._begin_xid
            return begin
        return None

    def decode_batch(self, payloads):
        """Decode many messages in one call; returns a ``Batch`` of records and commits.

        ``payloads`` is a sequence of ``bytes`` (other buffer objects are accepted, slower).
        A ``DecodeError`` carries the failing message's ``index`` in ``payloads``.
        """
        cdef Batch batch = Batch()
        cdef list items = payloads if type(payloads) is list else list(payloads)
        cdef Py_ssize_t i
        cdef Py_ssize_t n = len(items)
        self._clear_slots()
        try:
            for i in range(n):
                self._decode_any(items[i], batch, i)
            self._collect_markers(batch)
        finally:
            self._clear_slots()
        return batch

    cdef void _clear_slots(self):
        cdef Py_ssize_t k
        for k in range(self._ntouched):
            self._last_index[self._touched[k]] = -1
        self._ntouched = 0

    cdef int _collect_markers(self, Batch batch) except -1:
        """Markers = last record of each touched (topic, partition) slot, in record order."""
        cdef Py_ssize_t k
        cdef list extra = batch.markers   # records with unknown partition, already in order
        if self._ntouched == 0:
            return 0
        cdef Py_ssize_t* idx = <Py_ssize_t*>PyMem_Malloc(sizeof(Py_ssize_t) * self._ntouched)
        if idx == NULL:
            raise MemoryError()
        try:
            for k in range(self._ntouched):
                idx[k] = self._last_index[self._touched[k]]
            qsort(idx, self._ntouched, sizeof(Py_ssize_t), _cmp_index)
            merged = [idx[k] for k in range(self._ntouched)]
        finally:
            PyMem_Free(idx)
        if extra:
            merged.extend(extra)
            merged.sort()
        batch.markers = merged
        return 0

    cdef int _decode_any(self, object payload, Batch batch, Py_ssize_t index) except -1:
        cdef Py_buffer view
        if PyBytes_Check(payload):
            return self._decode_one(<const uint8_t*>PyBytes_AS_STRING(payload),
                                    PyBytes_GET_SIZE(payload), batch, index)
        PyObject_GetBuffer(payload, &view, PyBUF_SIMPLE)
        try:
            return self._decode_one(<const uint8_t*>view.buf, view.len, batch, index)
        finally:
            PyBuffer_Release(&view)

    cdef int _decode_one(self, const uint8_t* p, Py_ssize_t n, Batch batch,
                         Py_ssize_t index) except -1:
        cdef Reader r
        r.p = p
        r.pos = 0
        r.end = n
        r.msg_type = -1
        r.index = index
        if n < 1:
            fail(&r, "empty message")
        r.msg_type = p[0]
        r.pos = 1
        cdef int t = r.msg_type
        if t == 0x49:    # 'I'
            self._row(&r, batch, 0x49)
        elif t == 0x55:  # 'U'
            self._row(&r, batch, 0x55)
        elif t == 0x44:  # 'D'
            self._row(&r, batch, 0x44)
        elif t == 0x42:  # 'B'
            self._begin(&r)
            batch.begins.append(index)
        elif t == 0x43:  # 'C'
            self._commit(&r, batch)
        elif t == 0x52:  # 'R'
            self._relation(&r)
        elif t == 0x59:  # 'Y' Type: we use text output, nothing to remember
            read_u32(&r, b"type oid")
            read_cstring(&r, b"type namespace")
            read_cstring(&r, b"type name")
        elif t == 0x4F:  # 'O' Origin
            read_u64(&r, b"origin lsn")
            read_cstring(&r, b"origin name")
        elif t == 0x4D:  # 'M' logical decoding message: not a row change
            self._message(&r, batch)
        elif t == 0x54:  # 'T'
            self._truncate(&r)
        else:
            fail(&r, f"unknown message type (byte 0x{t:02x}); pgrepl speaks pgoutput "
                     f"proto_version 1")
        if r.pos != r.end:
            fail(&r, f"{r.end - r.pos} unexpected trailing bytes")
        return t

    cdef int _begin(self, Reader* r) except -1:
        if self._in_tx:
            fail(r, "Begin while a transaction is still open (missing Commit)")
        self._tx_lsn = read_u64(r, b"final lsn")
        self._begin_time = <long long>read_u64(r, b"commit timestamp")
        self._begin_xid = read_u32(r, b"xid")
        self._seq = 0
        self._in_tx = True
        return 0

    cdef int _commit(self, Reader* r, Batch batch) except -1:
        if not self._in_tx:
            fail(r, "Commit without a Begin")
        read_u8(r, b"commit flags")
        cdef Commit c = Commit.__new__(Commit)
        c.commit_lsn = read_u64(r, b"commit lsn")
        c.end_lsn = read_u64(r, b"end lsn")
        c.commit_time = <long long>read_u64(r, b"commit timestamp")
        if c.commit_lsn != self._tx_lsn:
            fail(r, f"Commit LSN {c.commit_lsn} differs from the Begin's final LSN {self._tx_lsn}")
        c.record_end = len(batch.values)
        batch.commits.append(c)
        self._in_tx = False
        return 0

    cdef int _message(self, Reader* r, Batch batch) except -1:
        """A logical decoding message: pgrepl's own (prefix ``pgrepl``...) are kept in ``batch.messages``."""
        cdef uint8_t flags = read_u8(r, b"message flags")
        cdef uint64_t lsn = read_u64(r, b"message lsn")
        cdef str prefix = read_cstring(r, b"message prefix")
        cdef uint32_t length = read_u32(r, b"message length")
        need(r, length, b"message content")
        if prefix.startswith("pgrepl"):
            content = PyBytes_FromStringAndSize(<const char*>(r.p + r.pos), length)
            # a transactional message sits in its transaction: it takes the transaction's position
            batch.messages.append((len(batch.values), self._tx_lsn if flags & 1 and self._in_tx else lsn,
                                   prefix, content))
        r.pos += length
        return 0

    cdef int _relation(self, Reader* r) except -1:
        cdef uint32_t relid = read_u32(r, b"relation id")
        cdef str schema = read_cstring(r, b"relation namespace")
        cdef str name = read_cstring(r, b"relation name")
        cdef uint8_t replident = read_u8(r, b"replica identity")
        cdef int ncols = read_u16(r, b"column count")
        cdef list names = []
        cdef int i
        for i in range(ncols):
            read_u8(r, b"column flags")
            names.append(read_cstring(r, b"column name"))
            read_u32(r, b"column type oid")
            read_u32(r, b"column type modifier")
        self._set_relation(relid, schema, name, replident, names)
        return 0

    def define_relation(self, uint32_t relid, str schema, str name, columns):
        """Register a table as a Relation message would (for encoding snapshot rows of it)."""
        self._set_relation(relid, schema, name, 0x66, list(columns))  # 'f': the full row is known

    cdef Relation _set_relation(self, uint32_t relid, str schema, str name, uint8_t replident, list names):
        """Cache a relation: its columns, topic, partition-key positions and JSON prefix."""
        cdef int ncols = len(names)
        cdef Relation rel = Relation.__new__(Relation)
        rel.relid = relid
        rel.schema = schema
        rel.name = name
        rel.columns = tuple(names)
        rel.replica_identity = chr(replident)
        rel.ncols = ncols
        rel.key_idx = NULL
        rel.nkey = 0
        rel.config_problem = None
        info = self._topic_map.get(f"{schema}.{name}") or self._topic_map.get(name)
        rel.topic_info = info
        if info is None:
            rel.topic = None
            rel.config_problem = (
                f"table {rel.qualified_name} is published but has no topic-map entry; add "
                f"'{name}' to the topic map or remove the table from the publication")
        else:
            rel.topic = info.name
            rel.topic_id = self._topic_ids[info.name]
            key_cols = info.partition_key
            rel.key_idx = <int*>PyMem_Malloc(sizeof(int) * (len(key_cols) + 1))
            if rel.key_idx == NULL:
                raise MemoryError()
            for col in key_cols:
                if col not in rel.columns:
                    rel.config_problem = (
                        f"partition-key column {col!r} of table {rel.qualified_name} is not among "
                        f"its published columns {list(rel.columns)!r}; fix the topic map's "
                        f"partition_key")
                    break
                rel.key_idx[rel.nkey] = rel.columns.index(col)
                rel.nkey += 1
        qualified = rel.qualified_name.encode("utf-8")
        rel.name_crc = crc32(<const uint8_t*>PyBytes_AS_STRING(qualified), len(qualified))
        rel.prefix = (b'{"table_name":' + escape_json_string(name) + b',"col_names":['
                      + b",".join([escape_json_string(c) for c in names]) + b'],"lsn":')
        if ncols > self._col_cap:
            self._grow_cols(ncols)
        self._relations[relid] = rel
        self._last_rel = rel
        return rel

    cdef int _grow_cols(self, int ncols) except -1:
        cdef Col* old = <Col*>PyMem_Realloc(self._old, sizeof(Col) * ncols)
        if old == NULL:
            raise MemoryError()
        self._old = old
        cdef Col* new = <Col*>PyMem_Realloc(self._new, sizeof(Col) * ncols)
        if new == NULL:
            raise MemoryError()
        self._new = new
        cdef Py_ssize_t* spans = <Py_ssize_t*>PyMem_Realloc(self._spans, sizeof(Py_ssize_t) * 2 * ncols)
        if spans == NULL:
            raise MemoryError()
        self._spans = spans
        self._col_cap = ncols
        return 0

    cdef Relation _lookup(self, Reader* r, uint32_t relid):
        cdef Relation rel = self._last_rel
        if rel is not None and rel.relid == relid:
            return rel
        rel = self._relations.get(relid)
        if rel is None:
            fail(r, f"unknown relation id {relid} (no Relation message seen for it)")
        self._last_rel = rel
        return rel

    cdef int _tuple(self, Reader* r, Relation rel, Col* cols) except -1:
        cdef int ncols = read_u16(r, b"tuple column count")
        cdef int i
        cdef uint8_t kind
        cdef uint32_t length
        if ncols != rel.ncols:
            fail(r, f"tuple has {ncols} columns but relation {rel.qualified_name} has {rel.ncols}")
        for i in range(ncols):
            kind = read_u8(r, b"tuple column kind")
            cols[i].kind = kind
            if kind == K_TEXT:
                length = read_u32(r, b"column length")
                if length > <uint32_t>(r.end - r.pos):
                    fail(r, f"column {rel.columns[i]!r} claims {length} bytes, "
                            f"{r.end - r.pos} left")
                cols[i].off = r.pos
                cols[i].len = <int32_t>length
                r.pos += length
            elif kind == K_NULL or kind == K_TOAST:
                pass
            elif kind == K_BINARY:
                raise ReplicationError(
                    f"table {rel.qualified_name}: column {rel.columns[i]!r} arrived in binary "
                    f"format; pgrepl needs text format (do not set the 'binary' option)")
            else:
                fail(r, f"unknown tuple column kind 0x{kind:02x}")
        return 0

    cdef int _row(self, Reader* r, Batch batch, int op) except -1:
        if not self._in_tx:
            fail(r, "row change outside a transaction (no Begin)")
        cdef Relation rel = self._lookup(r, read_u32(r, b"relation id"))
        if rel.config_problem is not None:
            raise ConfigError(rel.config_problem)
        cdef uint8_t tag = read_u8(r, b"tuple tag")
        cdef bint has_old = False
        if op == 0x49:
            if tag != 0x4E:
                fail(r, f"Insert expects new tuple tag 'N', got 0x{tag:02x}")
            self._tuple(r, rel, self._new)
        elif op == 0x55:
            if tag == 0x4F or tag == 0x4B:
                if tag == 0x4B:
                    self._missing_old_row(rel, "UPDATE")
                self._tuple(r, rel, self._old)
                has_old = True
                tag = read_u8(r, b"new tuple tag")
            if tag != 0x4E:
                fail(r, f"Update expects tuple tag 'N', got 0x{tag:02x}")
            self._tuple(r, rel, self._new)
            if not has_old:
                self._missing_old_row(rel, "UPDATE")
        else:
            if tag == 0x4B:
                self._missing_old_row(rel, "DELETE")
            if tag != 0x4F:
                fail(r, f"Delete expects tuple tag 'O' or 'K', got 0x{tag:02x}")
            self._tuple(r, rel, self._old)

        if op == 0x55:
            self._fill_unchanged_toast(rel)
            if self._split_key_changes and rel.nkey and self._key_changed(r, rel):
                self._emit(r, rel, batch, 0x44)  # the row leaves its old key ...
                self._emit(r, rel, batch, 0x49)  # ... and arrives under the new one
                return 0
        self._emit(r, rel, batch, op)
        return 0

    cdef bint _key_changed(self, Reader* r, Relation rel) noexcept:
        """Whether an Update's new row has another partition-key value than its old row."""
        cdef int j
        cdef int c
        for j in range(rel.nkey):
            c = rel.key_idx[j]
            if self._old[c].kind != K_TEXT or self._new[c].kind != K_TEXT:
                return False  # a NULL key fails in _make_key, with its own message
            if self._old[c].len != self._new[c].len or memcmp(
                    r.p + self._old[c].off, r.p + self._new[c].off, self._new[c].len) != 0:
                return True
        return False

    cdef int _emit(self, Reader* r, Relation rel, Batch batch, int op) except -1:
        """Write one record of kind ``op`` from the decoded old/new rows and append it to ``batch``."""
        cdef Buf* out = &self._out
        out.len = 0
        buf_put_bytes(out, rel.prefix)
        buf_put_u64(out, self._tx_lsn)
        buf_put_bytes(out, SEQ_ID)
        buf_put_u64(out, self._seq)
        cdef Col* key_row
        if op == 0x49:
            buf_put_bytes(out, OP_INSERT)
            self._put_row(r, rel, self._new, NULL, False)
            key_row = self._new
        elif op == 0x55:
            buf_put_bytes(out, OP_UPDATE)
            self._put_row(r, rel, self._old, NULL, True)
            buf_put(out, b"],[", 3)
            self._put_row(r, rel, self._new, self._old, False)
            buf_put(out, b"]", 1)
            key_row = self._new
        else:
            buf_put_bytes(out, OP_DELETE)
            self._put_row(r, rel, self._old, NULL, False)
            key_row = self._old
        buf_put(out, b"]}}", 3)
        value = PyBytes_FromStringAndSize(out.data, out.len)
        self._emitted += out.len
        if out.cap > BIG_OUT_BUFFER:
            # The buffer is kept while large values keep coming: freeing and regrowing it for
            # each of them would fault its pages in afresh every time. Only a long run of
            # records that each need a sliver of it gives it back, so that a few huge values
            # do not pin a buffer of up to twelve times their size for good.
            if out.len < out.cap // 64:
                self._small_records += 1
                if self._small_records >= SMALL_RECORDS_BEFORE_SHRINK:
                    PyMem_Free(out.data)
                    out.data = NULL
                    out.cap = 0
                    out.len = 0
                    buf_reserve(out, 4096)
                    self._small_records = 0
            else:
                self._small_records = 0
        if rel.nkey:
            key = self._make_key(r, rel, key_row)
        else:
            key = None
            self._key.len = 0
        cdef Py_ssize_t record_index = len(batch.values)
        batch.topics.append(rel.topic)
        batch.keys.append(key)
        batch.values.append(value)
        batch.partitions.append(self._partition(rel, record_index, batch))
        self._seq += 1
        return 0

    cdef int _partition(self, Relation rel, Py_ssize_t record_index, Batch batch) except -2:
        """Pick the record's partition (from the record alone) and remember it as its slot's latest record."""
        cdef int topic_id = rel.topic_id
        cdef int count = self._part_count[topic_id]
        cdef uint32_t part
        cdef Py_ssize_t slot
        if count == 0:
            batch.markers.append(record_index)
            return -1
        if self._key.len > 0:
            part = crc32(<const uint8_t*>self._key.data, self._key.len) % <uint32_t>count
        else:
            part = rel.name_crc % <uint32_t>count
        slot = self._part_base[topic_id] + part
        if self._last_index[slot] < 0:
            self._touched[self._ntouched] = slot
            self._ntouched += 1
        self._last_index[slot] = record_index
        return <int>part

    cdef int _missing_old_row(self, Relation rel, str what) except -1:
        raise ConfigError(
            f"{what} on table {rel.qualified_name} arrived without the old row (replica identity "
            f"{rel.replica_identity!r}); run: ALTER TABLE {rel.qualified_name} REPLICA IDENTITY FULL")

    cdef int _fill_unchanged_toast(self, Relation rel) except -1:
        cdef int i
        for i in range(rel.ncols):
            if self._new[i].kind == K_TOAST:
                if self._old[i].kind == K_TOAST:
                    raise ConfigError(
                        f"UPDATE on table {rel.qualified_name} left TOASTed column "
                        f"{rel.columns[i]!r} unchanged and the old row lacks its value; run: "
                        f"ALTER TABLE {rel.qualified_name} REPLICA IDENTITY FULL")
                self._new[i] = self._old[i]
        return 0

    cdef int _put_row(self, Reader* r, Relation rel, Col* cols, Col* written, bint note) except -1:
        """Append a row's values as JSON array elements.

        ``note``: remember where each value's escaped text went (an Update's old row).
        ``written``: the row written just before with ``note`` (the old row, for the new row), or
        NULL: a value with the same bytes as ``written``'s copies that escaped text instead of
        escaping it again. That is every column an UPDATE leaves unchanged under
        REPLICA IDENTITY FULL, and above all an unchanged TOASTed value, which the new row
        takes from the old one (``_fill_unchanged_toast``): a copy costs a fraction of
        escaping kilobytes of text.
        """
        cdef Buf* out = &self._out
        cdef Py_ssize_t* spans = self._spans
        cdef Py_ssize_t start
        cdef Py_ssize_t length
        cdef int i
        for i in range(rel.ncols):
            if i:
                buf_put(out, b",", 1)
            if cols[i].kind == K_TEXT:
                if written != NULL and same_text(r.p, &cols[i], &written[i]):
                    length = spans[2 * i + 1]
                    buf_reserve(out, length)  # may move the buffer: copy from it afterwards
                    memcpy(out.data + out.len, out.data + spans[2 * i], length)
                    out.len += length
                    continue
                start = out.len
                if put_json_string(out, r.p + cols[i].off, cols[i].len) < 0:
                    r.pos = cols[i].off
                    fail(r, f"invalid UTF-8 in column {rel.columns[i]!r} of table "
                            f"{rel.qualified_name}")
                if note:
                    spans[2 * i] = start
                    spans[2 * i + 1] = out.len - start
            elif cols[i].kind == K_NULL:
                buf_put(out, b"null", 4)
            else:
                raise ConfigError(
                    f"old row of table {rel.qualified_name} lacks the value of TOASTed column "
                    f"{rel.columns[i]!r}; run: ALTER TABLE {rel.qualified_name} REPLICA IDENTITY FULL")
        return 0

    cdef object _make_key(self, Reader* r, Relation rel, Col* cols):
        cdef Buf* key = &self._key
        cdef int j
        cdef int c
        key.len = 0
        for j in range(rel.nkey):
            c = rel.key_idx[j]
            if cols[c].kind != K_TEXT:
                raise ReplicationError(
                    f"partition-key column {rel.columns[c]!r} of table {rel.qualified_name} is "
                    f"NULL at LSN {self._tx_lsn}; make it NOT NULL or choose another partition key")
            buf_put(key, <const char*>(r.p + cols[c].off), cols[c].len)
        return PyBytes_FromStringAndSize(key.data, key.len)

    cdef int _truncate(self, Reader* r) except -1:
        cdef uint32_t nrels = read_u32(r, b"truncate relation count")
        read_u8(r, b"truncate options")
        need(r, <Py_ssize_t>nrels * 4, b"truncate relation ids")
        names = []
        cdef uint32_t i
        cdef uint32_t relid
        for i in range(nrels):
            relid = read_u32(r, b"truncate relation id")
            rel = self._relations.get(relid)
            names.append(rel.qualified_name if rel is not None else f"relation id {relid}")
        where = format_lsn(self._tx_lsn) if self._in_tx else "unknown"
        if self._truncate_skip:
            _log.warning("skipping TRUNCATE of %s in transaction with commit LSN %s (truncate='skip')",
                         ", ".join(names), where)
            return 0
        raise ReplicationError(
            f"TRUNCATE of {', '.join(names)} (transaction commit LSN {where}) cannot be expressed as "
            f"row changes; publish without truncate (ALTER PUBLICATION ... SET (publish = "
            f"'insert, update, delete')) or pass truncate='skip'")


