"""Producer end to end against real PostgreSQL and a Kafka-protocol broker."""

from __future__ import annotations

import logging
import random
import string
import time
import zlib
from typing import Any, Dict, List, Optional, Tuple

import orjson
import psycopg2
import pytest
from confluent_kafka import Producer as KafkaProducer

from pgrepl import ConfigError, ReplicationOp
from pgrepl.producer import Producer
from tests.integration.helpers import (
    current_wal_lsn, execute, read_topic, running, server_version_num, slot_state, wait_for, wait_streaming,
)

INV_COLUMNS = ["id", "org", "qty", "price", "note", "tags", "payload", "seen", "big"]


def make_tables(dsn: str, p: str) -> None:
    execute(
        dsn,
        f"CREATE TABLE {p}inv (id bigint PRIMARY KEY, org text NOT NULL, qty int, price numeric(12,2), note text,"
        f" tags text[], payload jsonb, seen timestamptz, big text)",
        f"ALTER TABLE {p}inv REPLICA IDENTITY FULL",
        f"ALTER TABLE {p}inv ALTER COLUMN big SET STORAGE EXTERNAL",
        f"CREATE TABLE {p}audit (id serial PRIMARY KEY, msg text NOT NULL)",
        f"ALTER TABLE {p}audit REPLICA IDENTITY FULL",
        f"CREATE PUBLICATION {p}pub FOR TABLE {p}inv, {p}audit",
    )


def rows_text(cur: psycopg2.extensions.cursor, table: str, columns: List[str]) -> Dict[str, Tuple[Optional[str], ...]]:
    cur.execute(f"SELECT {', '.join(c + '::text' for c in columns)} FROM {table} ORDER BY id")
    return {row[0]: tuple(row) for row in cur.fetchall()}


def diff_ops(before: Dict, after: Dict, key_column: int = 1) -> List[Tuple[str, Optional[tuple], Optional[tuple]]]:
    """The records a single-statement transaction makes, in id order (as PostgreSQL scans them): an
    update that changes the partition key (column ``key_column``) is a Delete plus an Insert."""
    ops: List[Tuple[str, Optional[tuple], Optional[tuple]]] = []
    for key in sorted(set(before) | set(after), key=int):
        old, new = before.get(key), after.get(key)
        if old is None and new is not None:
            ops.append(("Insert", None, new))
        elif old is not None and new is None:
            ops.append(("Delete", old, None))
        elif old is not None and new is not None and old != new:
            if old[key_column] != new[key_column]:
                ops += [("Delete", old, None), ("Insert", None, new)]
            else:
                ops.append(("Update", old, new))
    return ops


def as_op(record: Dict) -> Tuple[str, Optional[tuple], Optional[tuple]]:
    ((kind, payload),) = record["op"].items()
    if kind == "Insert":
        return kind, None, tuple(payload)
    if kind == "Delete":
        return kind, tuple(payload), None
    return kind, tuple(payload[0]), tuple(payload[1])


