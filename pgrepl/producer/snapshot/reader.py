"""Chunk readers: connections that read snapshot chunks between two watermarks in the WAL.

For each chunk a reader commits a *low watermark* (a transactional logical decoding message),
reads the chunk with ``COPY ... TO STDOUT`` in its own short transaction (in C, with the GIL
released, in blocks of COPY text: ``copy_out``), hands the rows to the
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
import time
from typing import Any, Callable, Iterator, List, Optional, Set

import psycopg2
import psycopg2.extensions

from pgrepl._core import copy_out
from pgrepl._runtime import Waker
from pgrepl.postgres.connect import connect
from pgrepl.producer.snapshot.plan import KeyRange, TablePlan, chunk_query

log = logging.getLogger("pgrepl.snapshot")

WATERMARK_PREFIX = "pgrepl.watermark"

#: A keyless table's rows are kept in memory up to this many bytes, then spilled to a temporary file.
SPILL_BYTES = 16 << 20

#: Rows are handed over (and later encoded and produced) in blocks of about this many bytes of COPY text.
BLOCK_BYTES = 1 << 20


class ChunkRows:
    """A chunk's rows as blocks of COPY text lines: in memory, or spilled to a temporary file (keyless tables).

    ``copy_out`` hands the blocks over (``add``); ``blocks`` gives them back in order.
    """

    def __init__(self) -> None:
        self.blocks: List[bytes] = []
        self.count = 0
        self._bytes = 0
        self._spill: Optional[Any] = None

    def add(self, block: bytes, rows: int) -> None:
        """A block of ``rows`` whole COPY lines."""
        self.count += rows
        if self._spill is not None:
            self._spill.write(block)
            self.blocks = [block]  # last_line() still needs the last one
            return
        self.blocks.append(block)
        self._bytes += len(block)
        if self._bytes > SPILL_BYTES:
            self._spill = tempfile.TemporaryFile(prefix="pgrepl-snapshot-")
            self._spill.writelines(self.blocks)
            self.blocks = [self.blocks[-1]]  # last_line() still needs it

    def batches(self) -> Iterator[bytes]:
        """The rows in order, in blocks of whole lines."""
        if self._spill is None:
            yield from self.blocks
            return
        self._spill.seek(0)
        rest = b""
        while True:
            data = self._spill.read(BLOCK_BYTES)
            if not data:
                break
            data = rest + data
            cut = data.rfind(b"\n") + 1
            rest = data[cut:]
            if cut:
                yield data[:cut]
        if rest:
            yield rest

    @property
    def spilled(self) -> bool:
        """Whether the rows went to a temporary file (``blocks`` then holds only the last block)."""
        return self._spill is not None

    def last_line(self) -> Optional[bytes]:
        if not self.blocks:
            return None
        block = self.blocks[-1]
        return block[block.rfind(b"\n", 0, len(block) - 1) + 1:]

    def close(self) -> None:
        if self._spill is not None:
            self._spill.close()
            self._spill = None
        self.blocks = []


class Chunk:
    """One chunk in flight: its range, its watermark id, its rows once read."""

    def __init__(self, chunk_id: str, job_id: str, table: TablePlan, key_range: KeyRange) -> None:
        self.id = chunk_id
        self.job_id = job_id
        self.table = table
        self.range = key_range
        self.rows: Optional[ChunkRows] = None
        # the rows encoded ahead (not when spilled): per block a Batch and the rows' identities
        self.ahead: Optional[List[Any]] = None
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
            self._settle_commits(cur)
            rows = ChunkRows()
            sql = cur.mogrify(query, params)
            cur.execute("BEGIN ISOLATION LEVEL READ COMMITTED READ ONLY")
            copy_out(conn, sql, rows.add, BLOCK_BYTES)  # in C, the GIL released while rows arrive
            cur.execute("COMMIT")
            chunk.rows = rows
            chunk.next_after = None if (limit is None or rows.count < limit) else rows.last_line()
            self.on_read(chunk)  # before the high watermark: its data is there when the watermark is
            self._watermark(cur, chunk, "high")

    def _settle_commits(self, cur: Any) -> None:
        """Wait (briefly) for transactions that have committed but are not visible yet.

        A transaction writes its commit record, marks itself committed, and only then becomes
        visible to new snapshots. One caught between those steps while the low watermark commits
        has its changes before the window (so they do not mark the chunk's rows stale) and yet
        invisible to the chunk's read: the chunk would carry the older row after the stream's
        newer one. So the read waits until the transactions the server still listed as running
        after the watermark, but already committed or aborted, are gone (milliseconds; at most 5 s).
        """
        cur.execute("SELECT x::text FROM pg_snapshot_xip(pg_current_snapshot()) AS x "
                    "WHERE pg_xact_status(x) <> 'in progress'")
        finishing = {row[0] for row in cur.fetchall()}  # later ones commit after the watermark: in the window
        deadline = time.monotonic() + 5.0
        while finishing and time.monotonic() < deadline:
            time.sleep(0.001)
            cur.execute("SELECT x::text FROM pg_snapshot_xip(pg_current_snapshot()) AS x")
            finishing &= {row[0] for row in cur.fetchall()}

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
