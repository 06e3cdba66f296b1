"""The exactly-once PostgreSQL sink: its connections, the state table that remembers positions, and
the transaction that applies a batch of ops together with the new position (``PostgresSink.apply``).

State table (created if missing, name from ``state_table``)::

    CREATE TABLE pgrepl_consumer_state (
        group_id text NOT NULL, topic text NOT NULL, partition integer NOT NULL,
        lsn pg_lsn NOT NULL, seq_id bigint NOT NULL,   -- last applied (lsn, seq_id)
        kafka_offset bigint,                           -- offset of that op (informational)
        updated_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (group_id, topic, partition))

The lock is ``pg_advisory_xact_lock(hashtext(group_id || E'\\x1f' || topic), partition)``.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable, List, NamedTuple, Optional, Sequence, Tuple

import psycopg2
import psycopg2.extensions
from psycopg2 import sql

from pgrepl.errors import ConfigError, ConsumerError, first_line
from pgrepl.lsn import format_lsn, parse_lsn
from pgrepl.model import ReplicationOp
from pgrepl.postgres.connect import connect, quote_ident, redact_dsn

#: Default name of the idempotent mode's state table in the sink database.
DEFAULT_STATE_TABLE = "pgrepl_consumer_state"


def parse_table_name(name: str) -> Tuple[str, ...]:
    """Split ``table`` or ``schema.table`` into identifier parts (quoted parts may hold dots)."""
    if not isinstance(name, str) or not name.strip():
        raise ConfigError("state_table must be a table name, optionally schema-qualified")
    parts: List[str] = []
    current = ""
    quoted = False
    i = 0
    while i < len(name):
        ch = name[i]
        if quoted:
            if ch == '"':
                if i + 1 < len(name) and name[i + 1] == '"':
                    current += '"'
                    i += 1
                else:
                    quoted = False
            else:
                current += ch
        elif ch == '"':
            quoted = True
        elif ch == ".":
            parts.append(current)
            current = ""
        else:
            current += ch
        i += 1
    parts.append(current)
    if quoted or len(parts) > 2 or any(not p for p in parts) or any("\x00" in p for p in parts):
        raise ConfigError(f"invalid state_table {name!r}: use 'table' or 'schema.table'")
    return tuple(parts)


class Applied(NamedTuple):
    """What ``PostgresSink.apply`` did with a batch of ops."""

    applied: int                # ops the handler got, committed with the new position
    skipped: int                # replays: at or below the position the sink already had
    transactions: int           # 1 when a transaction with a state update committed, else 0
    position: Tuple[int, int]   # the partition's (lsn, seq_id) in the sink afterwards


def is_sink_outage(error: BaseException) -> bool:
    """Whether ``error`` says the sink is unavailable rather than that the ops are wrong.

    libpq/psycopg2's OperationalError covers lost connections, a server shutting down or
    restarting, resource exhaustion, cancelled statements and the transaction-rollback class
    (serialization failures, deadlocks); InterfaceError a connection that is already closed.
    Errors of the handler's own SQL (constraint violations, syntax, data) are not outages.
    """
    return isinstance(error, (psycopg2.OperationalError, psycopg2.InterfaceError))


class HandlerEndedTransaction(Exception):
    """The handler committed or rolled back the sink transaction itself: its work may now be
    committed without the state, so the consumer must stop."""


class PostgresSink:
    """Connections to the sink database, the state table's SQL, and the exactly-once transaction."""

    def __init__(self, dsn: str, table: Tuple[str, ...], group_id: str, size: int) -> None:
        self.dsn = dsn
        self.table = table
        self.group_id = group_id
        self.size = size
        self._idle: "queue.SimpleQueue[Any]" = queue.SimpleQueue()
        self._opened = 0
        self._lock = threading.Lock()
        ident = sql.Identifier(*table)
        self.create_sql = sql.SQL(
            "CREATE TABLE IF NOT EXISTS {} ("
            "group_id text NOT NULL, topic text NOT NULL, partition integer NOT NULL, "
            "lsn pg_lsn NOT NULL, seq_id bigint NOT NULL, kafka_offset bigint, "
            "updated_at timestamptz NOT NULL DEFAULT now(), "
            "PRIMARY KEY (group_id, topic, partition))").format(ident)
        self.check_sql = sql.SQL(
            "SELECT group_id, topic, partition, lsn, seq_id, kafka_offset FROM {} LIMIT 0").format(ident)
        # One round trip opens the transaction, takes the lock and reads the position. The
        # SELECT is a separate statement so that, under READ COMMITTED, its snapshot is taken
        # after the lock was granted and sees what the previous holder committed.
        self.begin_sql = sql.SQL(
            "BEGIN; SELECT pg_advisory_xact_lock(hashtext(%s), %s); "
            "SELECT lsn::text, seq_id FROM {} WHERE group_id = %s AND topic = %s AND partition = %s"
        ).format(ident)
        self.commit_sql = sql.SQL(
            "INSERT INTO {} AS s (group_id, topic, partition, lsn, seq_id, kafka_offset, updated_at) "
            "VALUES (%s, %s, %s, %s::pg_lsn, %s, %s, now()) "
            "ON CONFLICT (group_id, topic, partition) DO UPDATE SET lsn = EXCLUDED.lsn, "
            "seq_id = EXCLUDED.seq_id, kafka_offset = EXCLUDED.kafka_offset, updated_at = now(); COMMIT"
        ).format(ident)
        self.read_sql = sql.SQL(
            "SELECT lsn::text, seq_id FROM {} WHERE group_id = %s AND topic = %s AND partition = %s").format(ident)

    @property
    def table_text(self) -> str:
        """The state table's name as SQL text, for messages."""
        return ".".join(quote_ident(p) for p in self.table)

    def connect(self) -> Any:
        """A new autocommit connection (pgrepl issues BEGIN/COMMIT itself to save round trips)."""
        return connect(self.dsn, application_name="pgrepl-consumer")

    def prepare(self) -> None:
        """Create the state table if missing and check its shape; keeps the connection."""
        conn = self.connect()
        try:
            with conn.cursor() as cur:
                # serialize concurrent creators (CREATE TABLE IF NOT EXISTS can race on pg_type)
                cur.execute("BEGIN; SELECT pg_advisory_xact_lock(hashtext('pgrepl consumer state table'), 0)")
                cur.execute(self.create_sql)
                cur.execute("COMMIT")
                try:
                    cur.execute(self.check_sql)
                except psycopg2.Error as exc:
                    raise ConfigError(
                        f"state table {self.table_text} exists but does not have pgrepl's columns "
                        f"(group_id, topic, partition, lsn, seq_id, kafka_offset): {first_line(exc)}") from None
        except psycopg2.ProgrammingError as exc:
            conn.close()
            raise ConfigError(f"cannot create the state table {self.table_text} in "
                              f"{redact_dsn(self.dsn)}: {first_line(exc)}") from None
        except BaseException:
            conn.close()
            raise
        self.release(conn)

    def apply(self, topic: str, partition: int, ops: List[ReplicationOp], offsets: Sequence[int],
              handler: Callable[[Any, List[ReplicationOp]], Any],
              known: Optional[Tuple[int, int]] = None) -> Applied:
        """Apply ``ops`` of one partition exactly once: ``handler(cursor, new_ops)`` and the position, one transaction.

        The transaction takes the partition's advisory lock, reads the stored position, hands
        the handler only the ops above it and moves the position (with the Kafka offset of the
        last one, from ``offsets``, parallel to ``ops``) before it commits. ``known`` is a
        position this partition committed before: ops all at or below it are skipped without
        a transaction (positions only grow). Errors are raised after the connection was
        rolled back (or dropped when broken); ``HandlerEndedTransaction`` when the handler
        committed or rolled back itself.
        """
        if known is not None and not any((op.lsn, op.seq_id) > known for op in ops):
            return Applied(0, len(ops), 0, known)
        conn = None
        try:
            conn = self.acquire()
            cur = conn.cursor()
            cur.execute(self.begin_sql, (f"{self.group_id}\x1f{topic}", partition, self.group_id, topic, partition))
            row = cur.fetchone()
            last = (parse_lsn(row[0]), row[1]) if row is not None else (-1, -1)
            new_ops: List[ReplicationOp] = []
            last_index = -1
            for index, op in enumerate(ops):
                pos = (op.lsn, op.seq_id)
                if pos > last:
                    new_ops.append(op)
                    last = pos
                    last_index = index
            if new_ops:
                handler(cur, new_ops)
                status = conn.info.transaction_status
                if status == psycopg2.extensions.TRANSACTION_STATUS_IDLE:
                    raise HandlerEndedTransaction()
                if status != psycopg2.extensions.TRANSACTION_STATUS_INTRANS:
                    raise ConsumerError("the sink transaction is in an error state after the handler returned "
                                        "(a failed statement was caught and ignored)")
                cur.execute(self.commit_sql, (self.group_id, topic, partition, format_lsn(last[0]), last[1],
                                              offsets[last_index]))
            else:
                cur.execute("COMMIT")
            cur.close()
        except Exception as exc:
            if conn is not None:
                self._abandon(conn, exc)
            raise
        self.release(conn)
        return Applied(len(new_ops), len(ops) - len(new_ops), 1 if new_ops else 0, last)

    def _abandon(self, conn: Any, error: BaseException) -> None:
        """After a failed transaction: roll back and keep the connection, or drop it when broken."""
        if isinstance(error, (psycopg2.OperationalError, psycopg2.InterfaceError)) or conn.closed:
            self.discard(conn)
            return
        try:
            with conn.cursor() as cur:
                cur.execute("ROLLBACK")
            self.release(conn)
        except Exception:
            self.discard(conn)

    def acquire(self) -> Any:
        """An idle connection, or a new one."""
        try:
            return self._idle.get_nowait()
        except queue.Empty:
            pass
        return self.connect()

    def release(self, conn: Any) -> None:
        """Give a healthy connection back (closed when ``size`` are idle already)."""
        if conn.closed:
            return
        with self._lock:
            if self._idle.qsize() >= self.size:
                conn.close()
                return
        self._idle.put(conn)

    def discard(self, conn: Any) -> None:
        """Close a broken connection."""
        try:
            conn.close()
        except Exception:  # already broken
            pass

    def close(self) -> None:
        """Close the idle connections (the consumer stopped)."""
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                return
            except Exception:  # already broken
                pass
