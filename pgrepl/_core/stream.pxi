# Included by core.pyx: the walsender CopyBoth reader (fields declared in core.pxd).
#
# psycopg2 starts replication (START_REPLICATION puts the connection in CopyBoth mode); from
# then on this reader talks to the same libpq connection directly, through the function
# pointers of the libpq that psycopg2 itself is linked against. Two reasons:
#   * speed: each XLogData payload is decoded in place from libpq's buffer; no
#     ReplicationMessage and no payload bytes object is made per message;
#   * correctness: psycopg2's read_message() moves the flush position to a keepalive's
#     wal_end on its own whenever the flush LSN we last sent is >= the data_start of the last
#     message. A change of an interleaved transaction can carry a data_start below an already
#     confirmed commit, so that rule can confirm transactions not yet delivered to Kafka.
#     Here keepalives only update ``last_wal_end``; the flush position is always ours.

# Microseconds between the Unix epoch and PostgreSQL's (2000-01-01).
cdef int64_t PG_EPOCH_OFFSET_US = 946684800000000


cdef inline uint64_t be64(const uint8_t* q) noexcept nogil:
    return ((<uint64_t>q[0] << 56) | (<uint64_t>q[1] << 48) | (<uint64_t>q[2] << 40)
            | (<uint64_t>q[3] << 32) | (<uint64_t>q[4] << 24) | (<uint64_t>q[5] << 16)
            | (<uint64_t>q[6] << 8) | q[7])


cdef inline void put_be64(char* q, uint64_t v) noexcept nogil:
    cdef int i
    for i in range(8):
        q[i] = <char>((v >> (56 - 8 * i)) & 0xFF)


def _libpq_function(str name):
    """Address of a libpq function, from the libpq psycopg2's own C module links to."""
    import ctypes
    import psycopg2._psycopg as _psycopg

    lib = ctypes.CDLL(_psycopg.__file__)
    try:
        return ctypes.cast(getattr(lib, name), ctypes.c_void_p).value
    except AttributeError:
        raise ImportError(f"libpq function {name} not found next to psycopg2") from None


cdef class ReplicationStream:
    """Reads a walsender CopyBoth stream of pgoutput messages straight into a ``Decoder``.

    ``conn`` is a psycopg2 replication connection on which ``start_replication`` (or
    ``start_replication_expert``) has been called; the stream keeps it alive.
    """

    def __init__(self, conn):
        cdef size_t addr = conn.pgconn_ptr
        if addr == 0:
            raise StreamError("the replication connection is closed")
        self._conn = conn
        self._pg = <void*>addr
        self._getcopydata = <pq_getcopydata_t><size_t>_libpq_function("PQgetCopyData")
        self._consumeinput = <pq_consumeinput_t><size_t>_libpq_function("PQconsumeInput")
        self._freemem = <pq_freemem_t><size_t>_libpq_function("PQfreemem")
        self._putcopydata = <pq_putcopydata_t><size_t>_libpq_function("PQputCopyData")
        self._flush = <pq_flush_t><size_t>_libpq_function("PQflush")
        self._errormessage = <pq_errormessage_t><size_t>_libpq_function("PQerrorMessage")

    def fileno(self):
        """The connection's socket, for select/poll."""
        return self._conn.fileno()

    cdef int _fail(self, str what) except -1:
        cdef char* err = self._errormessage(self._pg)
        cdef bytes message = err if err != NULL else b""
        detail = message.decode("utf-8", "replace").strip() or "connection lost"
        raise StreamError(f"{what}: {detail}")

    def read(self, Decoder decoder, Py_ssize_t max_messages=4096, Py_ssize_t max_bytes=4194304):
        """Decode the messages that are available without blocking, at most ``max_messages``
        and about ``max_bytes`` of stream and record values together.

        Both count because both are memory the batch holds until it is produced (and Kafka's
        client then holds a copy of the values): an update of a row with a 20 kB TOASTed value
        is 20 kB of stream but 40 kB of record, so a batch of such rows stops at about 70 of
        them, plenty to spread the per-batch cost, while 4,096 small rows fit.

        Returns a ``Batch`` (with ``begin_starts``: the WAL position of each Begin). A
        ``PgreplError`` raised while decoding carries ``partial_batch``: what came before. After the
        call, ``would_block`` says the socket is drained, ``reply_requested`` that the server
        asked for a status update, and ``ended`` that the server closed the stream.
        """
        cdef Batch batch = Batch()
        cdef char* buf = NULL
        cdef int n
        cdef bint consumed = False
        cdef Py_ssize_t count = 0
        cdef Py_ssize_t nbytes = 0
        cdef uint64_t data_start
        cdef int msg_type
        cdef const uint8_t* q
        cdef Py_ssize_t emitted = decoder._emitted
        self.would_block = False
        decoder._clear_slots()
        try:
            while count < max_messages and nbytes + (decoder._emitted - emitted) < max_bytes:
                n = self._getcopydata(self._pg, &buf, 1)
                if n == 0:
                    if consumed:
                        self.would_block = True
                        break
                    if not self._consumeinput(self._pg):
                        self._fail("reading the replication stream failed")
                    consumed = True
                    continue
                if n == -1:
                    self.ended = True
                    break
                if n == -2:
                    self._fail("reading the replication stream failed")
                consumed = False
                try:
                    q = <const uint8_t*>buf
                    if q[0] == 0x77:  # 'w' XLogData: dataStart, walEnd, sendTime, payload
                        if n < 25:
                            raise StreamError("XLogData message shorter than its header")
                        data_start = be64(q + 1)
                        self.last_data_start = data_start
                        self.messages += 1
                        self.bytes_received += n
                        nbytes += n
                        try:
                            msg_type = decoder._decode_one(q + 25, n - 25, batch, count)
                        except DecodeError as exc:
                            exc.lsn = data_start
                            raise
                        if msg_type == 0x42:  # 'B'
                            batch.begin_starts.append(data_start)
                        count += 1
                    elif q[0] == 0x6B:  # 'k' keepalive: walEnd, sendTime, replyRequested
                        if n < 18:
                            raise StreamError("keepalive message shorter than its header")
                        data_start = be64(q + 1)
                        self.keepalives += 1
                        if data_start > self.last_wal_end:
                            self.last_wal_end = data_start
                        if q[17]:
                            self.reply_requested = True
                    else:
                        raise StreamError(f"unexpected replication message type 0x{q[0]:02x}")
                finally:
                    self._freemem(buf)
                    buf = NULL
                if self.reply_requested:
                    break
            decoder._collect_markers(batch)
        except PgreplError as exc:
            # what decoded before the bad message is still good: the caller may produce its
            # complete transactions before stopping
            exc.partial_batch = batch
            raise
        finally:
            decoder._clear_slots()
        return batch

    def send_feedback(self, uint64_t write_lsn, uint64_t flush_lsn, uint64_t apply_lsn=0, bint reply=False):
        """Send a standby status update: the slot's confirmed flush position follows ``flush_lsn``."""
        import time

        cdef char msg[34]
        cdef int64_t now = <int64_t>(time.time() * 1000000) - PG_EPOCH_OFFSET_US
        msg[0] = b'r'
        put_be64(msg + 1, write_lsn)
        put_be64(msg + 9, flush_lsn)
        put_be64(msg + 17, apply_lsn)
        put_be64(msg + 25, <uint64_t>now)
        msg[33] = 1 if reply else 0
        if self._putcopydata(self._pg, msg, 34) != 1:
            self._fail("sending a status update failed")
        if self._flush(self._pg) != 0:
            self._fail("sending a status update failed")
        self.reply_requested = False
