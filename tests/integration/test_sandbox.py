"""Proof that the integration sandbox is real: logical decoding, a working broker, restarts, no orphans."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from typing import Callable, Dict, List, Optional, Set, Tuple

import psycopg2
import psycopg2.extras
import pytest
from confluent_kafka import Consumer, KafkaError, Message, Producer
from psycopg2 import sql

import pgrepl
from pgrepl.testing import LocalBroker, LocalPostgres, SandboxError, sweep_orphans
from pgrepl.testing import _service
from pgrepl.topic_reader import read_to_end

# tansu (like Kafka with group.initial.rebalance.delay) holds a new group's first join back; with
# tansu the hold is about session.timeout.ms / 2, so librdkafka's 45 s default would cost ~22 s.
# 6 s is the smallest value Apache Kafka accepts by default (group.min.session.timeout.ms).
GROUP_CONSUMER_CONF = {"session.timeout.ms": 6000, "heartbeat.interval.ms": 1000}

PROJECT_ROOT = Path(pgrepl.__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------
# PostgreSQL
# ------------------------------------------------------------------------------------------


@pytest.mark.smoke
def test_wal_level_is_logical(pg_dsn: str) -> None:
    conn = psycopg2.connect(pg_dsn)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT current_setting('wal_level'), current_setting('max_replication_slots')::int")
            row = cur.fetchone()
    finally:
        conn.close()
    assert row is not None
    wal_level, max_slots = row
    assert wal_level == "logical"
    assert max_slots > 0


@pytest.mark.smoke
def test_pgoutput_slot_receives_inserts(
    pg_dsn: str, name_prefix: str, drop_replication_slot: Callable[[str], bool]
) -> None:
    table, pub, slot = name_prefix + "tbl", name_prefix + "pub", name_prefix + "slot"
    value = f"hello-{uuid.uuid4().hex}"
    conn = psycopg2.connect(pg_dsn)
    conn.autocommit = True
    repl = psycopg2.connect(pg_dsn, connection_factory=psycopg2.extras.LogicalReplicationConnection)
    try:
        with conn.cursor() as cur:
            cur.execute(sql.SQL("CREATE TABLE {} (id serial PRIMARY KEY, body text NOT NULL)").format(sql.Identifier(table)))
            cur.execute(sql.SQL("CREATE PUBLICATION {} FOR TABLE {}").format(sql.Identifier(pub), sql.Identifier(table)))
        rcur = repl.cursor()
        rcur.create_replication_slot(slot, output_plugin="pgoutput")
        with conn.cursor() as cur:  # after the slot exists, so the slot sees it
            cur.execute(sql.SQL("INSERT INTO {} (body) VALUES (%s)").format(sql.Identifier(table)), (value,))
        rcur.start_replication(
            slot_name=slot, decode=False, options={"proto_version": "1", "publication_names": pub}
        )

        payloads: List[bytes] = []
        ours: Optional[int] = None  # index of the 'I' message carrying our value
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            msg = rcur.read_message()
            if msg is None:
                select.select([rcur], [], [], 0.5)
                continue
            payloads.append(msg.payload)
            msg.cursor.send_feedback(flush_lsn=msg.data_start)
            if msg.payload[:1] == b"I" and value.encode() in msg.payload:
                ours = len(payloads) - 1
            if ours is not None and msg.payload[:1] == b"C":
                break
        else:
            pytest.fail(f"no commit of the inserted row within 20 s; saw message types {[p[:1] for p in payloads]}")
    finally:
        repl.close()
        conn.close()
        drop_replication_slot(slot)

    types = [p[:1] for p in payloads]
    # Our transaction: Begin, the table's Relation, our Insert (payload has the text), Commit.
    assert b"B" in types[:ours] and b"R" in types[:ours], types
    assert types[-1] == b"C" and {b"B", b"R", b"I", b"C"} <= set(types), types


@pytest.mark.smoke
def test_local_postgres_restart(local_pg: Optional[LocalPostgres], name_prefix: str) -> None:
    if local_pg is None:
        pytest.skip("PostgreSQL is external (PGREPL_TEST_PG_DSN): cannot restart it")
    table = name_prefix + "tbl"
    conn = psycopg2.connect(local_pg.dsn)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(sql.SQL("CREATE TABLE {} (v text)").format(sql.Identifier(table)))
        cur.execute(sql.SQL("INSERT INTO {} VALUES ('kept')").format(sql.Identifier(table)))
    old_pid, old_port, old_dir = local_pg.pid, local_pg.port, local_pg.data_dir

    local_pg.restart()

    assert local_pg.pid is not None and local_pg.pid != old_pid
    assert (local_pg.port, local_pg.data_dir) == (old_port, old_dir)
    with pytest.raises(psycopg2.Error):  # the old session died with the old server
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
    conn.close()
    conn = psycopg2.connect(local_pg.dsn)
    try:
        with conn.cursor() as cur:
            cur.execute(sql.SQL("SELECT v FROM {}").format(sql.Identifier(table)))
            assert cur.fetchall() == [("kept",)]
    finally:
        conn.close()


@pytest.mark.smoke
def test_restart_does_not_hang_on_a_stalled_replication_client(
    local_pg: Optional[LocalPostgres], name_prefix: str, drop_replication_slot: Callable[[str], bool]
) -> None:
    """A fast shutdown waits for walsenders whose clients stopped reading; restart() must not."""
    if local_pg is None:
        pytest.skip("PostgreSQL is external (PGREPL_TEST_PG_DSN): cannot restart it")
    table, pub, slot = name_prefix + "tbl", name_prefix + "pub", name_prefix + "slot"
    conn = psycopg2.connect(local_pg.dsn)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, v text)").format(sql.Identifier(table)))
        cur.execute(sql.SQL("CREATE PUBLICATION {} FOR TABLE {}").format(sql.Identifier(pub), sql.Identifier(table)))
    conn.close()
    repl = psycopg2.connect(local_pg.dsn, connection_factory=psycopg2.extras.LogicalReplicationConnection)
    try:
        rcur = repl.cursor()
        rcur.create_replication_slot(slot, output_plugin="pgoutput")
        conn = psycopg2.connect(local_pg.dsn)
        with conn, conn.cursor() as cur:
            cur.execute(
                sql.SQL("INSERT INTO {} SELECT g, repeat('x', 1000) FROM generate_series(1, 2000) g").format(
                    sql.Identifier(table)
                )
            )
        conn.close()
        rcur.start_replication(slot_name=slot, decode=False, options={"proto_version": "1", "publication_names": pub})
        # The client never reads: the walsender blocks on a full socket, as behind a stalled broker.
        started = time.monotonic()
        local_pg.restart()
        assert time.monotonic() - started < 15
    finally:
        repl.close()
    assert drop_replication_slot(slot), "the slot should survive the restart"


# ------------------------------------------------------------------------------------------
# Orphans
# ------------------------------------------------------------------------------------------


def _children(pid: int) -> Set[int]:
    """PIDs of the live children of ``pid`` (the postmaster's backends and auxiliary processes)."""
    return {child for child, _ in _service.children_titles(pid)}


def _gone(pids: Set[int], timeout: float) -> bool:
    """Whether all ``pids`` have exited (zombies count) within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while any(_service.pid_exists(p) for p in pids):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _start_owner_and_kill_it(tmp_path: Path, pdeathsig: bool) -> Tuple[int, str, Set[int]]:
    """Start a LocalPostgres in a child Python process, SIGKILL that process, return (postmaster, dir, children)."""
    code = textwrap.dedent(
        f"""
        import json, os, time
        from pgrepl.testing import LocalPostgres, _service
        _service.PDEATHSIG_ENABLED = {pdeathsig!r}
        pg = LocalPostgres().start()
        print(json.dumps({{"pid": pg.pid, "dir": os.path.dirname(pg.data_dir)}}), flush=True)
        time.sleep(120)
        """
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")])))
    stderr_path = tmp_path / "owner.stderr"
    with open(stderr_path, "wb") as stderr:
        owner = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=stderr, env=env)
    try:
        assert owner.stdout is not None
        ready, _, _ = select.select([owner.stdout], [], [], 60)
        line = owner.stdout.readline() if ready else b""
        if not line:
            pytest.fail(f"owner process did not start a server within 60 s:\n{stderr_path.read_text()[-3000:]}")
        info: Dict[str, object] = json.loads(line)
        postmaster, sandbox_dir = int(info["pid"]), str(info["dir"])  # type: ignore[call-overload]
        children = _children(postmaster)
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait(10)
        if owner.stdout is not None:
            owner.stdout.close()
    return postmaster, sandbox_dir, children


@pytest.mark.smoke
def test_sweep_kills_orphaned_postgres(local_pg: Optional[LocalPostgres], tmp_path: Path) -> None:
    """With the death signal off, only the sweep stands between a SIGKILLed owner and an orphan."""
    if local_pg is None:
        pytest.skip("PostgreSQL is external (PGREPL_TEST_PG_DSN)")
    postmaster, sandbox_dir, children = _start_owner_and_kill_it(tmp_path, pdeathsig=False)
    try:
        assert children, "the orphaned postmaster should have auxiliary processes"
        time.sleep(0.3)
        assert _service.pid_exists(postmaster), "without PR_SET_PDEATHSIG the postmaster outlives its owner"
        assert os.path.isdir(sandbox_dir)

        with LocalPostgres() as pg:  # the next start sweeps the root first
            assert not os.path.exists(sandbox_dir)
            assert not _service.pid_exists(postmaster)
            assert pg.pid != postmaster
        assert _gone(children, 15), "the orphan's backends should exit with their postmaster"
    finally:
        sweep_orphans()  # never leave the orphan behind, even when an assertion failed


def test_owner_death_signal_stops_postgres(local_pg: Optional[LocalPostgres], tmp_path: Path) -> None:
    """With PR_SET_PDEATHSIG the kernel stops the server as soon as its owner dies; the sweep removes the dir."""
    if local_pg is None:
        pytest.skip("PostgreSQL is external (PGREPL_TEST_PG_DSN)")
    if not sys.platform.startswith("linux"):
        pytest.skip("PR_SET_PDEATHSIG is Linux-only")
    postmaster, sandbox_dir, children = _start_owner_and_kill_it(tmp_path, pdeathsig=True)
    try:
        assert _gone({postmaster} | children, 15), "postmaster should stop on its owner's death"
        assert os.path.isdir(sandbox_dir)
        assert sandbox_dir in sweep_orphans()
        assert not os.path.exists(sandbox_dir)
    finally:
        sweep_orphans()


# ------------------------------------------------------------------------------------------
# Kafka
# ------------------------------------------------------------------------------------------


def _read_partition_to_eof(bootstrap: str, topic: str, partition: int, timeout: float = 30) -> List[Message]:
    """All messages of one partition, read until partition EOF (tansu's watermarks cannot be trusted)."""
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": "unused", "enable.partition.eof": True, "enable.auto.commit": False}
    )
    try:
        return list(read_to_end(consumer, topic, [partition], timeout))
    finally:
        consumer.close()


def test_broker_round_trip_idempotent_producer_and_group(kafka_bootstrap: str, name_prefix: str) -> None:
    topic = name_prefix + "rt"
    key, value = b"key-" + uuid.uuid4().hex.encode(), b"value-" + uuid.uuid4().hex.encode()
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "enable.idempotence": True, "acks": "all"})
    reports: List[Tuple[Optional[KafkaError], Optional[int]]] = []
    producer.produce(topic, key=key, value=value, on_delivery=lambda err, msg: reports.append((err, msg.partition())))
    assert producer.flush(30) == 0
    assert len(reports) == 1 and reports[0][0] is None, reports

    assigned: Set[int] = set()
    eof: Set[int] = set()
    got: List[Tuple[bytes, bytes]] = []
    consumer = Consumer(
        {
            "bootstrap.servers": kafka_bootstrap,
            "group.id": name_prefix + "group",
            "auto.offset.reset": "earliest",
            "enable.partition.eof": True,
            **GROUP_CONSUMER_CONF,
        }
    )
    try:
        consumer.subscribe([topic], on_assign=lambda c, parts: assigned.update(p.partition for p in parts))
        deadline = time.monotonic() + 45
        while not (got and assigned and eof >= assigned):  # read every partition to EOF
            assert time.monotonic() < deadline, f"timed out: assigned={assigned} eof={eof} got={got}"
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            if msg.error():
                assert msg.error().code() == KafkaError._PARTITION_EOF, msg.error()
                eof.add(msg.partition())
                continue
            eof.discard(msg.partition())
            got.append((msg.key(), msg.value()))
    finally:
        consumer.close()
    assert got == [(key, value)]


