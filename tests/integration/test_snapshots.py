"""Snapshots: the topic starts with the table. Initial and on-demand snapshots under a concurrent
workload, producer crashes in the middle, byte-identical records, keys that never go back in time."""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path
from typing import Any, Dict, List, Optional, Set, Tuple

import orjson
import psycopg2
import pytest

from pgrepl import ConfigError, Consumer, Producer, ReplicationOp
from tests.integration.helpers import (
    Workload, current_wal_lsn, dedupe, execute, make_source, read_topic, running, slot_state, source_rows, start_cli,
    wait_for, wait_streaming,
)

GROUP_SETTINGS = {"session.timeout.ms": 6000, "heartbeat.interval.ms": 1000}
_POSITION = re.compile(rb'"lsn":\d+,"seq_id":\d+')

TYPES_COLUMNS = ("id bigint PRIMARY KEY, i int, b boolean, n numeric(20,6), f float8, t text, ts timestamptz, d date, "
                 "j jsonb, a text[], u uuid, by bytea, iv interval, tm time")
TYPES_ROW = ("SELECT g, g % 1000 - 500, g % 2 = 0, (g * 1.000001)::numeric(20,6), g / 7.0::float8, "
             "E'row \\t' || g || E'\\n\"q\" \\\\ é', '2026-01-01 00:00:00+00'::timestamptz + g * interval '1 minute', "
             "'2026-01-01'::date + (g % 365), jsonb_build_object('g', g, 'tags', jsonb_build_array('a', g)), "
             "ARRAY['x', g::text, NULL], md5(g::text)::uuid, decode(md5(g::text), 'hex'), g * interval '1 second', "
             "'12:00'::time + g * interval '1 second'")


def populate(dsn: str, p: str, src_rows: int, types_rows: int) -> None:
    make_source(dsn, p)
    execute(dsn, f"INSERT INTO {p}src SELECT g, 'g' || (g % 7), 0, repeat('b', g % 40) FROM generate_series(1, {src_rows}) g",
            f"CREATE TABLE {p}types ({TYPES_COLUMNS})", f"ALTER TABLE {p}types REPLICA IDENTITY FULL",
            f"INSERT INTO {p}types {TYPES_ROW} FROM generate_series(1, {types_rows}) g",
            f"ALTER PUBLICATION {p}pub ADD TABLE {p}types", "ANALYZE")


def topic_map(p: str) -> Dict[str, Any]:
    return {f"{p}src": {"name": f"{p}src", "partition_key": ["grp"]},
            f"{p}types": {"name": f"{p}types", "partition_key": ["id"]}}


def check_never_back_in_time(messages: List[Tuple[int, int, Optional[bytes], bytes]]) -> int:
    """Per id, in each partition's order (first occurrences): versions (n) never decrease and nothing
    follows a Delete. Returns how many snapshot Inserts were checked."""
    by_partition: Dict[int, List[Tuple[int, bytes]]] = {}
    for part, offset, _, value in messages:
        by_partition.setdefault(part, []).append((offset, value))
    checked = 0
    for entries in by_partition.values():
        seen: Set[Tuple[int, int]] = set()
        version: Dict[str, int] = {}
        deleted: Set[str] = set()
        for _, value in sorted(entries):
            op = orjson.loads(value)
            position = (op["lsn"], op["seq_id"])
            if position in seen:
                continue
            seen.add(position)
            ((kind, payload),) = op["op"].items()
            row = payload[1] if kind == "Update" else payload
            key = row[0]
            assert key not in deleted, f"id {key}: a record after its Delete"
            if kind == "Delete":
                deleted.add(key)
                continue
            n = int(row[2])
            assert n >= version.get(key, -1), f"id {key}: version {n} after {version[key]}"
            version[key] = n
            checked += kind == "Insert"
    return checked