@pytest.mark.smoke
def test_inserts_updates_deletes_across_tables_and_topics(pg_dsn: str, kafka_bootstrap: str, name_prefix: str,
                                                          drop_replication_slot) -> None:
    p = name_prefix
    make_tables(pg_dsn, p)
    inv_topic, audit_topic = f"{p}inv_t", f"{p}audit_t"
    producer = Producer(pg_dsn, kafka_bootstrap, f"{p}slot", f"{p}pub", {
        f"{p}inv": {"name": inv_topic, "partition_key": ["org"]},
        f"{p}audit": {"name": audit_topic},
    })
    big = "".join(random.Random(7).choice(string.ascii_letters) for _ in range(30_000))
    expected_inv: List[Tuple[str, Optional[tuple], Optional[tuple]]] = []
    conn = psycopg2.connect(pg_dsn)
    try:
        with running(producer):
            wait_streaming(pg_dsn, f"{p}slot")
            with conn.cursor() as cur:
                statements = [
                    (f"INSERT INTO {p}inv VALUES (1, 'org-a', 5, 12.50, 'quote \" backslash \\ newline \n tab \t ctrl \x01 é€😀',"
                     " '{a,\"b c\",NULL}', '{\"k\": [1, 2, {\"x\": null}]}', '2026-11-24 01:02:03.456789+00', %s),"
                     " (2, 'org-b', NULL, NULL, '', NULL, 'null', NULL, 'small'),"
                     " (3, 'org-a', 0, -1.5, NULL, '{}', '[]', 'infinity', NULL)", (big,)),
                    (f"UPDATE {p}inv SET qty = qty + 1 WHERE id = 1", None),  # big stays TOASTed and unchanged
                    (f"UPDATE {p}inv SET org = 'org-c', note = 'moved' WHERE id = 2", None),
                    (f"DELETE FROM {p}inv WHERE id = 3", None),
                ]
                for sql, params in statements:
                    before = rows_text(cur, f"{p}inv", INV_COLUMNS)
                    cur.execute(sql, params)
                    conn.commit()
                    expected_inv += diff_ops(before, rows_text(cur, f"{p}inv", INV_COLUMNS))
                # one transaction over both tables
                before = rows_text(cur, f"{p}inv", INV_COLUMNS)
                cur.execute(f"INSERT INTO {p}inv (id, org) VALUES (4, 'org-d')")
                cur.execute(f"INSERT INTO {p}audit (msg) VALUES ('first'), ('second')")
                cur.execute(f"UPDATE {p}audit SET msg = 'changed' WHERE msg = 'first'")
                conn.commit()
                expected_inv += diff_ops(before, rows_text(cur, f"{p}inv", INV_COLUMNS))
                end = current_wal_lsn(pg_dsn)
            wait_for(lambda: (slot_state(pg_dsn, f"{p}slot")[0] or 0) >= end, what="the slot to confirm the workload")
    finally:
        conn.close()
    drop_replication_slot(f"{p}slot")

    inv = read_topic(kafka_bootstrap, inv_topic)
    audit = read_topic(kafka_bootstrap, audit_topic)
    records = sorted((orjson.loads(v) for _, _, _, v in inv), key=lambda r: (r["lsn"], r["seq_id"]))
    assert [as_op(r) for r in records] == expected_inv
    assert all(r["table_name"] == f"{p}inv" and r["col_names"] == INV_COLUMNS for r in records)
    # the unchanged TOASTed value is filled in from the old row
    first_update = next(r for r in records if "Update" in r["op"])
    assert first_update["op"]["Update"][0][0] == "1" and first_update["op"]["Update"][1][-1] == big
    # keys: the partition-key value of the new row (old row for deletes), on the CRC-32 partition
    partitions = len(KafkaProducer({"bootstrap.servers": kafka_bootstrap}).list_topics(inv_topic, timeout=10)
                     .topics[inv_topic].partitions)
    for part, _, key, value in inv:
        op = as_op(orjson.loads(value))
        row = op[2] if op[2] is not None else op[1]
        assert key == row[1].encode()
        assert part == zlib.crc32(key) % partitions
    # every record parses back into a ReplicationOp that re-serializes to the same bytes
    for _, _, _, value in inv + audit:
        assert ReplicationOp.from_json(value).to_json() == value
    # the multi-table transaction: one lsn, seq_ids 0.. across both topics, in statement order
    last_lsn = records[-1]["lsn"]
    audit_ops = sorted((orjson.loads(v) for _, _, _, v in audit), key=lambda r: r["seq_id"])
    assert [r["lsn"] for r in audit_ops] == [last_lsn] * 3
    assert records[-1]["seq_id"] == 0 and [r["seq_id"] for r in audit_ops] == [1, 2, 3]
    assert [as_op(r)[0] for r in audit_ops] == ["Insert", "Insert", "Update"]
    assert all(k is None for _, _, k, _ in audit)
    # positions strictly increase in WAL order and are unique
    positions = [(r["lsn"], r["seq_id"]) for r in records]
    assert positions == sorted(set(positions))


def test_marker_delivery_proves_earlier_records_of_its_partition(kafka_bootstrap: str, name_prefix: str) -> None:
    """The design relies on it: one delivery report for the last record proves the ones before it."""
    topic = f"{name_prefix}proof"
    kafka = KafkaProducer({"bootstrap.servers": kafka_bootstrap, "enable.idempotence": True, "acks": "all",
                           "linger.ms": 20, "batch.num.messages": 100})
    kafka.list_topics(topic, timeout=10)
    delivered: List[int] = []
    for i in range(5000):
        cb = (lambda err, msg: delivered.append(msg.offset())) if i == 4999 else None
        kafka.produce(topic, b"%d" % i, None, 0, on_delivery=cb) if cb else kafka.produce(topic, b"%d" % i, None, 0)
    wait_for(lambda: kafka.poll(0.1) is not None and bool(delivered), what="the marker's delivery report")
    values = [v for part, _, _, v in read_topic(kafka_bootstrap, topic) if part == 0]
    assert values == [b"%d" % i for i in range(5000)]
    kafka.flush(10)


