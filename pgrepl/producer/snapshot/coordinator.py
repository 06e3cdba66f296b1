"""Snapshots while streaming: chunk windows in the stream, stale rows dropped, chunks emitted in place.

The coordinator runs the snapshot jobs of one producer. Reader threads read chunks between a
low and a high watermark (``reader``); the session hands every decoded batch to ``process``,
which watches the stream between each chunk's watermarks for changes of that chunk's rows and,
at the high watermark, emits the rows nobody changed meanwhile as Insert records, right there
in the stream's order. A row changed while its chunk was read comes from the stream, not from
the chunk, so per key the topic never goes back to an older version.

Positions: a chunk's records take the high watermark transaction's commit LSN with seq_id 0, 1,
...; nothing else has that LSN, and it lies between the stream records before and after it, so
``(lsn, seq_id)`` stays unique and increasing in every partition. Progress (each key range's
last confirmed key) is kept in the slot history on Kafka and moves only once the slot is
confirmed past a chunk's high watermark, so a producer killed mid-snapshot resumes at the last
completed chunk, and never counts a chunk whose records were not delivered.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Set, Tuple

import orjson

from pgrepl._core import Batch, Decoder, copy_row_keys, copy_row_values, encode_copy_rows, restamp_copy_records
from pgrepl._runtime import Waker
from pgrepl.errors import PgreplError
from pgrepl.lsn import format_lsn
from pgrepl.postgres.connect import connect
from pgrepl.producer.snapshot.plan import KeyRange, TablePlan, plan_table, published_tables, resolve_tables
from pgrepl.producer.snapshot.reader import WATERMARK_PREFIX, Chunk, ChunkReader

log = logging.getLogger("pgrepl.snapshot")

REQUEST_PREFIX = "pgrepl.snapshot"
HEADER = "pgrepl.snapshot"

#: A decoded batch (or a part of one) and the Kafka headers its records carry (snapshot rows).
Part = Tuple[Batch, Optional[List[Tuple[str, bytes]]]]


@dataclass
class SnapshotJob:
    """One snapshot: the tables it reads (in order) and how far each got."""

    id: str
    tables: List[TablePlan]
    started: float = field(default_factory=time.time)

    @property
    def done(self) -> bool:
        return all(t.done for t in self.tables)

    def to_json(self) -> Dict[str, Any]:
        return {"id": self.id, "started": self.started, "tables": [t.to_json() for t in self.tables]}


@dataclass
class Progress:
    """The running snapshots in numbers."""

    running: int
    tables: int
    tables_done: int
    rows_estimated: int
    rows_confirmed: int
    started: float


@dataclass
class _Confirmation:
    """A chunk emitted at ``lsn``: when the slot is confirmed past it, its range moves on."""

    lsn: int
    table: TablePlan
    key_range: KeyRange
    next_after: Any
    rows: int


class SnapshotCoordinator:
    """Runs a producer's snapshot jobs alongside its stream (see the module docstring)."""

    def __init__(self, dsn: str, publication: str, topic_map: Any, instance: str, application_name: str,
                 connections: int, chunk_size: int, waker: Waker) -> None:
        self.dsn = dsn
        self.publication = publication
        self.topic_map = topic_map
        self.instance = instance
        self.application_name = application_name
        self.connections = connections
        self.chunk_size = chunk_size
        self.waker = waker
        self.jobs: List[SnapshotJob] = []
        self.streaming = False            # readers work only while the session streams
        self.changed = False              # progress moved since the history last recorded it
        self.urgent = False               # a request arrived: record it before the slot moves past it
        self.rows = 0                     # snapshot rows emitted by this producer
        self.stale_rows = 0               # chunk rows dropped: the stream changed them during the read
        self.on_job_done: Optional[Callable[[SnapshotJob], None]] = None
        self._lock = threading.Condition()
        self._inflight: Dict[str, Chunk] = {}
        self._windows: Dict[str, Chunk] = {}   # chunks whose low watermark was seen, not the high one
        self._confirmations: List[_Confirmation] = []
        self._counter = 0
        self._readers: List[ChunkReader] = []
        self._encoder: Optional[Decoder] = None
        self._relids: Dict[str, int] = {}
        self._partition_counts: Dict[str, int] = {}
        self._generation = 0                # of the partition counts: a session's
        self._local = threading.local()     # each reader thread's encoder
        self._requests: Dict[str, Dict[str, Any]] = {}  # asked for, being planned (kept in the history too)

    # -- jobs -----------------------------------------------------------------------------------

    @property
    def active(self) -> bool:
        """Whether a snapshot is running (or being planned)."""
        return bool(self.jobs or self._requests)

    @property
    def watching(self) -> bool:
        """Whether a chunk's window is open: the stream's records must be looked at."""
        return bool(self._windows)

    def plan(self, conn: Any, job_id: str, tables: Optional[Sequence[str]], where: Optional[str]) -> SnapshotJob:
        """A job over ``tables`` (None: every published table); ``ConfigError`` for what cannot be snapshotted."""
        names = resolve_tables(conn, self.publication, tables) if tables else published_tables(conn, self.publication)
        plans = [plan_table(conn, self.publication, schema, name, where, self.connections * 2)
                 for schema, name in names]
        return SnapshotJob(job_id, plans)

    def add(self, job: SnapshotJob) -> None:
        """Start (or resume) a job."""
        with self._lock:
            self.jobs.append(job)
            self.changed = True
            self._lock.notify_all()
        log.info("snapshot %s: %d table(s): %s", job.id, len(job.tables),
                 ", ".join(t.qualified_name for t in job.tables))

    def resume(self, conn: Any, saved: Sequence[Dict[str, Any]]) -> None:
        """Re-plan the unfinished jobs recorded in the slot history and continue them."""
        for entry in saved:
            if any(job.id == entry["id"] for job in self.jobs) or entry["id"] in self._requests:
                continue
            if "request" in entry:  # asked for, not planned yet when the producer stopped
                log.info("snapshot %s: planning it after a restart", entry["id"])
                self._start_planning(entry["id"], entry["request"].get("tables"), entry["request"].get("where"))
                continue
            tables: List[TablePlan] = []
            for table in entry["tables"]:
                schema, name = table["table"].split(".", 1)
                plan = plan_table(conn, self.publication, schema, name, table.get("where"), 1)
                plan.ranges = [KeyRange.from_json(r) for r in table["ranges"]]
                plan.rows = int(table.get("rows", 0))
                tables.append(plan)
            job = SnapshotJob(entry["id"], tables, float(entry.get("started", time.time())))
            log.info("snapshot %s: resuming after a restart", job.id)
            self.add(job)

    def saved(self) -> List[Dict[str, Any]]:
        """The unfinished jobs (and requests not planned yet), as the slot history keeps them."""
        with self._lock:
            self.changed = False
            self.urgent = False
            return [job.to_json() for job in self.jobs] + [
                {"id": job_id, "request": request} for job_id, request in self._requests.items()]

    def request(self, content: bytes, lsn: int) -> None:
        """A snapshot asked for with SQL (``pg_logical_emit_message(true, 'pgrepl.snapshot', ...)``)."""
        try:
            data = json.loads(content)
            tables = data.get("tables") or None
            where = data.get("where")
            job_id = str(data.get("id") or f"request-{lsn:X}")
            if tables is not None and (not isinstance(tables, list) or not all(isinstance(t, str) for t in tables)):
                raise ValueError('"tables" must be a list of table names')
        except (ValueError, TypeError, AttributeError) as exc:
            log.error("ignoring the snapshot request at LSN %s: its content is not JSON like "
                      '{"tables": [...], "where": "..."} (%s)', format_lsn(lsn), exc)
            return
        if any(job.id == job_id for job in self.jobs) or job_id in self._requests:
            return  # replayed after a reconnect: already running
        self.urgent = True  # the session records it before it confirms past this message
        self._start_planning(job_id, tables, where)

    def _start_planning(self, job_id: str, tables: Optional[List[str]], where: Optional[str]) -> None:
        with self._lock:
            self._requests[job_id] = {"tables": tables, "where": where}
            self.changed = True
        threading.Thread(target=self._plan_request, args=(job_id, tables, where), daemon=True,
                         name="pgrepl-snapshot-planner").start()

    def _plan_request(self, job_id: str, tables: Optional[List[str]], where: Optional[str]) -> None:
        try:
            conn = connect(self.dsn, application_name=self.application_name)
            try:
                job = self.plan(conn, job_id, tables, where)
            finally:
                conn.close()
        except (PgreplError, Exception) as exc:  # noqa: BLE001 - a bad request must not stop the stream
            log.error("snapshot request %s refused: %s", job_id, str(exc).strip().splitlines()[0] if str(exc) else exc)
            with self._lock:
                self._requests.pop(job_id, None)
                self.changed = True
            return
        with self._lock:
            self._requests.pop(job_id, None)
        self.add(job)

    # -- readers --------------------------------------------------------------------------------

    def start_readers(self) -> None:
        """Start the reader threads (once); they read only while ``streaming``."""
        if self._readers:
            return
        for _ in range(self.connections):
            reader = ChunkReader(self.dsn, self.application_name, self.chunk_size, self.waker,
                                 self._next_chunk, self._chunk_read, self._chunk_failed)
            reader.start()
            self._readers.append(reader)

    def _next_chunk(self) -> Optional[Chunk]:
        """The next chunk to read: a range with no chunk in flight, or None after a short wait."""
        with self._lock:
            if self.streaming and len(self._inflight) < self.connections + 1:
                for job in self.jobs:
                    for table in job.tables:
                        for key_range in table.ranges:
                            if not key_range.busy and not key_range.exhausted:
                                key_range.busy = True
                                self._counter += 1
                                chunk = Chunk(f"{self.instance}:{self._counter}", job.id, table, key_range)
                                self._inflight[chunk.id] = chunk
                                return chunk
            self._lock.wait(0.5)
        return None

    def _chunk_read(self, chunk: Chunk) -> None:
        """A reader has the chunk's rows: where its range continues is known now, and (on the reader's
        thread, off the stream's) the rows are encoded ahead, at a position the emission rewrites."""
        last = chunk.next_after
        if last is not None:
            values = copy_row_values(last)
            chunk.next_after = tuple(values[i] for i in chunk.table.key_positions())
        rows = chunk.rows
        if rows is None or rows.spilled:
            return  # a spilled keyless table stays on disk until its emission encodes it
        encoder, relid = self._reader_encoder(chunk.table)
        table = chunk.table
        blocks = list(rows.blocks)  # read once: a pause() meanwhile must not leave records without identities
        try:
            records = [encode_copy_rows(encoder, relid, block, 0, 0) for block in blocks]
        except PgreplError:
            return  # encoded at the emission, where the error stops the producer as it should
        # the rows' identities, for the rows the stream changes during the window: then the
        # COPY text can go (a chunk in flight is held once, as records)
        identities = [copy_row_keys(block, table.key_positions(), len(table.columns)) for block in blocks]
        chunk.ahead = list(zip(records, identities))
        rows.close()

    def _reader_encoder(self, table: TablePlan) -> Tuple[Decoder, int]:
        """This reader thread's own encoder (same topic map and partition counts as the stream's), and
        the table's relation id in it."""
        local = self._local
        if getattr(local, "generation", None) != self._generation:
            local.encoder = self._new_encoder()
            local.relids = {}
            local.generation = self._generation
        relid = local.relids.get(table.qualified_name)
        if relid is None:
            relid = local.relids[table.qualified_name] = len(local.relids) + 1
            local.encoder.define_relation(relid, table.schema, table.name, table.columns)
        return local.encoder, relid

    def _chunk_failed(self, chunk: Chunk, error: BaseException) -> None:
        log.warning("snapshot chunk of %s failed (%s); reading it again", chunk.table.qualified_name,
                    str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__)
        with self._lock:
            self._drop(chunk)

    def _drop(self, chunk: Chunk) -> None:
        self._inflight.pop(chunk.id, None)
        self._windows.pop(chunk.id, None)
        chunk.range.busy = False
        if chunk.rows is not None:
            chunk.rows.close()
        self._lock.notify_all()

    def pause(self) -> None:
        """The session ended: chunks in flight are abandoned (their ranges are read again)."""
        with self._lock:
            self.streaming = False
            for chunk in list(self._inflight.values()):
                self._drop(chunk)
            for job in self.jobs:
                for table in job.tables:
                    for key_range in table.ranges:
                        key_range.rewind()
            self._confirmations.clear()

    # -- the stream -----------------------------------------------------------------------------

    def encoder(self, partition_counts: Dict[str, int]) -> Decoder:
        """A decoder for snapshot rows, with the stream's partition counts (a new session's)."""
        self._partition_counts = dict(partition_counts)
        self._generation += 1  # the readers make new encoders of their own
        self._encoder = self._new_encoder()
        self._relids = {}
        return self._encoder

    def _new_encoder(self) -> Decoder:
        encoder = Decoder(self.topic_map)
        for topic, count in self._partition_counts.items():
            encoder.set_partition_count(topic, count)
        return encoder

    def process(self, batch: Batch) -> Iterator[Part]:
        """Split ``batch`` around the chunks whose high watermark it holds (their rows go in between).

        A generator: each chunk's rows are encoded a block at a time as the caller produces the
        parts, so a chunk is never held in memory twice (COPY text and records) as a whole.
        """
        if not batch.messages and not self._windows:
            yield batch, None
            return
        start = 0
        commit = 0
        for index, lsn, prefix, content in batch.messages:
            self._scan(batch, start, index)
            if prefix == REQUEST_PREFIX:
                self.request(content, lsn)
                continue
            if prefix != WATERMARK_PREFIX:
                continue
            try:
                mark = json.loads(content)
                chunk = self._inflight.get(str(mark["chunk"]))
            except (ValueError, KeyError, TypeError):
                continue
            if chunk is None:
                continue  # another producer's, or an earlier session's
            if mark.get("edge") == "low":
                chunk.low_seen = True
                self._windows[chunk.id] = chunk
                continue
            commit_end = commit
            while commit_end < len(batch.commits) and batch.commits[commit_end].commit_lsn < lsn:
                commit_end += 1
            yield _part(batch, start, index, commit, commit_end), None
            start, commit = index, commit_end
            yield from self._emit(chunk, lsn)
        self._scan(batch, start, len(batch))
        yield _part(batch, start, len(batch), commit, len(batch.commits)), None

    def _scan(self, batch: Batch, start: int, end: int) -> None:
        """Note the rows the stream changed (old and new identity) in every open chunk window."""
        if not self._windows or start >= end:
            return
        by_topic: Dict[str, List[Chunk]] = {}
        for chunk in self._windows.values():
            info = self.topic_map.get(chunk.table.qualified_name) or self.topic_map.get(chunk.table.name)
            by_topic.setdefault(info.name, []).append(chunk)
        topics, values = batch.topics, batch.values
        for i in range(start, end):
            chunks = by_topic.get(topics[i])
            if not chunks:
                continue
            record = orjson.loads(values[i])
            for chunk in chunks:
                if record["table_name"] == chunk.table.name:
                    chunk.stale.update(_identities(record, chunk.table))

    def _emit(self, chunk: Chunk, lsn: int) -> Iterator[Part]:
        """The chunk's rows nobody changed during its window, as Insert records at ``(lsn, 0...)``."""
        assert self._encoder is not None and chunk.rows is not None
        self._windows.pop(chunk.id, None)
        table = chunk.table
        relid = self._relids.get(table.qualified_name)
        if relid is None:
            relid = self._relids[table.qualified_name] = len(self._relids) + 1
            self._encoder.define_relation(relid, table.schema, table.name, table.columns)
        positions = table.key_positions()
        headers = [(HEADER, chunk.job_id.encode())]
        seq = 0
        blocks = chunk.ahead if chunk.ahead is not None else ((block, None) for block in chunk.rows.batches())
        for rows, identities in blocks:
            keep = None
            if chunk.stale:
                keys = identities if identities is not None else copy_row_keys(rows, positions, len(table.columns))
                keep = bytes(key not in chunk.stale for key in keys)
                self.stale_rows += len(keys) - sum(keep)
            if isinstance(rows, Batch):  # encoded by the reader: only the position is written now
                part = restamp_copy_records(self._encoder, relid, rows, lsn, seq, keep)
            else:
                part = encode_copy_rows(self._encoder, relid, rows, lsn, seq, keep)
            if len(part):
                seq += len(part)
                yield part, headers
        with self._lock:
            self._inflight.pop(chunk.id, None)
            chunk.rows.close()
            chunk.range.reading = chunk.next_after
            chunk.range.exhausted = chunk.next_after is None
            chunk.range.busy = False
            self._confirmations.append(_Confirmation(lsn, table, chunk.range, chunk.next_after, seq))
            self._lock.notify_all()
        self.rows += seq

    def confirmed(self, lsn: int) -> None:
        """The slot is confirmed up to ``lsn``: chunks emitted before it are done for good."""
        if not self._confirmations or self._confirmations[0].lsn >= lsn:
            return
        finished: List[SnapshotJob] = []
        with self._lock:
            while self._confirmations and self._confirmations[0].lsn < lsn:
                done = self._confirmations.pop(0)
                done.table.rows += done.rows
                if done.next_after is None:
                    done.key_range.done = True
                else:
                    done.key_range.after = done.next_after
                self.changed = True
            for job in list(self.jobs):
                if job.done:
                    self.jobs.remove(job)
                    finished.append(job)
                    self.urgent = True  # a restart must not take the finished snapshot again
        for job in finished:
            rows = sum(t.rows for t in job.tables)
            log.info("snapshot %s done: %d table(s), %d rows in %.0f s", job.id, len(job.tables), rows,
                     time.time() - job.started)
            if self.on_job_done is not None:
                self.on_job_done(job)

    def progress(self) -> "Progress":
        """Where the running snapshots are (for the status line and the metrics)."""
        with self._lock:
            tables = [t for job in self.jobs for t in job.tables]
            started = min((job.started for job in self.jobs), default=time.time())
            return Progress(len(self.jobs) + len(self._requests), len(tables), sum(1 for t in tables if t.done),
                            sum(max(t.estimated_rows, t.rows) for t in tables), sum(t.rows for t in tables), started)

    def status(self) -> str:
        """One line for the status log: tables done, rows, rows/s, and how long the rest may take."""
        p = self.progress()
        rate = p.rows_confirmed / max(time.time() - p.started, 1e-3)
        left = p.rows_estimated - p.rows_confirmed
        eta = f"{left / rate:.0f} s" if rate > 0 and left > 0 else "?"
        return (f"snapshot: {p.tables_done}/{p.tables} tables, {p.rows_confirmed} of about {p.rows_estimated} rows, "
                f"{rate:.0f} rows/s, about {eta} left")


