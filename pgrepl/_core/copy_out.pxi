# Included by core.pyx: ``COPY ... TO STDOUT`` read straight from libpq, for snapshot chunks.
#
# psycopg2's ``copy_expert`` hands every row to a Python ``write()`` call, taking the GIL back
# for each one: with the producer's stream loop busy on the other thread, that is the snapshot
# readers' bottleneck. Here the rows are gathered in C with the GIL released (through the
# functions of the libpq psycopg2 is linked against, as ReplicationStream does) and handed over
# as blocks of whole COPY text lines: one bytes object per ``block_bytes`` of rows.

ctypedef void* (*pq_exec_t)(void* conn, const char* query) noexcept nogil
ctypedef void* (*pq_getresult_t)(void* conn) noexcept nogil
ctypedef int (*pq_resultstatus_t)(const void* res) noexcept nogil
ctypedef char* (*pq_resulterrormessage_t)(const void* res) noexcept nogil
ctypedef void (*pq_clear_t)(void* res) noexcept nogil

cdef int PGRES_COMMAND_OK = 1
cdef int PGRES_COPY_OUT = 3

cdef pq_exec_t _pq_exec = NULL
cdef pq_getresult_t _pq_getresult = NULL
cdef pq_resultstatus_t _pq_resultstatus = NULL
cdef pq_resulterrormessage_t _pq_resulterrormessage = NULL
cdef pq_clear_t _pq_clear = NULL
cdef pq_getcopydata_t _pq_getcopydata = NULL
cdef pq_freemem_t _pq_freemem = NULL
cdef pq_errormessage_t _pq_errormessage = NULL


cdef int _load_copy_out() except -1:
    global _pq_exec, _pq_getresult, _pq_resultstatus, _pq_resulterrormessage, _pq_clear
    global _pq_getcopydata, _pq_freemem, _pq_errormessage
    if _pq_exec != NULL:
        return 0
    _pq_getresult = <pq_getresult_t><size_t>_libpq_function("PQgetResult")
    _pq_resultstatus = <pq_resultstatus_t><size_t>_libpq_function("PQresultStatus")
    _pq_resulterrormessage = <pq_resulterrormessage_t><size_t>_libpq_function("PQresultErrorMessage")
    _pq_clear = <pq_clear_t><size_t>_libpq_function("PQclear")
    _pq_getcopydata = <pq_getcopydata_t><size_t>_libpq_function("PQgetCopyData")
    _pq_freemem = <pq_freemem_t><size_t>_libpq_function("PQfreemem")
    _pq_errormessage = <pq_errormessage_t><size_t>_libpq_function("PQerrorMessage")
    _pq_exec = <pq_exec_t><size_t>_libpq_function("PQexec")
    return 0


cdef str _pq_text(const char* message, str fallback):
    cdef bytes raw = message if message != NULL else b""
    return raw.decode("utf-8", "replace").strip() or fallback


cdef int _copy_failed(const char* message, bint lost) except -1:
    import psycopg2

    text = _pq_text(message, "COPY failed")
    raise (psycopg2.OperationalError if lost else psycopg2.DatabaseError)(text)


def copy_out(conn, bytes query, sink, Py_ssize_t block_bytes=1048576):
    """Run ``query`` (a ``COPY ... TO STDOUT`` in text format) on the psycopg2 connection ``conn``
    and call ``sink(block, rows)`` for each block of about ``block_bytes``: whole COPY lines
    (newline-terminated), ``rows`` of them. Rows are read with the GIL released. Returns the
    number of rows; raises ``psycopg2.DatabaseError`` when the server refuses the query
    (``OperationalError`` when the connection is lost)."""
    _load_copy_out()
    if block_bytes <= 0:
        raise ValueError(f"block_bytes must be positive, not {block_bytes}")
    cdef size_t addr = conn.pgconn_ptr
    if addr == 0:
        raise StreamError("the connection is closed")
    cdef void* pg = <void*>addr
    cdef const char* sql = PyBytes_AS_STRING(query)
    cdef void* res
    cdef int status
    with nogil:
        res = _pq_exec(pg, sql)
    if res == NULL:
        _copy_failed(_pq_errormessage(pg), True)
    status = _pq_resultstatus(res)
    if status != PGRES_COPY_OUT:
        try:
            _copy_failed(_pq_resulterrormessage(res), False)
        finally:
            _pq_clear(res)
    _pq_clear(res)
    cdef Buf block
    block.data = NULL
    block.len = 0
    block.cap = 0
    cdef Py_ssize_t total = 0
    cdef Py_ssize_t rows
    cdef int n = 0
    cdef char* row = NULL
    cdef bint failed = False
    try:
        buf_reserve(&block, block_bytes + 4096)
        while n != -1:
            rows = 0
            with nogil:
                while block.len < block_bytes:
                    n = _pq_getcopydata(pg, &row, 0)
                    if n < 0:
                        break
                    if block.len + n > block.cap:
                        with gil:
                            buf_reserve(&block, n)
                    memcpy(block.data + block.len, row, n)
                    block.len += n
                    rows += 1
                    _pq_freemem(row)
                    row = NULL
            if n == -2:
                failed = True
                break
            if rows:
                total += rows
                sink(PyBytes_FromStringAndSize(block.data, block.len), rows)
                block.len = 0
        # the final result says whether the COPY succeeded (-1) or why it failed (-2)
        message = None
        while True:
            with nogil:
                res = _pq_getresult(pg)
            if res == NULL:
                break
            status = _pq_resultstatus(res)
            if status != PGRES_COMMAND_OK and message is None:
                message = _pq_text(_pq_resulterrormessage(res), "COPY failed")
            _pq_clear(res)
        if failed:
            _copy_failed(_pq_errormessage(pg), True)
        if message is not None:
            import psycopg2

            raise psycopg2.DatabaseError(message)
    finally:
        PyMem_Free(block.data)
    return total