@pytest.fixture
def published(pg_dsn: str, name_prefix: str) -> str:
    p = name_prefix
    execute(pg_dsn,
            f"CREATE TABLE {p}t (id int PRIMARY KEY, org text NOT NULL, maybe text)",
            f"ALTER TABLE {p}t REPLICA IDENTITY FULL",
            f"CREATE PUBLICATION {p}pub FOR TABLE {p}t")
    return p


@pytest.mark.parametrize("case, fragment", [
    ("missing_publication", "publication 'PREFIXnope' does not exist; create it"),
    ("unpublished_topic_table", "topic-map tables ['PREFIXother'] are not in publication"),
    ("unmapped_published_table", "table public.PREFIXt2 is in publication 'PREFIXpub' but not in the topic map"),
    ("missing_key_column", "partition-key column 'nope' does not exist in table public.PREFIXt"),
    ("nullable_key_column", "partition-key column 'maybe' of table public.PREFIXt is nullable; make it NOT NULL"),
    ("replica_identity", 'needs the full old row for updates and deletes; run: ALTER TABLE "public"."PREFIXt" REPLICA IDENTITY FULL'),
    ("generated_key_column", "partition-key column 'gen' of table public.PREFIXt is not published"),
    ("key_left_out_of_column_list", "partition-key column 'org' of table public.PREFIXt is not published"),
])
@pytest.mark.smoke
def test_preflight_failures_say_what_to_change(pg_dsn: str, kafka_bootstrap: str, published: str, case: str,
                                               fragment: str) -> None:
    p = published
    topic_map: Dict = {f"{p}t": {"name": f"{p}topic", "partition_key": ["org"]}}
    publication = f"{p}pub"
    if case == "missing_publication":
        publication = f"{p}nope"
    elif case == "unpublished_topic_table":
        execute(pg_dsn, f"CREATE TABLE {p}other (id int)")
        topic_map[f"{p}other"] = {"name": f"{p}other"}
    elif case == "unmapped_published_table":
        execute(pg_dsn, f"CREATE TABLE {p}t2 (id int)", f"ALTER PUBLICATION {p}pub ADD TABLE {p}t2")
    elif case == "missing_key_column":
        topic_map[f"{p}t"]["partition_key"] = ["nope"]
    elif case == "nullable_key_column":
        topic_map[f"{p}t"]["partition_key"] = ["maybe"]
    elif case == "replica_identity":
        execute(pg_dsn, f"ALTER TABLE {p}t REPLICA IDENTITY DEFAULT")
    elif case == "generated_key_column":  # pgoutput sends none before PostgreSQL 18 (and only on request there)
        execute(pg_dsn, f"ALTER TABLE {p}t ADD COLUMN gen text NOT NULL GENERATED ALWAYS AS (org || '!') STORED")
        topic_map[f"{p}t"]["partition_key"] = ["gen"]
    elif case == "key_left_out_of_column_list":  # column lists: PostgreSQL 15+
        if server_version_num(pg_dsn) < 150000:
            pytest.skip("publication column lists need PostgreSQL 15+")
        execute(pg_dsn, f"ALTER PUBLICATION {p}pub SET TABLE {p}t (id, maybe)")
    producer = Producer(pg_dsn, kafka_bootstrap, f"{p}slot", publication, topic_map, handle_signals=False)
    with pytest.raises(ConfigError) as info:
        producer.start()
    assert fragment.replace("PREFIX", p) in str(info.value)


@pytest.mark.smoke
def test_publication_without_updates_or_deletes_needs_no_replica_identity(
        pg_dsn: str, kafka_bootstrap: str, name_prefix: str, drop_replication_slot) -> None:
    p = name_prefix
    execute(pg_dsn, f"CREATE TABLE {p}t (id int PRIMARY KEY)", f"CREATE PUBLICATION {p}pub FOR TABLE {p}t WITH (publish = 'insert')")
    producer = Producer(pg_dsn, kafka_bootstrap, f"{p}slot", f"{p}pub", {f"{p}t": {"name": f"{p}t"}})
    with running(producer):
        wait_streaming(pg_dsn, f"{p}slot")
        execute(pg_dsn, f"INSERT INTO {p}t VALUES (1), (2)")
        wait_for(lambda: producer.stats.records == 2, what="two records")
    drop_replication_slot(f"{p}slot")


