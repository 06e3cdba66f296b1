# Declarations of the compiled hot path (pgrepl._core.core): the C structs and the extension
# types' fields and C-level methods. The code lives in core.pyx and the .pxi units it includes.

from libc.stdint cimport int32_t, uint8_t, uint32_t, uint64_t


# buffer.pxi: a growable byte buffer, reused record after record
cdef struct Buf:
    char* data
    Py_ssize_t len
    Py_ssize_t cap


# reader.pxi: bounds-checked reads over one pgoutput message
cdef struct Reader:
    const uint8_t* p
    Py_ssize_t pos
    Py_ssize_t end
    int msg_type
    Py_ssize_t index


# pgoutput.pxi: one column of a decoded tuple, pointing into the message
cdef struct Col:
    Py_ssize_t off
    int32_t len
    uint8_t kind


# results.pxi ---------------------------------------------------------------------------------

cdef class Record:
    cdef readonly str topic
    cdef readonly object key
    cdef readonly bytes value
    cdef readonly uint64_t lsn
    cdef readonly uint64_t seq_id


cdef class Begin:
    cdef readonly uint64_t final_lsn
    cdef readonly long long commit_time
    cdef readonly uint32_t xid


cdef class Commit:
    cdef readonly uint64_t commit_lsn
    cdef readonly uint64_t end_lsn
    cdef readonly long long commit_time
    cdef readonly Py_ssize_t record_end


cdef class Batch:
    cdef public list topics
    cdef public list keys
    cdef public list values
    cdef public list partitions
    cdef public list commits
    cdef public list markers
    cdef public list begins
    cdef public list begin_starts
    cdef public list messages


cdef class Relation:
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
    cdef uint32_t name_crc       # CRC-32 of "schema.table": the partition of records without a key


# pgoutput.pxi --------------------------------------------------------------------------------

cdef class Decoder:
    cdef dict _topic_map
    cdef dict _topic_ids         # topic name -> id
    cdef int _ntopics
    cdef int* _part_count        # per topic id; 0 = unknown
    cdef Py_ssize_t* _part_base  # per topic id: offset of its slots in _last_index
    cdef Py_ssize_t* _last_index # per (topic, partition) slot: last record index in this batch, or -1
    cdef Py_ssize_t _nslots
    cdef Py_ssize_t* _touched    # slots written in this batch
    cdef Py_ssize_t _ntouched
    cdef dict _relations
    cdef Relation _last_rel
    cdef bint _truncate_skip
    cdef bint _split_key_changes # an Update that changes the key becomes Delete + Insert
    cdef bint _in_tx
    cdef uint64_t _tx_lsn
    cdef uint64_t _seq
    cdef long long _begin_time
    cdef uint32_t _begin_xid
    cdef Buf _out
    cdef Buf _key
    cdef Col* _old
    cdef Col* _new
    cdef Py_ssize_t* _spans      # per column: where _put_row wrote its value in _out (start, length)
    cdef int _col_cap
    cdef int _small_records      # records in a row that used a sliver of a big _out
    cdef Py_ssize_t _emitted     # bytes of record values made so far (ReplicationStream.read's limit)
    cdef Buf _scratch            # a snapshot row's unescaped fields (copy.pxi)

    cdef void _clear_slots(self)
    cdef int _collect_markers(self, Batch batch) except -1
    cdef int _decode_any(self, object payload, Batch batch, Py_ssize_t index) except -1
    cdef int _decode_one(self, const uint8_t* p, Py_ssize_t n, Batch batch, Py_ssize_t index) except -1
    cdef int _begin(self, Reader* r) except -1
    cdef int _commit(self, Reader* r, Batch batch) except -1
    cdef int _message(self, Reader* r, Batch batch) except -1
    cdef int _relation(self, Reader* r) except -1
    cdef Relation _set_relation(self, uint32_t relid, str schema, str name, uint8_t replident, list names)
    cdef int _grow_cols(self, int ncols) except -1
    cdef Relation _lookup(self, Reader* r, uint32_t relid)
    cdef int _tuple(self, Reader* r, Relation rel, Col* cols) except -1
    cdef int _row(self, Reader* r, Batch batch, int op) except -1
    cdef bint _key_changed(self, Reader* r, Relation rel) noexcept
    cdef int _emit(self, Reader* r, Relation rel, Batch batch, int op) except -1
    cdef int _partition(self, Relation rel, Py_ssize_t record_index, Batch batch) except -2
    cdef int _missing_old_row(self, Relation rel, str what) except -1
    cdef int _fill_unchanged_toast(self, Relation rel) except -1
    cdef int _put_row(self, Reader* r, Relation rel, Col* cols, Col* written, bint note) except -1
    cdef object _make_key(self, Reader* r, Relation rel, Col* cols)
    cdef int _truncate(self, Reader* r) except -1


# stream.pxi ----------------------------------------------------------------------------------

ctypedef int (*pq_getcopydata_t)(void* conn, char** buffer, int async_) noexcept nogil
ctypedef int (*pq_consumeinput_t)(void* conn) noexcept nogil
ctypedef void (*pq_freemem_t)(void* ptr) noexcept nogil
ctypedef int (*pq_putcopydata_t)(void* conn, const char* buffer, int nbytes) noexcept nogil
ctypedef int (*pq_flush_t)(void* conn) noexcept nogil
ctypedef char* (*pq_errormessage_t)(void* conn) noexcept nogil


cdef class ReplicationStream:
    cdef object _conn
    cdef void* _pg
    cdef pq_getcopydata_t _getcopydata
    cdef pq_consumeinput_t _consumeinput
    cdef pq_freemem_t _freemem
    cdef pq_putcopydata_t _putcopydata
    cdef pq_flush_t _flush
    cdef pq_errormessage_t _errormessage
    cdef readonly uint64_t last_wal_end
    cdef readonly uint64_t last_data_start
    cdef readonly bint reply_requested
    cdef readonly bint would_block
    cdef readonly bint ended
    cdef readonly unsigned long long messages
    cdef readonly unsigned long long bytes_received
    cdef readonly unsigned long long keepalives

    cdef int _fail(self, str what) except -1
