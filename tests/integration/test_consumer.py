"""Consumer against a real broker and PostgreSQL: end to end with the producer, exactly once under
SIGKILL and an offsets reset, two members handing partitions over, retries, dead letters, the CLI.

Consumers here use ``session.timeout.ms=6000`` (Kafka's minimum): on tansu a join takes half the
session timeout, so the default would make every test wait (see ``pgrepl.consumer``'s notes).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import orjson
import psycopg2
import psycopg2.extras
import pytest
from confluent_kafka import KafkaError, KafkaException, TopicPartition
from confluent_kafka import Consumer as KafkaConsumer
from confluent_kafka import Producer as KafkaProducer
from confluent_kafka.admin import AdminClient, NewTopic
from psycopg2 import sql

from pgrepl import Consumer, HandlerError
from pgrepl.lsn import format_lsn
from pgrepl.topic_reader import read_to_end
from pgrepl.model import Op, ReplicationOp
from pgrepl.producer import Producer
from tests.integration.helpers import (
    Workload, current_wal_lsn, dedupe, execute, make_source, read_topic, running, slot_state, wait_for,
    wait_streaming,
)

PROJECT_ROOT = Path(__file__).resolve().parents[2]
KAFKA = {"session.timeout.ms": 6000, "heartbeat.interval.ms": 1000}
PARTITIONS = 4


# ------------------------------------------------------------------------------------------
# Source, sink, topics
# ------------------------------------------------------------------------------------------


def create_topic(bootstrap: str, name: str, partitions: int = PARTITIONS) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap, "logger": logging.getLogger("admin")})
    for future in admin.create_topics([NewTopic(name, partitions, 1)], operation_timeout=15).values():
        future.result(30)
    wait_for(lambda: len(admin.list_topics(name, timeout=5).topics[name].partitions) == partitions, timeout=15,
             what=f"topic {name}")


def produce(bootstrap: str, topic: str, records: Sequence[Tuple[Optional[bytes], bytes]],
            partition: Optional[int] = None) -> None:
    producer = KafkaProducer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 5})
    for key, value in records:
        if partition is None:
            producer.produce(topic, value, key)
        else:
            producer.produce(topic, value, key, partition)
    assert producer.flush(30) == 0


def make_sink(dsn: str, p: str) -> None:
    execute(dsn,
            f"CREATE TABLE {p}dst (id bigint PRIMARY KEY, grp text NOT NULL, n int NOT NULL, body text)",
            # one row per applied op: a second application of an op shows as a duplicate here
            f"CREATE TABLE {p}applied (lsn numeric NOT NULL, seq_id bigint NOT NULL)")


def apply_ops(cur: Any, ops: Sequence[ReplicationOp], p: str) -> None:
    """Sink handler: replay row changes on ``{p}dst`` (keyed by the first column) and count them."""
    dst = sql.Identifier(f"{p}dst")
    for op in ops:
        cols = sql.SQL(", ").join(map(sql.Identifier, op.col_names))
        if op.op.kind == "Insert":
            cur.execute(sql.SQL("INSERT INTO {} ({}) VALUES ({})").format(
                dst, cols, sql.SQL(", ").join(sql.Placeholder() * len(op.col_names))), op.op.new)
        elif op.op.kind == "Update":
            sets = sql.SQL(", ").join(sql.SQL("{} = %s").format(sql.Identifier(c)) for c in op.col_names)
            cur.execute(sql.SQL("UPDATE {} SET {} WHERE {} = %s").format(dst, sets, sql.Identifier(op.col_names[0])),
                        (*op.op.new, op.op.old[0]))  # type: ignore[index, misc]
            assert cur.rowcount == 1, f"update of a missing row: {op}"
        else:
            cur.execute(sql.SQL("DELETE FROM {} WHERE {} = %s").format(dst, sql.Identifier(op.col_names[0])),
                        (op.op.old[0],))  # type: ignore[index]
            assert cur.rowcount == 1, f"delete of a missing row: {op}"
    psycopg2.extras.execute_values(cur, sql.SQL("INSERT INTO {} VALUES %s").format(sql.Identifier(f"{p}applied")),
                                   [(op.lsn, op.seq_id) for op in ops])


def count_ops(cur: Any, ops: Sequence[ReplicationOp], p: str) -> None:
    """Sink handler that only counts (synthetic ops)."""
    psycopg2.extras.execute_values(cur, sql.SQL("INSERT INTO {} VALUES %s").format(sql.Identifier(f"{p}applied")),
                                   [(op.lsn, op.seq_id) for op in ops])


def query(dsn: str, statement: str) -> List[Tuple[Any, ...]]:
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute(statement)
            return cur.fetchall()
    finally:
        conn.close()


def applied(dsn: str, p: str) -> Tuple[int, int]:
    """(ops applied, distinct positions applied)."""
    count, distinct = query(dsn, f"SELECT count(*), count(DISTINCT (lsn, seq_id)) FROM {p}applied")[0]
    return count, distinct


def rows(dsn: str, table: str) -> Dict[str, Tuple[Any, ...]]:
    return {r[0]: r for r in query(dsn, f"SELECT id::text, grp, n::text, body FROM {table}")}


class Background:
    """``start(consumer)`` in a thread; ``stop()`` stops it and re-raises its error."""

    def __init__(self, consumer: Consumer, start: Callable[[Consumer], None]) -> None:
        self.consumer = consumer
        self.errors: List[BaseException] = []
        consumer.handle_signals = False
        self.thread = threading.Thread(target=self._target, args=(start,), daemon=True)
        self.thread.start()

    def _target(self, start: Callable[[Consumer], None]) -> None:
        try:
            start(self.consumer)
        except BaseException as exc:  # noqa: BLE001 - reported to the test thread
            self.errors.append(exc)

    def stop(self) -> None:
        self.consumer.stop()
        self.thread.join(60)
        assert not self.thread.is_alive(), "consumer did not stop within 60 s"
        if self.errors:
            raise self.errors[0]


@contextlib.contextmanager
def consuming(consumer: Consumer, start: Callable[[Consumer], None]) -> Iterator[Consumer]:
    """Run ``start(consumer)`` in a thread for the block; stop it after and re-raise its error."""
    background = Background(consumer, start)
    try:
        yield consumer
    finally:
        background.stop()


def reset_offsets(bootstrap: str, group: str, topic: str, partitions: int, timeout: float = 30.0) -> None:
    """Commit offset 0 on every partition for ``group``, as ``kafka-consumer-groups --reset-offsets`` does.

    The group must be empty: a static member (``group.instance.id``) stays in it after closing
    until its session times out, and until then the broker refuses the commit (UNKNOWN_MEMBER_ID).
    """
    kc = KafkaConsumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                kc.commit(offsets=[TopicPartition(topic, p, 0) for p in range(partitions)], asynchronous=False)
                break
            except KafkaException as exc:
                if time.monotonic() > deadline or exc.args[0].code() not in (
                        KafkaError.UNKNOWN_MEMBER_ID, KafkaError.REBALANCE_IN_PROGRESS, KafkaError.ILLEGAL_GENERATION):
                    raise
                time.sleep(0.5)
        committed = kc.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)
        assert [tp.offset for tp in committed] == [0] * partitions
    finally:
        kc.close()


def read_with_headers(bootstrap: str, topic: str, timeout: float = 30.0) -> List[Tuple[bytes, Dict[str, bytes]]]:
    """(value, headers) of every record of a one-partition topic, read to partition EOF."""
    kc = KafkaConsumer({"bootstrap.servers": bootstrap, "group.id": f"hdr-{time.monotonic_ns()}",
                        "enable.auto.commit": False, "enable.partition.eof": True})
    try:
        return [(msg.value(), dict(msg.headers() or [])) for msg in read_to_end(kc, topic, [0], timeout)]
    finally:
        kc.close()


def synthetic(lsn_base: int, count: int, start: int = 0) -> List[Tuple[bytes, bytes]]:
    """(key, value) of ``count`` Insert ops with increasing positions, keys spread over partitions."""
    out = []
    for i in range(start, start + count):
        op = ReplicationOp("t", ["id", "v"], lsn_base + i // 3, i % 3, Op.insert([str(i), f"v{i}"]))
        out.append((str(i % 16).encode(), op.to_json()))
    return out


# ------------------------------------------------------------------------------------------
# The SIGKILL test's consumer process: python -m tests.integration.test_consumer ...
# ------------------------------------------------------------------------------------------


def _sink_main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser()
    for name in ("--dsn", "--brokers", "--topic", "--group", "--prefix"):
        parser.add_argument(name, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s [{os.getpid()}] %(levelname)s %(name)s: %(message)s")
    # commit seldom: each kill leaves applied-but-uncommitted ops for the next process to skip
    config = dict(KAFKA, **{"auto.commit.interval.ms": 3000})
    consumer = Consumer(args.group, [args.topic], args.brokers, config, batch_size=20,
                        state_table=f"{args.prefix}state", status_interval=2)

    def handle(cur: Any, ops: List[ReplicationOp]) -> None:
        apply_ops(cur, ops, args.prefix)
        time.sleep(0.005)  # keep a backlog, so kills land mid-stream

    consumer.start_idempotent_batch(handle, args.dsn)
    return 0


def _spawn_sink(dsn: str, bootstrap: str, topic: str, group: str, p: str, log: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")])))
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "tests.integration.test_consumer", "--dsn", dsn, "--brokers", bootstrap,
             "--topic", topic, "--group", group, "--prefix", p],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=str(PROJECT_ROOT))


# ------------------------------------------------------------------------------------------
# Tests
# ------------------------------------------------------------------------------------------


@pytest.mark.smoke
def test_end_to_end_producer_to_idempotent_sink(pg_dsn: str, kafka_bootstrap: str, name_prefix: str,
                                                drop_replication_slot: Callable[[str], bool]) -> None:
    p = name_prefix
    make_source(pg_dsn, p)
    make_sink(pg_dsn, p)
    topic = f"{p}src"
    create_topic(kafka_bootstrap, topic)
    producer = Producer(pg_dsn, kafka_bootstrap, f"{p}slot", f"{p}pub", {f"{p}src": {"name": topic, "partition_key": ["grp"]}})
    # two workers: partitions are applied in parallel, each on its own sink connection
    consumer = Consumer(f"{p}grp", [topic], kafka_bootstrap, KAFKA, state_table=f"{p}state", workers=2)
    with running(producer):
        wait_streaming(pg_dsn, f"{p}slot")
        with consuming(consumer, lambda c: c.start_idempotent(lambda cur, op: apply_ops(cur, [op], p), pg_dsn)):
            workload = Workload(pg_dsn, p, max_ops=2500)
            workload.start()
            workload.join(60)
            workload.finish()
            end = current_wal_lsn(pg_dsn)
            wait_for(lambda: (slot_state(pg_dsn, f"{p}slot")[0] or 0) >= end, timeout=60, what="the slot to catch up")
            expected = len(dedupe(read_topic(kafka_bootstrap, topic)))
            assert expected == workload.ops
            wait_for(lambda: applied(pg_dsn, p)[1] >= expected, timeout=60, what=f"{expected} ops in the sink")
    drop_replication_slot(f"{p}slot")
    assert applied(pg_dsn, p) == (expected, expected)
    assert rows(pg_dsn, f"{p}dst") == rows(pg_dsn, f"{p}src")
    assert consumer.stats.handled == expected and consumer.stats.transactions == expected
    state = query(pg_dsn, f"SELECT group_id, topic, partition, lsn::text, seq_id FROM {p}state")
    assert state and all(r[0] == f"{p}grp" and r[1] == topic for r in state)


def test_sigkill_and_offsets_reset_apply_every_op_exactly_once(
        pg_dsn: str, kafka_bootstrap: str, name_prefix: str, drop_replication_slot: Callable[[str], bool],
        tmp_path: Path) -> None:
    p = name_prefix
    make_source(pg_dsn, p)
    make_sink(pg_dsn, p)
    topic, group = f"{p}src", f"{p}grp"
    create_topic(kafka_bootstrap, topic)
    log = tmp_path / "consumer.log"
    producer = Producer(pg_dsn, kafka_bootstrap, f"{p}slot", f"{p}pub", {f"{p}src": {"name": topic, "partition_key": ["grp"]}})
    rng = random.Random(7)
    kills = 0
    process = _spawn_sink(pg_dsn, kafka_bootstrap, topic, group, p, log)
    try:
        with running(producer):
            wait_streaming(pg_dsn, f"{p}slot")
            workload = Workload(pg_dsn, p, seed=3, pause=0.05, max_rows=8)
            workload.start()
            for _ in range(3):
                before = applied(pg_dsn, p)[0]
                wait_for(lambda: applied(pg_dsn, p)[0] > before + 20, timeout=60, what="the consumer to apply ops")
                time.sleep(rng.uniform(0.2, 1.0))
                process.send_signal(signal.SIGKILL)
                process.wait(10)
                kills += 1
                process = _spawn_sink(pg_dsn, kafka_bootstrap, topic, group, p, log)
            workload.finish()
            end = current_wal_lsn(pg_dsn)
            wait_for(lambda: (slot_state(pg_dsn, f"{p}slot")[0] or 0) >= end, timeout=60, what="the slot to catch up")
        drop_replication_slot(f"{p}slot")
        messages = read_topic(kafka_bootstrap, topic)
        expected = len(dedupe(messages))
        assert expected == workload.ops
        wait_for(lambda: applied(pg_dsn, p)[1] >= expected, timeout=90, what=f"{expected} ops in the sink")
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0, log.read_text()[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    assert kills == 3
    assert applied(pg_dsn, p) == (expected, expected), "an op was applied twice (or lost)"
    assert rows(pg_dsn, f"{p}dst") == rows(pg_dsn, f"{p}src")

    # Rewind the group to the beginning: every record comes again and the state skips it.
    reset_offsets(kafka_bootstrap, group, topic, PARTITIONS)
    consumer = Consumer(group, [topic], kafka_bootstrap, KAFKA, batch_size=20, state_table=f"{p}state")
    with consuming(consumer, lambda c: c.start_idempotent_batch(lambda cur, ops: apply_ops(cur, ops, p), pg_dsn)):
        wait_for(lambda: consumer.stats.handled + consumer.stats.skipped >= len(messages), timeout=60,
                 what=f"{len(messages)} records replayed")
    assert consumer.stats.handled == 0 and consumer.stats.skipped == len(messages)
    assert applied(pg_dsn, p) == (expected, expected)
    assert rows(pg_dsn, f"{p}dst") == rows(pg_dsn, f"{p}src")


def test_two_members_share_partitions_and_hand_over(pg_dsn: str, kafka_bootstrap: str, name_prefix: str) -> None:
    p = name_prefix
    execute(pg_dsn, f"CREATE TABLE {p}applied (lsn numeric NOT NULL, seq_id bigint NOT NULL)")
    topic, group = f"{p}ops", f"{p}grp"
    create_topic(kafka_bootstrap, topic)
    produce(kafka_bootstrap, topic, synthetic(1000, 1500))
    handed: Dict[str, int] = {"a": 0, "b": 0}

    def handler(name: str) -> Callable[[Any, List[ReplicationOp]], None]:
        def handle(cur: Any, ops: List[ReplicationOp]) -> None:
            count_ops(cur, ops, p)
            handed[name] += len(ops)
            time.sleep(0.05)  # slow: the rebalance finds work in flight
        return handle

    a = Consumer(group, [topic], kafka_bootstrap, KAFKA, batch_size=20, state_table=f"{p}state")
    b = Consumer(group, [topic], kafka_bootstrap, KAFKA, batch_size=20, state_table=f"{p}state")
    run_a = Background(a, lambda c: c.start_idempotent_batch(handler("a"), pg_dsn))
    run_b: Optional[Background] = None
    try:
        wait_for(lambda: handed["a"] > 100, timeout=30, what="member a to apply ops")
        # b joins while a is busy: a's partitions are revoked with its batch in flight
        run_b = Background(b, lambda c: c.start_idempotent_batch(handler("b"), pg_dsn))
        wait_for(lambda: a.assignment and b.assignment and handed["b"] > 0, timeout=30,
                 what="both members to hold partitions")
        assert len(a.assignment) + len(b.assignment) == PARTITIONS
        assert not set(a.assignment) & set(b.assignment)
        assert applied(pg_dsn, p)[1] < 1500, "too late: a and b should still have work"
        run_a.stop()  # b takes a's partitions over, including whatever a had not committed
        produce(kafka_bootstrap, topic, synthetic(1000, 500, start=1500))
        wait_for(lambda: applied(pg_dsn, p)[1] >= 2000, timeout=60, what="all 2000 ops applied")
        assert len(b.assignment) == PARTITIONS
    finally:
        a.stop()
        run_a.thread.join(60)
        if run_b is not None:
            run_b.stop()
    assert applied(pg_dsn, p) == (2000, 2000)
    assert handed["a"] + handed["b"] == 2000, f"an op was handed to a handler twice: {handed}"
    assert a.stats.handled + b.stats.handled == 2000


def test_failing_handler_is_retried_in_order_under_asyncio(kafka_bootstrap: str, name_prefix: str,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    topic = f"{name_prefix}ops"
    create_topic(kafka_bootstrap, topic, 1)
    produce(kafka_bootstrap, topic, synthetic(5000, 20), partition=0)
    fails = {7: 2}
    seen: List[int] = []
    consumer = Consumer(f"{name_prefix}grp", [topic], kafka_bootstrap, KAFKA, retry_backoff=0.1)

    async def handle(op: ReplicationOp) -> None:
        await asyncio.sleep(0)
        index = int(op.op.new[0])  # type: ignore[index]
        if fails.get(index, 0):
            fails[index] -= 1
            raise ConnectionError("downstream unavailable")
        seen.append(index)

    async def main() -> None:
        task = asyncio.create_task(consumer.run_basic(handle))
        deadline = time.monotonic() + 30
        while len(seen) < 20 and time.monotonic() < deadline and not task.done():
            await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    with caplog.at_level(logging.ERROR, logger="pgrepl.consumer"):
        asyncio.run(main())
    assert seen == list(range(20))
    assert consumer.stats.failures == 2 and consumer.stats.handled == 20
    retries = [r.getMessage() for r in caplog.records if "handler failed" in r.getMessage()]
    assert len(retries) == 2
    where = f"{topic}[0]@7 (op lsn {format_lsn(5000 + 7 // 3)}, seq_id 1)"
    assert all(where in m and "ConnectionError" in m for m in retries), retries


def test_dead_letter_policy_and_the_cli(kafka_bootstrap: str, name_prefix: str, tmp_path: Path) -> None:
    topic, dlq = f"{name_prefix}ops", f"{name_prefix}dlq"
    create_topic(kafka_bootstrap, topic, 1)
    create_topic(kafka_bootstrap, dlq, 1)
    records = synthetic(9000, 30)
    poison = ReplicationOp("t", ["id", "v"], 9000 + 10 // 3, 10 % 3, Op.insert(["10", "poison"])).to_json()
    records[10] = (b"k", poison)
    records[20] = (b"k", b'{"table_name":"t","not":"an op"}')
    produce(kafka_bootstrap, topic, records, partition=0)
    seen: List[int] = []

    def handle_batch(ops: List[ReplicationOp]) -> None:
        if any(op.op.new[1] == "poison" for op in ops):  # type: ignore[index]
            raise ValueError("cannot apply this row")
        seen.extend(int(op.op.new[0]) for op in ops)  # type: ignore[index]

    consumer = Consumer(f"{name_prefix}grp", [topic], kafka_bootstrap, KAFKA, on_error="dead_letter",
                        dead_letter_topic=dlq, max_attempts=2, batch_size=8, retry_backoff=0.05)
    with consuming(consumer, lambda c: c.start_basic_batch(handle_batch)):
        wait_for(lambda: len(seen) >= 28 and consumer.stats.dead_lettered >= 2, timeout=30, what="28 ops and 2 dead letters")
    assert seen == [i for i in range(30) if i not in (10, 20)]
    dead = read_with_headers(kafka_bootstrap, dlq)
    assert [value for value, _ in dead] == [poison, records[20][1]]
    assert [h["pgrepl.source.offset"] for _, h in dead] == [b"10", b"20"]
    assert [h["pgrepl.kind"] for _, h in dead] == [b"handler", b"malformed"]
    assert b"ValueError: cannot apply this row" in dead[0][1]["pgrepl.error"]
    assert all(h["pgrepl.source.topic"] == topic.encode() for _, h in dead)

    # The CLI prints ops as JSON lines and stops, with the location, at the record that is not one.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")])))
    cli = subprocess.run(
        [sys.executable, "-m", "pgrepl.cli", "consume", "--brokers", kafka_bootstrap, "--topics", topic,
         "--group", f"{name_prefix}cli", "--until-eof", "--no-commit", "--kafka", "session.timeout.ms=6000", "--meta"],
        capture_output=True, env=env, timeout=60)
    assert cli.returncode == 1, cli.stderr.decode()[-2000:]
    lines = [orjson.loads(line) for line in cli.stdout.splitlines()]
    assert [(d["topic"], d["partition"], d["offset"]) for d in lines] == [(topic, 0, i) for i in range(20)]
    assert [orjson.dumps(d["op"]) for d in lines] == [value for _, value in records[:20]]
    assert f"{topic}[0]@20 is not a ReplicationOp" in cli.stderr.decode()

    clean = f"{name_prefix}clean"
    create_topic(kafka_bootstrap, clean, 2)
    produce(kafka_bootstrap, clean, synthetic(100, 50))
    cli = subprocess.run(
        [sys.executable, "-m", "pgrepl.cli", "consume", "--brokers", kafka_bootstrap, "--topics", clean,
         "--group", f"{name_prefix}cli", "--until-eof", "--kafka", "session.timeout.ms=6000"],
        capture_output=True, env=env, timeout=60)
    assert cli.returncode == 0, cli.stderr.decode()[-2000:]
    assert sorted(cli.stdout.splitlines()) == sorted(value for _, value in synthetic(100, 50))


def test_stop_policy_raises_handler_error(kafka_bootstrap: str, name_prefix: str) -> None:
    topic = f"{name_prefix}ops"
    create_topic(kafka_bootstrap, topic, 1)
    produce(kafka_bootstrap, topic, synthetic(700, 10), partition=0)
    consumer = Consumer(f"{name_prefix}grp", [topic], kafka_bootstrap, KAFKA, on_error="stop", max_attempts=2,
                        retry_backoff=0.05, handle_signals=False)

    def handle(op: ReplicationOp) -> None:
        if op.op.new[0] == "4":  # type: ignore[index]
            raise KeyError("missing parent row")

    with pytest.raises(HandlerError) as info:
        consumer.start_basic(handle)
    error = info.value
    assert (error.topic, error.partition, error.offset, error.seq_id) == (topic, 0, 4, 1)
    assert isinstance(error.__cause__, KeyError) and consumer.stats.handled == 4
    # the offsets of the ops before it were committed: a new member resumes at the failing op
    kc = KafkaConsumer({"bootstrap.servers": kafka_bootstrap, "group.id": f"{name_prefix}grp"})
    try:
        assert kc.committed([TopicPartition(topic, 0)], timeout=10)[0].offset == 4
    finally:
        kc.close()


if __name__ == "__main__":
    sys.exit(_sink_main(sys.argv[1:]))