@pytest.mark.parametrize("slot", ["Upper", "has-dash", "x" * 64, "", "a;drop table x"])
def test_bad_slot_names_are_config_errors(slot: str) -> None:
    with pytest.raises(ConfigError, match="invalid replication slot name"):
        Producer("dbname=x", "localhost:9092", slot, "pub", {"t": {"name": "t"}})


def test_kafka_config_cannot_weaken_guarantees() -> None:
    with pytest.raises(ConfigError, match="enable.idempotence"):
        Producer("dbname=x", "localhost:9092", "s", "pub", {"t": {"name": "t"}}, kafka_config={"enable.idempotence": False})


def test_hostile_publication_name_is_quoted(pg_dsn: str, kafka_bootstrap: str, name_prefix: str,
                                            drop_replication_slot) -> None:
    p = name_prefix
    hostile = f"{p}Pub'; DROP TABLE x; --\""
    execute(pg_dsn, f"CREATE TABLE {p}t (id int PRIMARY KEY)", f"ALTER TABLE {p}t REPLICA IDENTITY FULL",
            f"CREATE PUBLICATION {psycopg2.extensions.quote_ident(hostile, psycopg2.connect(pg_dsn))} FOR TABLE {p}t")
    producer = Producer(pg_dsn, kafka_bootstrap, f"{p}slot", hostile, {f"{p}t": {"name": f"{p}t"}})
    try:
        with running(producer):
            wait_streaming(pg_dsn, f"{p}slot")
            execute(pg_dsn, f"INSERT INTO {p}t VALUES (1)")
            wait_for(lambda: producer.stats.records == 1, what="the record")
    finally:
        execute(pg_dsn, f"DROP PUBLICATION IF EXISTS {psycopg2.extensions.quote_ident(hostile, psycopg2.connect(pg_dsn))}")
    drop_replication_slot(f"{p}slot")


@pytest.mark.smoke
def test_idle_publication_on_busy_database_advances_the_slot(pg_dsn: str, kafka_bootstrap: str, name_prefix: str,
                                                             drop_replication_slot) -> None:
    p = name_prefix
    execute(pg_dsn, f"CREATE TABLE {p}quiet (id int PRIMARY KEY)", f"ALTER TABLE {p}quiet REPLICA IDENTITY FULL",
            f"CREATE PUBLICATION {p}pub FOR TABLE {p}quiet", f"CREATE TABLE {p}busy (id int, filler text)")
    producer = Producer(pg_dsn, kafka_bootstrap, f"{p}slot", f"{p}pub", {f"{p}quiet": {"name": f"{p}quiet"}})
    with running(producer):
        wait_streaming(pg_dsn, f"{p}slot")
        start, _ = slot_state(pg_dsn, f"{p}slot")
        for i in range(20):
            execute(pg_dsn, f"INSERT INTO {p}busy SELECT g, repeat('x', 200) FROM generate_series(1, 500) g")
        target = current_wal_lsn(pg_dsn)
        wait_for(lambda: (slot_state(pg_dsn, f"{p}slot")[0] or 0) >= target, timeout=60,
                 what="the idle slot to follow the busy database's WAL")
        assert producer.stats.records == 0
        assert (slot_state(pg_dsn, f"{p}slot")[0] or 0) > (start or 0)
    drop_replication_slot(f"{p}slot")


def _hold_slot(dsn: str, p: str, application_name: str) -> Any:
    """A replication connection streaming from ``{p}slot`` under ``application_name``."""
    holder = psycopg2.connect(dsn, connection_factory=psycopg2.extras.LogicalReplicationConnection,
                              application_name=application_name)
    holder.cursor().start_replication(slot_name=f"{p}slot", decode=False,
                                      options={"proto_version": "1", "publication_names": f"{p}pub"})
    wait_for(lambda: slot_state(dsn, f"{p}slot")[1] is not None, what="the slot's holder")
    return holder


