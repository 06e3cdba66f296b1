"""The exactly-once PostgreSQL sink: its connections and the state table that remembers positions.

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
from typing import Any, List, Tuple

import psycopg2
from psycopg2 import sql

from pgrepl.errors import ConfigError, first_line
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


class PostgresSink:
    """Connections to the sink database and the state table's SQL."""

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

    def acquire(self) -> Any:
        try:
            return self._idle.get_nowait()
        except queue.Empty:
            pass
        return self.connect()

    def release(self, conn: Any) -> None:
        if conn.closed:
            return
        with self._lock:
            if self._idle.qsize() >= self.size:
                conn.close()
                return
        self._idle.put(conn)

    def discard(self, conn: Any) -> None:
        try:
            conn.close()
        except Exception:  # already broken
            pass

    def close(self) -> None:
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                return
            except Exception:  # already broken
                pass