def _identities(record: Dict[str, Any], table: TablePlan) -> Set[bytes]:
    """The identities (chunk key, or whole row for a keyless table) of a stream record's rows."""
    columns = record["col_names"]
    ((kind, payload),) = record["op"].items()
    rows = [payload[0], payload[1]] if kind == "Update" else [payload]
    names = table.key_columns or table.columns
    try:
        positions = [columns.index(name) for name in names]
    except ValueError:
        return set()  # the table's columns changed under the snapshot: nothing to match
    return {b"\x00".join(b"\xff" if row[p] is None else row[p].encode() for p in positions) for row in rows}


def _part(batch: Batch, start: int, end: int, commit_start: int, commit_end: int) -> Batch:
    """Records ``[start, end)`` and commits ``[commit_start, commit_end)`` of ``batch`` as a batch of their own."""
    if start == 0 and end == len(batch) and commit_start == 0 and commit_end == len(batch.commits):
        return batch
    part = Batch()
    part.topics = batch.topics[start:end]
    part.keys = batch.keys[start:end]
    part.values = batch.values[start:end]
    part.partitions = batch.partitions[start:end]
    part.commits = batch.commits[commit_start:commit_end]
    last: Dict[Tuple[str, int], int] = {}
    for i, (topic, partition) in enumerate(zip(part.topics, part.partitions)):
        last[(topic, partition) if partition >= 0 else (topic, -1 - i)] = i
    part.markers = sorted(last.values())
    return part


def new_job_id(kind: str) -> str:
    return f"{kind}-{uuid.uuid4().hex[:8]}"