def sink_equals_source(dsn: str, kafka: str, p: str, topic: str = "src") -> None:
    """Rebuild the table from the topic with the idempotent consumer (upserts) and compare."""
    execute(dsn, f"CREATE TABLE IF NOT EXISTS {p}sink_{topic} (id bigint PRIMARY KEY, grp text, n int, body text)")

    def apply(cur: Any, ops: List[ReplicationOp]) -> None:
        for op in ops:
            if op.op.kind == "Delete":
                cur.execute(f"DELETE FROM {p}sink_{topic} WHERE id = %s", ((op.op.old or ())[0],))
            else:
                cur.execute(f"INSERT INTO {p}sink_{topic} VALUES (%s, %s, %s, %s) ON CONFLICT (id) DO UPDATE SET "
                            "grp = EXCLUDED.grp, n = EXCLUDED.n, body = EXCLUDED.body", op.op.new)

    Consumer(f"{p}sink_{topic}", [f"{p}{topic}"], kafka, dict(GROUP_SETTINGS), stop_at_eof=True,
             handle_signals=False).start_idempotent_batch(apply, dsn)
    conn = psycopg2.connect(dsn)
    with conn.cursor() as cur:
        cur.execute(f"SELECT id::text, grp, n::text, body FROM {p}sink_{topic}")
        sink = {r[0]: tuple(r) for r in cur.fetchall()}
    conn.close()
    source = source_rows(dsn, p)
    assert len(sink) == len(source) and sink == source


def wait_caught_up(dsn: str, p: str, timeout: float = 300) -> None:
    end = current_wal_lsn(dsn)
    wait_for(lambda: (slot_state(dsn, f"{p}slot")[0] or 0) >= end, timeout=timeout, what="the slot to catch up")


def snapshot_values(messages: List[Tuple[int, int, Optional[bytes], bytes]]) -> List[bytes]:
    return [v for _, _, _, v in messages]


# ------------------------------------------------------------------------------------------
# Initial snapshot
# ------------------------------------------------------------------------------------------


def test_initial_snapshot_under_a_workload_rebuilds_the_table(
        pg_dsn: str, kafka_bootstrap: str, name_prefix: str, drop_replication_slot) -> None:
    p = name_prefix
    populate(pg_dsn, p, 150_000, 50_000)
    producer = Producer(pg_dsn, kafka_bootstrap, f"{p}slot", f"{p}pub", topic_map(p), snapshot_chunk_size=5_000)
    workload = Workload(pg_dsn, p, seed=7, first_id=1_000_001, pause=0.002)
    with running(producer):
        wait_streaming(pg_dsn, f"{p}slot")
        workload.start()
        wait_for(lambda: not producer.snapshots.active, timeout=300, what="the initial snapshot")
        workload.finish()
        wait_caught_up(pg_dsn, p)
    drop_replication_slot(f"{p}slot")
    messages = read_topic(kafka_bootstrap, f"{p}src", timeout=120)
    dedupe(messages)
    assert check_never_back_in_time(messages) >= 150_000 - 1000
    sink_equals_source(pg_dsn, kafka_bootstrap, p)
    types = read_topic(kafka_bootstrap, f"{p}types", timeout=60)
    assert len(types) == 50_000 and all(orjson.loads(v)["op"].get("Insert") for _, _, _, v in types)


def test_snapshot_records_are_byte_for_byte_the_streams_inserts(
        pg_dsn: str, kafka_bootstrap: str, name_prefix: str, drop_replication_slot) -> None:
    """Each snapshot record equals the stream's Insert of the same row (value apart from lsn/seq_id,
    key, partition); snapshot records carry the pgrepl.snapshot header, stream records do not."""
    p = name_prefix
    populate(pg_dsn, p, 10, 3_000)
    execute(pg_dsn, f"INSERT INTO {p}types (id) VALUES (0)")  # every other column NULL
    producer = Producer(pg_dsn, kafka_bootstrap, f"{p}slot", f"{p}pub", topic_map(p), snapshot_chunk_size=700)
    with running(producer):
        wait_streaming(pg_dsn, f"{p}slot")
        wait_for(lambda: not producer.snapshots.active, timeout=120, what="the initial snapshot")
        execute(pg_dsn, f"CREATE TABLE {p}keep AS SELECT * FROM {p}types",
                f"BEGIN; DELETE FROM {p}types; INSERT INTO {p}types SELECT * FROM {p}keep; COMMIT")
        wait_caught_up(pg_dsn, p)
    drop_replication_slot(f"{p}slot")
    from confluent_kafka import OFFSET_BEGINNING, Consumer as KafkaConsumer, TopicPartition
    reader = KafkaConsumer({"bootstrap.servers": kafka_bootstrap, "group.id": f"{p}raw", "enable.partition.eof": True})
    topic = f"{p}types"
    partitions = sorted(reader.list_topics(topic, timeout=10).topics[topic].partitions)
    reader.assign([TopicPartition(topic, part, OFFSET_BEGINNING) for part in partitions])
    snapshot: Dict[bytes, Tuple[Optional[bytes], int]] = {}
    stream: Dict[bytes, Tuple[Optional[bytes], int]] = {}
    ends: Set[int] = set()
    while len(ends) < len(partitions):
        msg = reader.poll(1.0)
        if msg is None:
            continue
        if msg.error():
            ends.add(msg.partition())
            continue
        if b'"Insert"' not in msg.value():
            continue
        headers = dict(msg.headers() or [])
        target = snapshot if "pgrepl.snapshot" in headers else stream
        target[_POSITION.sub(b"", msg.value())] = (msg.key(), msg.partition())
    reader.close()
    assert len(snapshot) == 3_001 and snapshot == stream


