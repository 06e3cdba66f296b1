# cython: language_level=3
"""pgoutput (protocol v1) decoder that writes ReplicationOp JSON bytes: pgrepl's hot path.

Each Insert/Update/Delete of a mapped table becomes one Kafka record: the topic (a cached
``str``), the key (partition-key values concatenated) and the value, the JSON that Rust's
``serde_json::to_string`` prints for the original library's ``ReplicationOp``. Parsing runs on
C pointers over the payload; JSON is written into one reusable C buffer; the only Python
objects made per row are the key and value ``bytes``.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_Check, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from libc.stdint cimport int32_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport qsort
from libc.string cimport memchr, memcpy, memset

import logging

from pgrepl.errors import ConfigError, DecodeError, PgreplError, ReplicationError
from pgrepl.topics import TopicInfo, normalize_topic_map

_log = logging.getLogger("pgrepl.decode")

# ---------------------------------------------------------------------------------------------
# Output buffer: grows geometrically, reused for every record.

cdef struct Buf:
    char* data
    Py_ssize_t len
    Py_ssize_t cap


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


# ---------------------------------------------------------------------------------------------
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


cdef uint32_t CRC32_TABLE[8][256]   # slicing-by-8 tables


cdef void _init_crc32():
    cdef uint32_t c
    cdef int n
    cdef int k
    for n in range(256):
        c = <uint32_t>n
        for k in range(8):
            c = ((<uint32_t>0xEDB88320) ^ (c >> 1)) if (c & 1) else (c >> 1)
        CRC32_TABLE[0][n] = c
    for n in range(256):
        for k in range(1, 8):
            CRC32_TABLE[k][n] = (CRC32_TABLE[k - 1][n] >> 8) ^ CRC32_TABLE[0][CRC32_TABLE[k - 1][n] & 0xFF]


cdef inline uint32_t _le32(const uint8_t* p) noexcept nogil:
    return (<uint32_t>p[0]) | (<uint32_t>p[1] << 8) | (<uint32_t>p[2] << 16) | (<uint32_t>p[3] << 24)


cdef inline uint32_t crc32(const uint8_t* s, Py_ssize_t n) noexcept nogil:
    # CRC-32 (IEEE), as zlib and librdkafka's consistent partitioners compute it
    cdef uint32_t c = ~(<uint32_t>0)
    cdef uint32_t one
    cdef uint32_t two
    while n >= 8:
        one = _le32(s) ^ c
        two = _le32(s + 4)
        c = (CRC32_TABLE[7][one & 0xFF] ^ CRC32_TABLE[6][(one >> 8) & 0xFF]
             ^ CRC32_TABLE[5][(one >> 16) & 0xFF] ^ CRC32_TABLE[4][one >> 24]
             ^ CRC32_TABLE[3][two & 0xFF] ^ CRC32_TABLE[2][(two >> 8) & 0xFF]
             ^ CRC32_TABLE[1][(two >> 16) & 0xFF] ^ CRC32_TABLE[0][two >> 24])
        s += 8
        n -= 8
    while n > 0:
        c = CRC32_TABLE[0][(c ^ s[0]) & 0xFF] ^ (c >> 8)
        s += 1
        n -= 1
    return ~c


_init_tables()
_init_crc32()


def key_partition(bytes key, int partition_count):
    """The partition librdkafka's default ``consistent_random`` partitioner picks for a non-empty key."""
    if partition_count <= 0:
        raise ValueError("partition_count must be positive")
    return crc32(<const uint8_t*>PyBytes_AS_STRING(key), len(key)) % <uint32_t>partition_count


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


# ---------------------------------------------------------------------------------------------
# Reader: bounds-checked big-endian reads over one message.

cdef struct Reader:
    const uint8_t* p
    Py_ssize_t pos
    Py_ssize_t end
    int msg_type
    Py_ssize_t index


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


# ---------------------------------------------------------------------------------------------
# Public result types.

cdef class Record:
    """One row change ready for Kafka: topic, key (None without partition key), JSON value."""

    cdef readonly str topic
    cdef readonly object key
    cdef readonly bytes value
    cdef readonly uint64_t lsn
    cdef readonly uint64_t seq_id

    def __repr__(self):
        return (f"Record(topic={self.topic!r}, key={self.key!r}, lsn={self.lsn}, "
                f"seq_id={self.seq_id}, value={self.value!r})")


