"""Shared helpers for integration tests: read topics to EOF, run a producer, query slots."""

from __future__ import annotations

import contextlib
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Set, Tuple

import orjson
import psycopg2
from confluent_kafka import Consumer

from pgrepl.lsn import parse_lsn
from pgrepl.topic_reader import read_to_end
from pgrepl.producer import Producer

Message = Tuple[int, int, Optional[bytes], bytes]  # partition, offset, key, value


def read_topic(bootstrap: str, topic: str, timeout: float = 30.0) -> List[Message]:
    """Every record of ``topic``, read from the beginning to the end of each partition.

    Reads to partition EOF rather than trusting high watermarks (tansu reports the last
    batch's base offset + 1 as the high watermark).
    """
    consumer = Consumer({
        "bootstrap.servers": bootstrap, "group.id": f"reader-{time.monotonic_ns()}",
        "enable.auto.commit": False, "enable.partition.eof": True, "auto.offset.reset": "earliest",
    })
    try:
        metadata = consumer.list_topics(topic, timeout=10)
        partitions = sorted(metadata.topics[topic].partitions) if topic in metadata.topics else []
        if not partitions:
            return []
        return [(msg.partition(), msg.offset(), msg.key(), msg.value())
                for msg in read_to_end(consumer, topic, partitions, timeout)]
    finally:
        consumer.close()


def ops_of(messages: List[Message]) -> List[Dict[str, Any]]:
    """Decoded JSON values, in (partition, offset) order."""
    return [orjson.loads(v) for _, _, _, v in sorted(messages, key=lambda m: (m[0], m[1]))]


def dedupe(messages: List[Message]) -> Dict[Tuple[int, int], bytes]:
    """(lsn, seq_id) -> value; asserts every duplicate is an exact replay."""
    seen: Dict[Tuple[int, int], bytes] = {}
    for _, _, _, value in messages:
        op = orjson.loads(value)
        position = (op["lsn"], op["seq_id"])
        if position in seen:
            assert seen[position] == value, f"duplicate {position} differs: {seen[position]!r} vs {value!r}"
        seen[position] = value
    return seen


def slot_state(dsn: str, slot: str) -> Tuple[Optional[int], Optional[int]]:
    """(confirmed_flush_lsn, active_pid) of a slot."""
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT confirmed_flush_lsn::text, active_pid FROM pg_replication_slots WHERE slot_name = %s", (slot,))
            row = cur.fetchone()
    finally:
        conn.close()
    if row is None:
        return None, None
    return (parse_lsn(row[0]) if row[0] else None), row[1]


def query_value(dsn: str, sql: str) -> Any:
    """The first column of the first row of ``sql``."""
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
            return cur.fetchone()[0]
    finally:
        conn.close()


def current_wal_lsn(dsn: str) -> int:
    """The WAL insert position: everything committed so far ends at or before it."""
    return parse_lsn(query_value(dsn, "SELECT pg_current_wal_insert_lsn()::text"))


def server_version_num(dsn: str) -> int:
    """The server's ``server_version_num``, e.g. 170010 (version-dependent tests branch on it)."""
    return int(query_value(dsn, "SELECT current_setting('server_version_num')::int"))


def execute(dsn: str, *statements: str, params: Any = None) -> None:
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            for statement in statements:
                cur.execute(statement, params)
    finally:
        conn.close()


@contextlib.contextmanager
def running(producer: Producer) -> Iterator[Producer]:
    """Run ``producer`` in a thread for the block; stop it after and re-raise its error."""
    errors: List[BaseException] = []

    def target() -> None:
        try:
            producer.start()
        except BaseException as exc:  # noqa: BLE001 - reported to the test thread
            errors.append(exc)

    producer.handle_signals = False
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    try:
        yield producer
    finally:
        producer.stop()
        thread.join(60)
        assert not thread.is_alive(), "producer did not stop within 60 s"
    if errors:
        raise errors[0]


def wait_for(predicate: Any, timeout: float = 30.0, interval: float = 0.1, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def wait_streaming(dsn: str, slot: str, timeout: float = 30.0) -> None:
    """Wait until a walsender streams from ``slot`` (changes made after this are in the stream).

    A slot is also "active" while the backend that creates it builds its snapshot: only a
    walsender counts (changes made before the slot's consistent point are not in its stream)."""
    def streaming() -> bool:
        conn = psycopg2.connect(dsn)
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT 1 FROM pg_replication_slots s JOIN pg_stat_activity a ON a.pid = s.active_pid "
                            "WHERE s.slot_name = %s AND a.backend_type = 'walsender'", (slot,))
                return cur.fetchone() is not None
        finally:
            conn.close()

    wait_for(streaming, timeout=timeout, what=f"a walsender on slot {slot}")