def test_four_connections_read_every_row_exactly_once(pg_dsn: str, kafka_bootstrap: str, name_prefix: str,
                                                     drop_replication_slot) -> None:
    """Key ranges of a numeric key split in key order (not in the text order of its output, where
    '133748' < '32498'): 120,000 ids across five digit counts, eight ranges, chunks of several COPY
    blocks, every id exactly once and the snapshot's count right."""
    from pgrepl.producer.snapshot.plan import _histogram_bounds, _offset_bounds, plan_table

    p = name_prefix
    make_source(pg_dsn, p)
    execute(pg_dsn, f"INSERT INTO {p}src SELECT g, 'g' || (g % 7), 0, repeat('b', 300) FROM generate_series(1, 120000) g",
            f"ANALYZE {p}src")
    conn = psycopg2.connect(pg_dsn)
    try:
        plan = plan_table(conn, f"{p}pub", "public", f"{p}src", None, 8)
        # both ways to split: the planner's histogram (what plan_table used here) and the
        # offsets in key order (composite keys, tables never analyzed)
        histogram, offsets = _histogram_bounds(conn, plan, 8), _offset_bounds(conn, plan, 8)
    finally:
        conn.close()
    for bounds in (histogram, offsets):
        assert bounds is not None and len(bounds) == 7
        numbers = [int(b[0]) for b in bounds]
        assert numbers == sorted(numbers) and 5_000 < numbers[0] < numbers[-1] < 115_000
    assert [r.upto for r in plan.ranges] == [*(histogram or []), None]
    producer = Producer(pg_dsn, kafka_bootstrap, f"{p}slot", f"{p}pub", {f"{p}src": {"name": f"{p}src"}},
                        snapshot="initial_only", snapshot_connections=4, snapshot_chunk_size=5_000, handle_signals=False)
    producer.start()  # returns once the snapshot is delivered and confirmed
    drop_replication_slot(f"{p}slot")
    assert producer.snapshots.rows == 120_000
    ids = sorted(int(orjson.loads(v)["op"]["Insert"][0]) for _, _, _, v in read_topic(kafka_bootstrap, f"{p}src"))
    assert ids == list(range(1, 120_001))


# ------------------------------------------------------------------------------------------
# On-demand (incremental) snapshots
# ------------------------------------------------------------------------------------------


def test_incremental_snapshot_under_hard_updates_never_goes_back_in_time(
        pg_dsn: str, kafka_bootstrap: str, name_prefix: str, drop_replication_slot) -> None:
    p = name_prefix
    populate(pg_dsn, p, 60_000, 10)
    producer = Producer(pg_dsn, kafka_bootstrap, f"{p}slot", f"{p}pub", topic_map(p), snapshot="never",
                        snapshot_chunk_size=2_000)
    hot = _HotUpdates(pg_dsn, p)
    with running(producer):
        wait_streaming(pg_dsn, f"{p}slot")
        hot.start()
        job = producer.request_snapshot([f"{p}src"])
        wait_for(lambda: producer.snapshots.active, timeout=30, what="the snapshot to start")
        wait_for(lambda: not producer.snapshots.active, timeout=300, what=f"snapshot {job}")
        hot.finish()
        wait_caught_up(pg_dsn, p)
    drop_replication_slot(f"{p}slot")
    messages = read_topic(kafka_bootstrap, f"{p}src", timeout=120)
    assert check_never_back_in_time(messages) >= 50_000
    assert hot.updates > 1000 and hot.deletes > 100
    assert producer.snapshots.stale_rows > 0  # rows changed during their chunk's read came from the stream
    sink_equals_source(pg_dsn, kafka_bootstrap, p)