cdef class Begin:
    """Start of a transaction: ``final_lsn`` is its commit LSN, the ``lsn`` of its records."""

    cdef readonly uint64_t final_lsn
    cdef readonly long long commit_time
    cdef readonly uint32_t xid

    def __repr__(self):
        return f"Begin(final_lsn={self.final_lsn}, commit_time={self.commit_time}, xid={self.xid})"


cdef class Commit:
    """End of a transaction; the slot may be confirmed up to ``end_lsn`` once its records are delivered.

    ``record_end`` is the number of records in the batch when the commit was seen: records
    before that index belong to this or earlier transactions.
    """

    cdef readonly uint64_t commit_lsn
    cdef readonly uint64_t end_lsn
    cdef readonly long long commit_time
    cdef readonly Py_ssize_t record_end

    def __repr__(self):
        return (f"Commit(commit_lsn={self.commit_lsn}, end_lsn={self.end_lsn}, "
                f"commit_time={self.commit_time}, record_end={self.record_end})")


cdef class Batch:
    """What one ``decode_batch`` call produced: parallel record lists plus the commits seen.

    ``partitions`` holds each record's partition (-1 when the topic's partition count is not
    known: librdkafka then picks). ``markers`` are the indexes of the records that are the last
    of their (topic, partition) in the batch, plus every record with partition -1: under an
    idempotent producer their delivery proves the delivery of every earlier record. ``begins``
    are the positions in ``payloads`` of the Begin messages; ``begin_starts`` their WAL
    positions (XLogData data_start) when a ``ReplicationStream`` produced the batch.
    """

    cdef public list topics
    cdef public list keys
    cdef public list values
    cdef public list partitions
    cdef public list commits
    cdef public list markers
    cdef public list begins
    cdef public list begin_starts

    def __cinit__(self):
        self.topics = []
        self.keys = []
        self.values = []
        self.partitions = []
        self.commits = []
        self.markers = []
        self.begins = []
        self.begin_starts = []

    def __len__(self):
        return len(self.values)

    def __repr__(self):
        return f"Batch(records={len(self.values)}, commits={len(self.commits)})"


cdef class Relation:
    """Cached Relation message: column names, the topic and the prebuilt JSON prefix."""

    cdef readonly uint32_t relid
    cdef readonly str schema
    cdef readonly str name
    cdef readonly tuple columns
    cdef readonly str replica_identity
    cdef readonly object topic_info
    cdef object topic            # str, or None when unmapped
    cdef int topic_id            # index into the decoder's per-topic partition tables
    cdef str config_problem      # why rows of this relation can't be produced, or None
    cdef bytes prefix            # {"table_name":"…","col_names":[…],"lsn":
    cdef int ncols
    cdef int nkey
    cdef int* key_idx

    def __dealloc__(self):
        PyMem_Free(self.key_idx)

    @property
    def qualified_name(self):
        return f"{self.schema}.{self.name}" if self.schema else self.name

    def __repr__(self):
        return f"Relation({self.relid}, {self.qualified_name!r}, columns={self.columns!r})"


# ---------------------------------------------------------------------------------------------
# The decoder.

cdef struct Col:
    Py_ssize_t off
    int32_t len
    uint8_t kind


cdef enum:
    K_NULL = 0x6E      # 'n'
    K_TOAST = 0x75     # 'u'
    K_TEXT = 0x74      # 't'
    K_BINARY = 0x62    # 'b'

cdef bytes OP_INSERT = b',"op":{"Insert":['
cdef bytes OP_UPDATE = b',"op":{"Update":[['
cdef bytes OP_DELETE = b',"op":{"Delete":['
cdef bytes SEQ_ID = b',"seq_id":'


cdef int _cmp_index(const void* a, const void* b) noexcept nogil:
    cdef Py_ssize_t x = (<const Py_ssize_t*>a)[0]
    cdef Py_ssize_t y = (<const Py_ssize_t*>b)[0]
    return (x > y) - (x < y)