def test_broker_pause_and_resume(local_broker: Optional[LocalBroker], name_prefix: str) -> None:
    if local_broker is None:
        pytest.skip("Kafka is external (PGREPL_TEST_KAFKA): cannot pause it")
    topic = name_prefix + "pause"
    producer = Producer({"bootstrap.servers": local_broker.bootstrap, "enable.idempotence": True, "acks": "all"})
    reports: List[Tuple[bytes, Optional[KafkaError], int]] = []

    def on_delivery(err: Optional[KafkaError], msg: Message) -> None:
        reports.append((msg.value(), err, msg.partition()))

    producer.produce(topic, key=b"k", value=b"before", on_delivery=on_delivery)
    assert producer.flush(30) == 0 and reports[-1][1] is None  # topic exists, connection warm

    with local_broker.paused():
        assert local_broker.is_paused
        producer.produce(topic, key=b"k", value=b"during", on_delivery=on_delivery)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            producer.poll(0.1)
        assert [r[0] for r in reports] == [b"before"], "nothing can be acknowledged while the broker is frozen"
    assert not local_broker.is_paused

    assert producer.flush(30) == 0
    assert [(r[0], r[1]) for r in reports] == [(b"before", None), (b"during", None)]
    partition = reports[0][2]
    assert reports[1][2] == partition  # same key, same partition
    stored = [m.value() for m in _read_partition_to_eof(local_broker.bootstrap, topic, partition)]
    assert stored == [b"before", b"during"]


# ------------------------------------------------------------------------------------------
# Ports
# ------------------------------------------------------------------------------------------


def test_taken_port_is_retried_or_reported(
    local_pg: Optional[LocalPostgres], local_broker: Optional[LocalBroker], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A port grabbed between the free-port probe and the server's bind makes start() move on;
    a taken port the caller insisted on is a clear error."""
    if local_pg is None or local_broker is None:
        pytest.skip("needs the local PostgreSQL and broker binaries")
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        picks = iter([taken])
        real_free_port = _service.free_port
        monkeypatch.setattr(_service, "free_port", lambda: next(picks, None) or real_free_port())
        with LocalPostgres() as pg:
            assert pg.port != taken
        picks = iter([taken])
        with LocalBroker() as broker:
            assert broker.port != taken

        with pytest.raises(SandboxError, match="address in use"):
            LocalBroker(port=taken).start()
        with pytest.raises(SandboxError, match="address in use"):
            LocalPostgres(port=taken).start()