def make_source(dsn: str, p: str) -> None:
    """The ``{p}src`` table (REPLICA IDENTITY FULL) and the ``{p}pub`` publication of it."""
    execute(dsn,
            f"CREATE TABLE {p}src (id bigint PRIMARY KEY, grp text NOT NULL, n int NOT NULL, body text)",
            f"ALTER TABLE {p}src REPLICA IDENTITY FULL",
            f"CREATE PUBLICATION {p}pub FOR TABLE {p}src")


class Workload(threading.Thread):
    """Small transactions of inserts, updates and deletes on ``{p}src`` until stopped or ``max_ops``.

    ``ops`` counts the row changes made (committed), ``transactions`` the commits; ids start at
    ``first_id`` so two workloads on one table don't collide. ``move_keys``: the updates also
    change ``grp`` (the tests' partition key), moving rows between keys.
    """

    def __init__(self, dsn: str, p: str, seed: int = 1, first_id: int = 1, max_ops: Optional[int] = None,
                 pause: float = 0.01, max_rows: int = 30, move_keys: bool = False) -> None:
        super().__init__(daemon=True)
        self.dsn, self.p, self.rng = dsn, p, random.Random(seed)
        self.first_id, self.max_ops, self.pause, self.max_rows = first_id, max_ops, pause, max_rows
        self.move_keys = move_keys
        self.halt = threading.Event()
        self.ops = 0
        self.transactions = 0
        self.error: Optional[BaseException] = None

    def run(self) -> None:
        try:
            conn = psycopg2.connect(self.dsn)
            next_id = self.first_id
            with conn.cursor() as cur:
                while not self.halt.is_set() and (self.max_ops is None or self.ops < self.max_ops):
                    n = self.rng.randint(1, self.max_rows)
                    cur.execute(f"INSERT INTO {self.p}src SELECT g, 'g' || (g %% 7), 0, repeat('b', g %% 40) "
                                "FROM generate_series(%s, %s) g", (next_id, next_id + n - 1))
                    ops = cur.rowcount
                    next_id += n
                    low = self.rng.randint(self.first_id, next_id)
                    move = ", grp = 'g' || ((n + id) %% 7)" if self.move_keys else ""
                    cur.execute(f"UPDATE {self.p}src SET n = n + 1, body = body || 'u'{move} WHERE id BETWEEN %s AND %s",
                                (low, low + 4))
                    ops += cur.rowcount
                    cur.execute(f"DELETE FROM {self.p}src WHERE id = %s", (self.rng.randint(self.first_id, next_id),))
                    ops += cur.rowcount
                    conn.commit()
                    self.ops += ops
                    self.transactions += 1
                    time.sleep(self.rng.random() * self.pause)
            conn.close()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc

    def finish(self) -> None:
        """Stop making changes and re-raise the thread's error, if any."""
        self.halt.set()
        self.join(30)
        if self.error is not None:
            raise self.error


PROJECT_ROOT = Path(__file__).resolve().parents[2]


def source_rows(dsn: str, p: str) -> Dict[str, Tuple[str, str, str, Optional[str]]]:
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute(f"SELECT id::text, grp, n::text, body FROM {p}src")
            return {r[0]: tuple(r) for r in cur.fetchall()}
    finally:
        conn.close()


def replay(ops: Dict[Tuple[int, int], bytes]) -> Dict[str, tuple]:
    """Apply the ops in (lsn, seq_id) order to an empty table; return the resulting rows."""
    table: Dict[str, tuple] = {}
    for _, value in sorted(ops.items()):
        ((kind, payload),) = orjson.loads(value)["op"].items()
        if kind == "Insert":
            assert payload[0] not in table
            table[payload[0]] = tuple(payload)
        elif kind == "Update":
            assert table.pop(payload[0][0]) == tuple(payload[0])
            table[payload[1][0]] = tuple(payload[1])
        else:
            assert table.pop(payload[0]) == tuple(payload)
    return table


def check_order_per_key(messages) -> None:
    """Per key, first occurrences come in strictly increasing WAL order (replays may repeat a suffix)."""
    by_partition: Dict[int, List] = {}
    for part, offset, key, value in messages:
        by_partition.setdefault(part, []).append((offset, key, value))
    for entries in by_partition.values():
        seen: Set[Tuple[int, int]] = set()
        last: Dict[bytes, Tuple[int, int]] = {}
        for _, key, value in sorted(entries, key=lambda e: e[0]):
            op = orjson.loads(value)
            pos = (op["lsn"], op["seq_id"])
            if pos in seen:
                continue
            seen.add(pos)
            assert pos > last.get(key, (-1, -1)), f"key {key!r}: {pos} after {last.get(key)}"
            last[key] = pos


def start_cli(config: Path, log: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")])))
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "pgrepl.cli", "--log-level", "INFO", "produce", "--config", str(config)],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
