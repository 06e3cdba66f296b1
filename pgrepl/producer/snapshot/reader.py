"""Chunk readers: connections that read snapshot chunks between two watermarks in the WAL.

For each chunk a reader commits a *low watermark* (a transactional logical decoding message),
reads the chunk with ``COPY ... TO STDOUT`` in its own short transaction, hands the rows to the
coordinator, and commits a *high watermark*. The producer sees both watermarks in the stream,
in WAL order with everything else: changes between them tell it which chunk rows are stale
(DBLog, Netflix 2019). ``synchronous_commit`` is on for these sessions, so a watermark is
flushed, and therefore streamed, at once.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
from typing import Any, Callable, List, Optional, Set

import psycopg2
import psycopg2.extensions

from pgrepl._runtime import Waker
from pgrepl.postgres.connect import connect
from pgrepl.producer.snapshot.plan import KeyRange, TablePlan, chunk_query

log = logging.getLogger("pgrepl.snapshot")

WATERMARK_PREFIX = "pgrepl.watermark"

#: A keyless table's rows are kept in memory up to this many bytes, then spilled to a temporary file.
SPILL_BYTES = 16 << 20


class ChunkRows:
    """A chunk's rows as COPY text lines: in memory, or spilled to a temporary file (keyless tables)."""

    def __init__(self) -> None:
        self.lines: List[bytes] = []
        self.count = 0
        self._bytes = 0
        self._spill: Optional[Any] = None

    def write(self, line: bytes) -> None:
        """``copy_expert`` calls this with one COPY row at a time."""
        self.count += 1
        if self._spill is not None:
            self._spill.write(line)
            return
        self.lines.append(bytes(line))
        self._bytes += len(line)
        if self._bytes > SPILL_BYTES:
            self._spill = tempfile.TemporaryFile(prefix="pgrepl-snapshot-")
            self._spill.writelines(self.lines)
            self.lines = []

    def batches(self, size: int) -> Any:
        """The rows in order, ``size`` lines at a time."""
        if self._spill is None:
            for start in range(0, len(self.lines), size):
                yield self.lines[start:start + size]
            return
        self._spill.seek(0)
        batch: List[bytes] = []
        for line in self._spill:
            batch.append(line)
            if len(batch) >= size:
                yield batch
                batch = []
        if batch:
            yield batch

    def last_line(self) -> Optional[bytes]:
        return self.lines[-1] if self.lines else None

    def close(self) -> None:
        if self._spill is not None:
            self._spill.close()
            self._spill = None
        self.lines = []


class Chunk:
    """One chunk in flight: its range, its watermark id, its rows once read."""

    def __init__(self, chunk_id: str, job_id: str, table: TablePlan, key_range: KeyRange) -> None:
        self.id = chunk_id
        self.job_id = job_id
        self.table = table
        self.range = key_range
        self.rows: Optional[ChunkRows] = None
        self.next_after: Any = None  # the key the range's next chunk starts after (None: range finished)
        self.low_seen = False
        self.stale: Set[bytes] = set()  # identities of rows changed in the stream between the watermarks
        self.high_lsn: Optional[int] = None


class ChunkReader(threading.Thread):
    """A thread with its own connection that reads the chunks ``next_chunk`` gives it."""

    def __init__(self, dsn: str, application_name: str, chunk_size: int, waker: Waker,
                 next_chunk: Callable[[], Optional[Chunk]], read: Callable[[Chunk], None],
                 failed: Callable[[Chunk, BaseException], None]) -> None:
        super().__init__(name="pgrepl-snapshot-reader", daemon=True)
        self.dsn = dsn
        self.application_name = application_name
        self.chunk_size = chunk_size
        self.waker = waker
        self.next_chunk = next_chunk
        self.on_read = read
        self.on_failed = failed
        self._conn: Optional[psycopg2.extensions.connection] = None

    def run(self) -> None:
        while not self.waker.is_set:
            chunk = self.next_chunk()
            if chunk is None:
                continue
            try:
                self._read(chunk)
            except BaseException as exc:  # noqa: BLE001 - the coordinator retries the chunk
                self._close()
                self.on_failed(chunk, exc)
                self.waker.wait(1.0)
        self._close()

    def _read(self, chunk: Chunk) -> None:
        conn = self._connection()
        table, key_range = chunk.table, chunk.range
        limit = self.chunk_size if table.key_columns else None
        query, params = chunk_query(table, key_range.reading, key_range.upto, limit)
        with conn.cursor() as cur:
            self._watermark(cur, chunk, "low")
            rows = ChunkRows()
            sql = cur.mogrify(query, params).decode()
            cur.execute("BEGIN ISOLATION LEVEL READ COMMITTED READ ONLY")
            cur.copy_expert(sql, rows)
            cur.execute("COMMIT")
            chunk.rows = rows
            chunk.next_after = None if (limit is None or rows.count < limit) else rows.last_line()
            self.on_read(chunk)  # before the high watermark: its data is there when the watermark is
            self._watermark(cur, chunk, "high")

    def _watermark(self, cur: Any, chunk: Chunk, edge: str) -> None:
        content = json.dumps({"chunk": chunk.id, "edge": edge, "pid": os.getpid()})
        cur.execute("SELECT pg_logical_emit_message(true, %s, %s)", (WATERMARK_PREFIX, content))

    def _connection(self) -> psycopg2.extensions.connection:
        if self._conn is None or self._conn.closed:
            self._conn = connect(self.dsn, application_name=self.application_name)
            with self._conn.cursor() as cur:
                cur.execute("SET synchronous_commit = on")  # a watermark must reach the stream at once
        return self._conn

    def _close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except psycopg2.Error:
                pass
            self._conn = None