@pytest.mark.smoke
def test_a_holder_that_is_not_pgrepl_is_waited_for_never_terminated(
        pg_dsn: str, kafka_bootstrap: str, name_prefix: str, drop_replication_slot, caplog: pytest.LogCaptureFixture) -> None:
    p = name_prefix
    execute(pg_dsn, f"CREATE TABLE {p}t (id int PRIMARY KEY)", f"ALTER TABLE {p}t REPLICA IDENTITY FULL",
            f"CREATE PUBLICATION {p}pub FOR TABLE {p}t")
    execute(pg_dsn, f"SELECT pg_create_logical_replication_slot('{p}slot', 'pgoutput')")
    other = _hold_slot(pg_dsn, p, "someone-elses-tool")
    holder_pid = slot_state(pg_dsn, f"{p}slot")[1]
    producer = Producer(pg_dsn, kafka_bootstrap, f"{p}slot", f"{p}pub", {f"{p}t": {"name": f"{p}t"}})
    with caplog.at_level(logging.WARNING, logger="pgrepl"):
        with running(producer):
            execute(pg_dsn, f"INSERT INTO {p}t VALUES (1)")
            wait_for(lambda: "(someone-elses-tool); waiting for it to be released" in caplog.text, what="the warning")
            time.sleep(6)  # longer than the grace a leaseless pgrepl holder gets
            assert slot_state(pg_dsn, f"{p}slot")[1] == holder_pid and producer.stats.records == 0
            other.close()  # the holder goes: the producer takes the slot and streams
            wait_for(lambda: producer.stats.records == 1, what="the record")
    drop_replication_slot(f"{p}slot")


def test_a_pgrepl_holder_without_the_lease_is_terminated(
        pg_dsn: str, kafka_bootstrap: str, name_prefix: str, drop_replication_slot, caplog: pytest.LogCaptureFixture) -> None:
    """A walsender of another pgrepl producer that does not hold the lease (dead, or cut off) is ended."""
    p = name_prefix
    execute(pg_dsn, f"CREATE TABLE {p}t (id int PRIMARY KEY)", f"ALTER TABLE {p}t REPLICA IDENTITY FULL",
            f"CREATE PUBLICATION {p}pub FOR TABLE {p}t")
    execute(pg_dsn, f"SELECT pg_create_logical_replication_slot('{p}slot', 'pgoutput')")
    stale = _hold_slot(pg_dsn, p, "pgrepl/0123456789abcdef")
    producer = Producer(pg_dsn, kafka_bootstrap, f"{p}slot", f"{p}pub", {f"{p}t": {"name": f"{p}t"}})
    with caplog.at_level(logging.WARNING, logger="pgrepl"):
        with running(producer):
            execute(pg_dsn, f"INSERT INTO {p}t VALUES (1)")
            wait_for(lambda: producer.stats.records == 1, what="the record")
    assert "of pgrepl/0123456789abcdef, which does not hold the lease" in caplog.text
    stale.close()
    drop_replication_slot(f"{p}slot")