def test_sql_request_and_a_table_added_to_the_publication_later(
        pg_dsn: str, kafka_bootstrap: str, name_prefix: str, drop_replication_slot) -> None:
    """A table published after the slot exists is backfilled by a snapshot asked for in plain SQL."""
    p = name_prefix
    make_source(pg_dsn, p)
    first = Producer(pg_dsn, kafka_bootstrap, f"{p}slot", f"{p}pub", {f"{p}src": {"name": f"{p}src"}})
    with running(first):
        wait_streaming(pg_dsn, f"{p}slot")
    execute(pg_dsn, f"CREATE TABLE {p}late (id int PRIMARY KEY, v text)", f"ALTER TABLE {p}late REPLICA IDENTITY FULL",
            f"INSERT INTO {p}late SELECT g, 'v' || g FROM generate_series(1, 5000) g",
            f"ALTER PUBLICATION {p}pub ADD TABLE {p}late")
    second = Producer(pg_dsn, kafka_bootstrap, f"{p}slot", f"{p}pub",
                      {f"{p}src": {"name": f"{p}src"}, f"{p}late": {"name": f"{p}late", "partition_key": ["id"]}},
                      metrics_port=0, metrics_host="127.0.0.1")
    with running(second):
        wait_streaming(pg_dsn, f"{p}slot")
        execute(pg_dsn, f"SELECT pg_logical_emit_message(true, 'pgrepl.snapshot', '{{\"tables\": [\"{p}late\"], "
                        "\"where\": \"id > 1000\"}')")
        wait_for(lambda: second.snapshots.rows >= 4000, timeout=120, what="the backfill")
        assert second.metrics is not None
        from tests.integration.test_metrics import scrape, value
        wait_for(lambda: value(scrape(second.metrics.port), "pgrepl_snapshot_rows_total") == 4000, what="the metric")
        wait_for(lambda: not second.snapshots.active, timeout=120, what="the snapshot to finish")
        assert value(scrape(second.metrics.port), "pgrepl_snapshot_running") == 0
    drop_replication_slot(f"{p}slot")
    records = [orjson.loads(v) for _, _, _, v in read_topic(kafka_bootstrap, f"{p}late")]
    assert sorted(int(r["op"]["Insert"][0]) for r in records) == list(range(1001, 5001))


def test_bad_snapshot_requests_say_what_is_wrong(pg_dsn: str, kafka_bootstrap: str, name_prefix: str,
                                                 drop_replication_slot, caplog: pytest.LogCaptureFixture) -> None:
    p = name_prefix
    make_source(pg_dsn, p)
    execute(pg_dsn, f"CREATE TABLE {p}other (id int PRIMARY KEY)")
    producer = Producer(pg_dsn, kafka_bootstrap, f"{p}slot", f"{p}pub", {f"{p}src": {"name": f"{p}src"}},
                        snapshot="never")
    with pytest.raises(ConfigError, match=f"cannot snapshot '{p}other': it is not in publication"):
        producer.request_snapshot([f"{p}other"])
    with pytest.raises(ConfigError, match="snapshot filter for .* is not valid"):
        producer.request_snapshot([f"{p}src"], where="no_such_column > 1")
    with caplog.at_level("ERROR", logger="pgrepl.snapshot"):
        with running(producer):
            wait_streaming(pg_dsn, f"{p}slot")
            execute(pg_dsn, "SELECT pg_logical_emit_message(true, 'pgrepl.snapshot', 'not json')",
                    f"SELECT pg_logical_emit_message(true, 'pgrepl.snapshot', '{{\"tables\": [\"{p}other\"]}}')")
            wait_for(lambda: caplog.text.count("snapshot request") >= 2, timeout=30, what="the two refusals")
            execute(pg_dsn, f"INSERT INTO {p}src VALUES (1, 'a', 0, 'x')")
            wait_for(lambda: producer.stats.records >= 1, what="the stream to go on")
    drop_replication_slot(f"{p}slot")
    assert "its content is not JSON like" in caplog.text and "not in publication" in caplog.text


def test_a_keyless_table_is_snapshotted_in_one_read(pg_dsn: str, kafka_bootstrap: str, name_prefix: str,
                                                   drop_replication_slot, caplog: pytest.LogCaptureFixture) -> None:
    p = name_prefix
    execute(pg_dsn, f"CREATE TABLE {p}log (at int NOT NULL, msg text)", f"ALTER TABLE {p}log REPLICA IDENTITY FULL",
            f"INSERT INTO {p}log SELECT g, 'm' || g FROM generate_series(1, 20000) g",
            f"CREATE PUBLICATION {p}pub FOR TABLE {p}log")
    producer = Producer(pg_dsn, kafka_bootstrap, f"{p}slot", f"{p}pub", {f"{p}log": {"name": f"{p}log"}})
    with caplog.at_level("WARNING", logger="pgrepl.snapshot"):
        with running(producer):
            wait_streaming(pg_dsn, f"{p}slot")
            wait_for(lambda: not producer.snapshots.active, timeout=120, what="the snapshot")
    drop_replication_slot(f"{p}slot")
    assert "has no primary key or unique NOT NULL key: it is snapshotted in one consistent read" in caplog.text
    assert len(read_topic(kafka_bootstrap, f"{p}log")) == 20000