cdef class Decoder:
    """Turns pgoutput protocol-v1 messages into Kafka records, one decoder per replication stream.

    ``topic_map`` maps table names (``table`` or ``schema.table``) to ``TopicInfo`` or dicts
    with ``name`` and ``partition_key``. ``truncate`` says what a TRUNCATE does: ``"error"``
    (default) raises ``ReplicationError``; ``"skip"`` logs a warning and produces nothing.
    Once ``set_partition_count`` knows a topic's partitions, records get explicit partitions:
    CRC-32 of the key modulo the count (librdkafka's default for keyed records), round-robin
    for records without a key.
    """

    cdef dict _topic_map
    cdef dict _topic_ids         # topic name -> id
    cdef int _ntopics
    cdef int* _part_count        # per topic id; 0 = unknown
    cdef Py_ssize_t* _part_base  # per topic id: offset of its slots in _last_index
    cdef uint32_t* _round_robin  # per topic id
    cdef Py_ssize_t* _last_index # per (topic, partition) slot: last record index in this batch, -1
    cdef Py_ssize_t _nslots
    cdef Py_ssize_t* _touched    # slots written in this batch
    cdef Py_ssize_t _ntouched
    cdef dict _relations
    cdef Relation _last_rel
    cdef bint _truncate_skip
    cdef bint _in_tx
    cdef uint64_t _tx_lsn
    cdef uint64_t _seq
    cdef long long _begin_time
    cdef uint32_t _begin_xid
    cdef Buf _out
    cdef Buf _key
    cdef Col* _old
    cdef Col* _new
    cdef int _col_cap

    def __cinit__(self):
        self._out.data = NULL
        self._out.len = 0
        self._out.cap = 0
        self._key.data = NULL
        self._key.len = 0
        self._key.cap = 0
        self._old = NULL
        self._new = NULL
        self._col_cap = 0
        self._part_count = NULL
        self._part_base = NULL
        self._round_robin = NULL
        self._last_index = NULL
        self._touched = NULL
        self._nslots = 0
        self._ntouched = 0

    def __init__(self, topic_map, truncate="error"):
        self._topic_map = normalize_topic_map(topic_map)
        self._topic_ids = {}
        for info in self._topic_map.values():
            if info.name not in self._topic_ids:
                self._topic_ids[info.name] = len(self._topic_ids)
        self._ntopics = len(self._topic_ids)
        self._part_count = <int*>PyMem_Malloc(sizeof(int) * self._ntopics)
        self._part_base = <Py_ssize_t*>PyMem_Malloc(sizeof(Py_ssize_t) * self._ntopics)
        self._round_robin = <uint32_t*>PyMem_Malloc(sizeof(uint32_t) * self._ntopics)
        if self._part_count == NULL or self._part_base == NULL or self._round_robin == NULL:
            raise MemoryError()
        memset(self._part_count, 0, sizeof(int) * self._ntopics)
        memset(self._part_base, 0, sizeof(Py_ssize_t) * self._ntopics)
        memset(self._round_robin, 0, sizeof(uint32_t) * self._ntopics)
        if truncate not in ("error", "skip"):
            raise ConfigError(f"truncate must be 'error' or 'skip', got {truncate!r}")
        self._truncate_skip = truncate == "skip"
        self._relations = {}
        self._last_rel = None
        self._in_tx = False
        buf_reserve(&self._out, 4096)
        buf_reserve(&self._key, 256)

    def __dealloc__(self):
        PyMem_Free(self._out.data)
        PyMem_Free(self._key.data)
        PyMem_Free(self._old)
        PyMem_Free(self._new)
        PyMem_Free(self._part_count)
        PyMem_Free(self._part_base)
        PyMem_Free(self._round_robin)
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
        """Decode one message: a ``Record``, ``Begin`` or ``Commit``, or ``None`` for the rest."""
        cdef Batch batch = Batch()
        cdef int msg_type = self._decode_any(payload, batch, 0)
        cdef Record rec
        cdef Begin begin
        if batch.values:
            rec = Record.__new__(Record)
            rec.topic = batch.topics[0]
            rec.key = batch.keys[0]
            rec.value = batch.values[0]
            rec.lsn = self._tx_lsn
            rec.seq_id = self._seq - 1
            return rec
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
            self._message(&r)
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

    cdef int _message(self, Reader* r) except -1:
        read_u8(r, b"message flags")
        read_u64(r, b"message lsn")
        read_cstring(r, b"message prefix")
        cdef uint32_t length = read_u32(r, b"message length")
        need(r, length, b"message content")
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
        rel.prefix = (b'{"table_name":' + escape_json_string(name) + b',"col_names":['
                      + b",".join([escape_json_string(c) for c in names]) + b'],"lsn":')
        if ncols > self._col_cap:
            self._grow_cols(ncols)
        self._relations[relid] = rel
        self._last_rel = rel
        return 0

    cdef int _grow_cols(self, int ncols) except -1:
        cdef Col* old = <Col*>PyMem_Realloc(self._old, sizeof(Col) * ncols)
        if old == NULL:
            raise MemoryError()
        self._old = old
        cdef Col* new = <Col*>PyMem_Realloc(self._new, sizeof(Col) * ncols)
        if new == NULL:
            raise MemoryError()
        self._new = new
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

        cdef Buf* out = &self._out
        out.len = 0
        buf_put_bytes(out, rel.prefix)
        buf_put_u64(out, self._tx_lsn)
        buf_put_bytes(out, SEQ_ID)
        buf_put_u64(out, self._seq)
        cdef Col* key_row
        if op == 0x49:
            buf_put_bytes(out, OP_INSERT)
            self._put_row(r, rel, self._new)
            key_row = self._new
        elif op == 0x55:
            buf_put_bytes(out, OP_UPDATE)
            self._put_row(r, rel, self._old)
            buf_put(out, b"],[", 3)
            self._fill_unchanged_toast(rel)
            self._put_row(r, rel, self._new)
            buf_put(out, b"]", 1)
            key_row = self._new
        else:
            buf_put_bytes(out, OP_DELETE)
            self._put_row(r, rel, self._old)
            key_row = self._old
        buf_put(out, b"]}}", 3)
        value = PyBytes_FromStringAndSize(out.data, out.len)
        if out.cap > (16 << 20):
            # one huge value must not pin a buffer of six times its size for good
            PyMem_Free(out.data)
            out.data = NULL
            out.cap = 0
            out.len = 0
            buf_reserve(out, 4096)
        if rel.nkey:
            key = self._make_key(r, rel, key_row)
        else:
            key = None
            self._key.len = 0
        cdef Py_ssize_t record_index = len(batch.values)
        batch.topics.append(rel.topic)
        batch.keys.append(key)
        batch.values.append(value)
        batch.partitions.append(self._partition(rel.topic_id, record_index, batch))
        self._seq += 1
        return 0

    cdef int _partition(self, int topic_id, Py_ssize_t record_index, Batch batch) except -2:
        """Pick the record's partition and remember it as the slot's latest record."""
        cdef int count = self._part_count[topic_id]
        cdef uint32_t part
        cdef Py_ssize_t slot
        if count == 0:
            batch.markers.append(record_index)
            return -1
        if self._key.len > 0:
            part = crc32(<const uint8_t*>self._key.data, self._key.len) % <uint32_t>count
        else:
            part = self._round_robin[topic_id] % <uint32_t>count
            self._round_robin[topic_id] += 1
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

    cdef int _put_row(self, Reader* r, Relation rel, Col* cols) except -1:
        cdef Buf* out = &self._out
        cdef int i
        for i in range(rel.ncols):
            if i:
                buf_put(out, b",", 1)
            if cols[i].kind == K_TEXT:
                if put_json_string(out, r.p + cols[i].off, cols[i].len) < 0:
                    r.pos = cols[i].off
                    fail(r, f"invalid UTF-8 in column {rel.columns[i]!r} of table "
                            f"{rel.qualified_name}")
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
        from pgrepl.lsn import format_lsn
        where = format_lsn(self._tx_lsn) if self._in_tx else "unknown"
        if self._truncate_skip:
            _log.warning("skipping TRUNCATE of %s in transaction with commit LSN %s (truncate='skip')",
                         ", ".join(names), where)
            return 0
        raise ReplicationError(
            f"TRUNCATE of {', '.join(names)} (transaction commit LSN {where}) cannot be expressed as "
            f"row changes; publish without truncate (ALTER PUBLICATION ... SET (publish = "
            f"'insert, update, delete')) or pass truncate='skip'")


include "_stream.pxi"
include "_records.pxi"