def test_unreachable_broker_is_retried_with_a_clear_message(pg_dsn: str, name_prefix: str, drop_replication_slot,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    p = name_prefix
    execute(pg_dsn, f"CREATE TABLE {p}t (id int PRIMARY KEY)", f"ALTER TABLE {p}t REPLICA IDENTITY FULL",
            f"CREATE PUBLICATION {p}pub FOR TABLE {p}t")
    producer = Producer(pg_dsn, "127.0.0.1:1", f"{p}slot", f"{p}pub", {f"{p}t": {"name": f"{p}t"}})
    with caplog.at_level(logging.WARNING, logger="pgrepl"):
        with running(producer):
            wait_for(lambda: "cannot reach Kafka at 127.0.0.1:1" in caplog.text, timeout=40, what="the warning")
    drop_replication_slot(f"{p}slot")


@pytest.mark.smoke
def test_wal_level_replica_is_a_config_error(local_pg, kafka_bootstrap: str) -> None:
    if local_pg is None:
        pytest.skip("needs the local sandbox (starts a second server with wal_level=replica)")
    from pgrepl.testing import LocalPostgres

    with LocalPostgres(settings={"wal_level": "replica"}) as replica:
        producer = Producer(replica.dsn, kafka_bootstrap, "slot_x", "pub", {"t": {"name": "t"}}, handle_signals=False)
        with pytest.raises(ConfigError, match="wal_level is 'replica'; set wal_level = logical"):
            producer.start()


def test_bad_password_is_a_config_error_without_the_password(pg_dsn: str, kafka_bootstrap: str) -> None:
    dsn = "postgresql://nosuchuser:s3cr3t-pw@" + pg_dsn.split("@", 1)[1] if "@" in pg_dsn else pg_dsn
    producer = Producer(dsn, kafka_bootstrap, "slot_x", "pub", {"t": {"name": "t"}}, handle_signals=False)
    with pytest.raises(ConfigError) as info:
        producer.start()
    assert "cannot connect to PostgreSQL" in str(info.value)
    assert "s3cr3t-pw" not in str(info.value)


def test_truncate_stops_before_the_slot_passes_it_and_skip_goes_on(
        pg_dsn: str, kafka_bootstrap: str, name_prefix: str, drop_replication_slot) -> None:
    from pgrepl import ReplicationError

    p = name_prefix
    execute(pg_dsn, f"CREATE TABLE {p}t (id int PRIMARY KEY)", f"ALTER TABLE {p}t REPLICA IDENTITY FULL",
            f"CREATE PUBLICATION {p}pub FOR TABLE {p}t")
    topic_map = {f"{p}t": {"name": f"{p}t"}}
    execute(pg_dsn, f"SELECT pg_create_logical_replication_slot('{p}slot', 'pgoutput')")
    execute(pg_dsn, f"INSERT INTO {p}t VALUES (1), (2)")
    before_truncate = current_wal_lsn(pg_dsn)
    execute(pg_dsn, f"TRUNCATE {p}t", f"INSERT INTO {p}t VALUES (3)")
    producer = Producer(pg_dsn, kafka_bootstrap, f"{p}slot", f"{p}pub", topic_map, handle_signals=False)
    with pytest.raises(ReplicationError, match=f"TRUNCATE of public.{p}t"):
        producer.start()
    confirmed, _ = slot_state(pg_dsn, f"{p}slot")
    assert confirmed is not None and confirmed <= before_truncate
    assert producer.stats.records == 2  # the inserts before the truncate were produced (and confirmed)
    # the same stream with truncate='skip' passes over it
    skipping = Producer(pg_dsn, kafka_bootstrap, f"{p}slot", f"{p}pub", topic_map, truncate="skip")
    with running(skipping):
        wait_for(lambda: skipping.stats.records == 1, what="the insert after the truncate")
    values = sorted(orjson.loads(v)["op"]["Insert"][0] for _, _, _, v in read_topic(kafka_bootstrap, f"{p}t"))
    assert values == ["1", "2", "3"]
    drop_replication_slot(f"{p}slot")


def test_asyncio_entry_point_and_cancellation(pg_dsn: str, kafka_bootstrap: str, name_prefix: str,
                                              drop_replication_slot) -> None:
    import asyncio

    p = name_prefix
    execute(pg_dsn, f"CREATE TABLE {p}t (id int PRIMARY KEY)", f"ALTER TABLE {p}t REPLICA IDENTITY FULL",
            f"CREATE PUBLICATION {p}pub FOR TABLE {p}t")
    producer = Producer(pg_dsn, kafka_bootstrap, f"{p}slot", f"{p}pub", {f"{p}t": {"name": f"{p}t"}})

    async def scenario() -> None:
        task = asyncio.ensure_future(producer.run())
        while producer.stats.sessions == 0:
            await asyncio.sleep(0.05)
        await asyncio.get_running_loop().run_in_executor(None, execute, pg_dsn, f"INSERT INTO {p}t VALUES (1)")
        while producer.stats.records < 1:
            await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(asyncio.wait_for(scenario(), 60))
    assert producer.stopping and producer.stats.records == 1
    drop_replication_slot(f"{p}slot")


@pytest.mark.smoke
def test_partitions_of_a_partitioned_table_need_replica_identity_full(
        pg_dsn: str, kafka_bootstrap: str, name_prefix: str) -> None:
    p = name_prefix
    execute(pg_dsn,
            f"CREATE TABLE {p}parted (id int NOT NULL, org text NOT NULL) PARTITION BY RANGE (id)",
            f"CREATE TABLE {p}part1 PARTITION OF {p}parted FOR VALUES FROM (0) TO (100)",
            f"CREATE TABLE {p}part2 PARTITION OF {p}parted FOR VALUES FROM (100) TO (200)",
            f"ALTER TABLE {p}parted REPLICA IDENTITY FULL",
            f"ALTER TABLE {p}part1 REPLICA IDENTITY FULL",
            f"CREATE PUBLICATION {p}pub FOR TABLE {p}parted WITH (publish_via_partition_root = true)")
    producer = Producer(pg_dsn, kafka_bootstrap, f"{p}slot", f"{p}pub", {f"{p}parted": {"name": f"{p}t"}},
                        handle_signals=False)
    with pytest.raises(ConfigError, match=f"partitions \\['public.{p}part2'\\] of table public.{p}parted"):
        producer.start()