# ------------------------------------------------------------------------------------------
# Crashes mid-snapshot
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["initial", "incremental"])
def test_sigkill_three_times_mid_snapshot_resumes(kind: str, pg_dsn: str, kafka_bootstrap: str, name_prefix: str,
                                                 drop_replication_slot, tmp_path: Path) -> None:
    p = name_prefix
    populate(pg_dsn, p, 400_000, 10)
    config = tmp_path / "producer.json"
    config.write_text(json.dumps({"dsn": pg_dsn, "brokers": kafka_bootstrap, "slot": f"{p}slot", "publication": f"{p}pub",
                                  "topic_map": topic_map(p), "status_interval": 0.2,
                                  "snapshot": "initial" if kind == "initial" else "never", "snapshot_chunk_size": 500}))
    log = tmp_path / "producer.log"
    workload = Workload(pg_dsn, p, seed=17, first_id=1_000_001, pause=0.005)
    process = start_cli(config, log)
    try:
        wait_streaming(pg_dsn, f"{p}slot")
        if kind == "incremental":
            execute(pg_dsn, f"SELECT pg_logical_emit_message(true, 'pgrepl.snapshot', '{{\"tables\": [\"{p}src\"]}}')")
        workload.start()
        for started in range(1, 4):
            # snapshot progress printed by the process started last (the n-th "streaming slot" line is
            # its own: the walsender of a killed one may still be listed, so wait_streaming cannot tell)
            wait_for(lambda: snapshot_progress_of(log, started), timeout=60, interval=0.05,
                     what=f"snapshot progress from producer #{started}")
            assert " done: " not in log.read_text(errors="replace"), "the snapshot finished before the kill"
            process.send_signal(signal.SIGKILL)
            process.wait(10)
            process = start_cli(config, log)
        wait_for(lambda: "streaming slot" in log_of(log, 4), timeout=60, what="producer #4 to stream")
        wait_for(lambda: " done: " in log.read_text(errors="replace"), timeout=300, what="the snapshot to finish")
        workload.finish()
        wait_caught_up(pg_dsn, p)
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0, log.read_text()[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        workload.halt.set()
    drop_replication_slot(f"{p}slot")
    text = log.read_text(errors="replace")
    assert text.count("after a restart") >= 3, text[-3000:]
    messages = read_topic(kafka_bootstrap, f"{p}src", timeout=120)
    check_never_back_in_time(messages)
    sink_equals_source(pg_dsn, kafka_bootstrap, p)


def log_of(log: Path, started: int) -> str:
    """What the ``started``-th producer process wrote to ``log`` (from its 'starting -> ...' role line on)."""
    parts = log.read_text(errors="replace").split(": starting -> ")  # once per process
    return parts[started] if len(parts) > started else ""


def snapshot_progress_of(log: Path, started: int) -> bool:
    """Whether the ``started``-th producer process has streamed and reported snapshot progress."""
    own = log_of(log, started)
    return "streaming slot" in own and "snapshot:" in own.split("streaming slot", 1)[1]


class _HotUpdates(Workload):
    """Updates and deletes that land inside the chunks being read (ids 1..60,000), plus inserts."""

    def __init__(self, dsn: str, p: str) -> None:
        super().__init__(dsn, p, seed=29, first_id=2_000_001)
        self.updates = 0
        self.deletes = 0

    def run(self) -> None:
        try:
            conn = psycopg2.connect(self.dsn)
            with conn.cursor() as cur:
                while not self.halt.is_set():
                    low = self.rng.randint(1, 59_000)
                    cur.execute(f"UPDATE {self.p}src SET n = n + 1, body = body || 'h' WHERE id BETWEEN %s AND %s",
                                (low, low + 20))
                    self.updates += cur.rowcount
                    cur.execute(f"DELETE FROM {self.p}src WHERE id = %s", (self.rng.randint(1, 60_000),))
                    self.deletes += cur.rowcount
                    conn.commit()
            conn.close()
        except BaseException as exc:  # noqa: BLE001 - reported by finish()
            self.error = exc
