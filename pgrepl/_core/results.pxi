# Included by core.pyx: what the decoder hands out (fields declared in core.pxd).

cdef class Record:
    """One row change ready for Kafka: topic, key (None without partition key), JSON value."""

    def __repr__(self):
        return (f"Record(topic={self.topic!r}, key={self.key!r}, lsn={self.lsn}, "
                f"seq_id={self.seq_id}, value={self.value!r})")


cdef class Begin:
    """Start of a transaction: ``final_lsn`` is its commit LSN, the ``lsn`` of its records."""

    def __repr__(self):
        return f"Begin(final_lsn={self.final_lsn}, commit_time={self.commit_time}, xid={self.xid})"


cdef class Commit:
    """End of a transaction; the slot may be confirmed up to ``end_lsn`` once its records are delivered.

    ``record_end`` is the number of records in the batch when the commit was seen: records
    before that index belong to this or earlier transactions.
    """

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
    positions (XLogData data_start) when a ``ReplicationStream`` produced the batch. ``messages``
    holds pgrepl's own logical decoding messages (prefix ``pgrepl``...) as ``(record_index, lsn,
    prefix, content)``: they came after the first ``record_index`` records.
    """

    def __cinit__(self):
        self.topics = []
        self.keys = []
        self.values = []
        self.partitions = []
        self.commits = []
        self.markers = []
        self.begins = []
        self.begin_starts = []
        self.messages = []

    def __len__(self):
        return len(self.values)

    def __repr__(self):
        return f"Batch(records={len(self.values)}, commits={len(self.commits)})"


cdef class Relation:
    """Cached Relation message: column names, the topic and the prebuilt JSON prefix."""

    def __dealloc__(self):
        PyMem_Free(self.key_idx)

    @property
    def qualified_name(self):
        return f"{self.schema}.{self.name}" if self.schema else self.name

    def __repr__(self):
        return f"Relation({self.relid}, {self.qualified_name!r}, columns={self.columns!r})"


