"""Production safety: producers share a slot through a lease, a lost slot is never silently recreated,
placement is stable across replays, key changes keep the sink equal to the source, and the
idempotent consumer waits out its sink's outages instead of blaming the records."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import orjson
import psycopg2
import psycopg2.errors
import pytest

from pgrepl import Consumer, Producer, ReplicationOp, SlotLostError
from pgrepl.testing import LocalPostgres
from tests.integration.helpers import (
    Workload, check_order_per_key, current_wal_lsn, dedupe, execute, make_source, read_topic, replay, running,
    slot_state, source_rows, start_cli, wait_for, wait_streaming,
)

GROUP_SETTINGS = {"session.timeout.ms": 6000, "heartbeat.interval.ms": 1000}
_INSTANCE = re.compile(r"producer ([0-9a-f]{16}) for slot")


def producer_config(tmp_path: Path, dsn: str, brokers: str, p: str, partition_key: List[str]) -> Path:
    config = tmp_path / "producer.json"
    config.write_text(json.dumps({"dsn": dsn, "brokers": brokers, "slot": f"{p}slot", "publication": f"{p}pub",
                                  "topic_map": {f"{p}src": {"name": f"{p}src", "partition_key": partition_key}},
                                  "status_interval": 2}))
    return config


def slot_holder(dsn: str, slot: str) -> Optional[str]:
    """The application_name of the walsender streaming from ``slot`` (``pgrepl/<instance>``), or None."""
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT a.application_name FROM pg_replication_slots s JOIN pg_stat_activity a "
                        "ON a.pid = s.active_pid WHERE s.slot_name = %s", (slot,))
            row = cur.fetchone()
    finally:
        conn.close()
    return row[0] if row else None


def instance_of(log: Path) -> Optional[str]:
    match = _INSTANCE.search(log.read_text(errors="replace")) if log.exists() else None
    return match.group(1) if match else None


# ------------------------------------------------------------------------------------------
# One active producer, the others standing by
# ------------------------------------------------------------------------------------------


def test_three_producers_share_a_slot_and_take_over_after_each_sigkill(
        pg_dsn: str, kafka_bootstrap: str, name_prefix: str, drop_replication_slot, tmp_path: Path) -> None:
    p = name_prefix
    make_source(pg_dsn, p)
    config = producer_config(tmp_path, pg_dsn, kafka_bootstrap, p, ["grp"])
    procs: Dict[str, Tuple[subprocess.Popen, Path]] = {}  # instance -> (process, log)
    counter = [0]

    def start_one() -> None:
        counter[0] += 1
        log = tmp_path / f"producer{counter[0]}.log"
        proc = start_cli(config, log)
        wait_for(lambda: instance_of(log) is not None, what="the producer to log its instance")
        procs[instance_of(log) or ""] = (proc, log)

    workload = Workload(pg_dsn, p, seed=12)
    takeovers: List[float] = []
    try:
        for _ in range(3):
            start_one()
        wait_streaming(pg_dsn, f"{p}slot")
        workload.start()
        for _ in range(5):
            time.sleep(2.0)
            holder = slot_holder(pg_dsn, f"{p}slot")
            assert holder is not None and holder.startswith("pgrepl/"), holder
            active = holder.split("/")[1]
            standbys = [i for i, (proc, _) in procs.items() if i != active and proc.poll() is None]
            assert len(standbys) == 2, f"active {active}, standbys {standbys}"
            killed_at = time.monotonic()
            procs[active][0].send_signal(signal.SIGKILL)
            procs[active][0].wait(10)
            wait_for(lambda: (slot_holder(pg_dsn, f"{p}slot") or "").split("/")[-1] in standbys, timeout=30,
                     interval=0.05, what="a standby to take over")
            takeovers.append(time.monotonic() - killed_at)
            del procs[active]
            start_one()  # three producers again
        workload.finish()
        end = current_wal_lsn(pg_dsn)
        wait_for(lambda: (slot_state(pg_dsn, f"{p}slot")[0] or 0) >= end, timeout=120, what="the slot to catch up")
    finally:
        workload.halt.set()
        for proc, _ in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc, log in procs.values():
            try:
                assert proc.wait(60) == 0, log.read_text()[-3000:]
            finally:
                if proc.poll() is None:
                    proc.kill()
    drop_replication_slot(f"{p}slot")
    logs = "".join(path.read_text(errors="replace") for path in tmp_path.glob("producer*.log"))
    assert "terminating it" not in logs, "a producer terminated another one's walsender"
    print(f"takeover after SIGKILL: {', '.join(f'{t:.2f}' for t in takeovers)} s")
    assert max(takeovers) < 10, takeovers
    messages = read_topic(kafka_bootstrap, f"{p}src", timeout=60)
    final = dedupe(messages)  # every duplicate is an exact replay
    assert len(final) == workload.ops
    assert replay(final) == source_rows(pg_dsn, p)
    check_order_per_key(messages)


# ------------------------------------------------------------------------------------------
# A lost slot stops the producer; it is never recreated silently
# ------------------------------------------------------------------------------------------


def test_a_slot_dropped_while_stopped_is_refused_with_the_last_position(
        pg_dsn: str, kafka_bootstrap: str, name_prefix: str, drop_replication_slot) -> None:
    p = name_prefix
    make_source(pg_dsn, p)
    topic_map = {f"{p}src": {"name": f"{p}src", "partition_key": ["grp"]}}
    with running(Producer(pg_dsn, kafka_bootstrap, f"{p}slot", f"{p}pub", topic_map)) as producer:
        wait_streaming(pg_dsn, f"{p}slot")
        execute(pg_dsn, f"INSERT INTO {p}src VALUES (1, 'a', 0, 'x')")
        wait_for(lambda: producer.stats.records == 1, what="the record")
    confirmed = slot_state(pg_dsn, f"{p}slot")[0]
    assert drop_replication_slot(f"{p}slot")
    again = Producer(pg_dsn, kafka_bootstrap, f"{p}slot", f"{p}pub", topic_map)
    again.handle_signals = False
    with pytest.raises(SlotLostError) as info:
        again.start()
    message = str(info.value)
    assert f"replication slot {p}slot is missing" in message and "pgrepl slot forget" in message
    assert info.value.confirmed_lsn is not None and info.value.confirmed_lsn <= (confirmed or 0)
    assert slot_state(pg_dsn, f"{p}slot") == (None, None), "the slot was recreated"


def test_a_producer_stopped_as_its_slot_was_created_still_snapshots(
        pg_dsn: str, kafka_bootstrap: str, name_prefix: str, drop_replication_slot,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The slot history (with the initial snapshot's plan) is written before the slot is created: a
    producer that dies right after creating it must not leave a slot whose stream starts without the table."""
    p = name_prefix
    make_source(pg_dsn, p)
    execute(pg_dsn, f"INSERT INTO {p}src SELECT g, 'g', 0, 'x' FROM generate_series(1, 500) g")
    topic_map = {f"{p}src": {"name": f"{p}src", "partition_key": ["grp"]}}

    from pgrepl.producer import session
    create_slot = session.create_slot

    def dies(*args: Any, **kwargs: Any) -> None:
        create_slot(*args, **kwargs)
        raise SystemExit("killed right after the slot was created")

    monkeypatch.setattr(session, "create_slot", dies)
    first = Producer(pg_dsn, kafka_bootstrap, f"{p}slot", f"{p}pub", topic_map)
    first.handle_signals = False
    with pytest.raises(SystemExit):
        first.start()
    assert slot_state(pg_dsn, f"{p}slot") != (None, None)
    monkeypatch.undo()
    again = Producer(pg_dsn, kafka_bootstrap, f"{p}slot", f"{p}pub", topic_map)
    with running(again):
        wait_streaming(pg_dsn, f"{p}slot")
        wait_for(lambda: not again.snapshots.active and again.snapshots.rows == 500, what="the snapshot")
    drop_replication_slot(f"{p}slot")
    assert len(dedupe(read_topic(kafka_bootstrap, f"{p}src"))) == 500


def test_a_slot_dropped_while_streaming_stops_the_producer(
        pg_dsn: str, kafka_bootstrap: str, name_prefix: str, drop_replication_slot) -> None:
    p = name_prefix
    make_source(pg_dsn, p)
    producer = Producer(pg_dsn, kafka_bootstrap, f"{p}slot", f"{p}pub",
                        {f"{p}src": {"name": f"{p}src", "partition_key": ["grp"]}}, max_backoff=1,
                        handle_signals=False)
    errors: List[BaseException] = []
    thread = threading.Thread(target=lambda: _run(producer.start, errors), daemon=True)
    thread.start()
    try:
        wait_streaming(pg_dsn, f"{p}slot")
        execute(pg_dsn, f"INSERT INTO {p}src VALUES (1, 'a', 0, 'x')")
        wait_for(lambda: producer.stats.records == 1, what="the record")
        conn = psycopg2.connect(pg_dsn)
        conn.autocommit = True
        with conn.cursor() as cur:  # what an operator's drop looks like: terminate the walsender, drop
            deadline = time.monotonic() + 20
            while True:
                cur.execute("SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
                            "WHERE slot_name = %s AND active_pid IS NOT NULL", (f"{p}slot",))
                try:
                    cur.execute("SELECT pg_drop_replication_slot(%s)", (f"{p}slot",))
                    break
                except psycopg2.errors.ObjectInUse:
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
        conn.close()
        thread.join(60)
    finally:
        producer.stop()
        thread.join(60)
    assert len(errors) == 1 and isinstance(errors[0], SlotLostError), errors
    assert "is missing" in str(errors[0])
    assert slot_state(pg_dsn, f"{p}slot") == (None, None), "the slot was recreated"


def test_an_invalidated_slot_stops_the_producer(local_pg: Optional[LocalPostgres], pg_dsn: str, kafka_bootstrap: str,
                                                name_prefix: str, drop_replication_slot) -> None:
    """wal_status 'lost' (max_slot_wal_keep_size exceeded while the producer was away) is final."""
    if local_pg is None:
        pytest.skip("changes max_slot_wal_keep_size on the server")
    p = name_prefix
    make_source(pg_dsn, p)
    topic_map = {f"{p}src": {"name": f"{p}src", "partition_key": ["grp"]}}
    with running(Producer(pg_dsn, kafka_bootstrap, f"{p}slot", f"{p}pub", topic_map)):
        wait_streaming(pg_dsn, f"{p}slot")
    try:
        execute(pg_dsn, "ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'", "SELECT pg_reload_conf()")
        for _ in range(8):  # write and switch WAL segments until the slot loses what it needed
            execute(pg_dsn, f"INSERT INTO {p}src SELECT g, 'x', 0, repeat('w', 1000) FROM generate_series("
                            f"(SELECT coalesce(max(id), 0) + 1 FROM {p}src), (SELECT coalesce(max(id), 0) + 2000 FROM {p}src)) g",
                    "SELECT pg_switch_wal()", "CHECKPOINT")
        wait_for(lambda: _wal_status(pg_dsn, f"{p}slot") == "lost", timeout=30, what="wal_status lost")
        producer = Producer(pg_dsn, kafka_bootstrap, f"{p}slot", f"{p}pub", topic_map)
        producer.handle_signals = False
        with pytest.raises(SlotLostError, match="invalidated"):
            producer.start()
    finally:
        execute(pg_dsn, "ALTER SYSTEM RESET max_slot_wal_keep_size", "SELECT pg_reload_conf()")
    drop_replication_slot(f"{p}slot")


def _wal_status(dsn: str, slot: str) -> Optional[str]:
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT wal_status FROM pg_replication_slots WHERE slot_name = %s", (slot,))
            row = cur.fetchone()
            return row[0] if row else None
    finally:
        conn.close()


# ------------------------------------------------------------------------------------------
# Placement and key changes
# ------------------------------------------------------------------------------------------


def test_keyless_records_replay_into_the_same_partitions(
        pg_dsn: str, kafka_bootstrap: str, name_prefix: str, drop_replication_slot, tmp_path: Path) -> None:
    p = name_prefix
    make_source(pg_dsn, p)
    config = producer_config(tmp_path, pg_dsn, kafka_bootstrap, p, [])
    log = tmp_path / "producer.log"
    workload = Workload(pg_dsn, p, seed=21)
    process = start_cli(config, log)
    try:
        wait_streaming(pg_dsn, f"{p}slot")
        workload.start()
        for _ in range(2):
            time.sleep(2.5)
            process.send_signal(signal.SIGKILL)
            process.wait(10)
            process = start_cli(config, log)
            wait_streaming(pg_dsn, f"{p}slot")
        workload.finish()
        end = current_wal_lsn(pg_dsn)
        wait_for(lambda: (slot_state(pg_dsn, f"{p}slot")[0] or 0) >= end, timeout=120, what="the slot to catch up")
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
    finally:
        if process.poll() is None:
            process.kill()
        workload.halt.set()
    drop_replication_slot(f"{p}slot")
    messages = read_topic(kafka_bootstrap, f"{p}src", timeout=60)
    placement: Dict[Tuple[int, int], int] = {}
    for part, _, key, value in messages:
        op = orjson.loads(value)
        position = (op["lsn"], op["seq_id"])
        assert key is None
        assert placement.setdefault(position, part) == part, f"{position} in partitions {placement[position]} and {part}"
    assert len(set(placement.values())) == 1  # a table's keyless records share one partition, in WAL order
    final = dedupe(messages)
    assert len(final) == workload.ops and replay(final) == source_rows(pg_dsn, p)
    print(f"{len(messages) - len(final)} replayed keyless records, all in their first partition")


def test_key_changes_under_a_consumer_catch_up_keep_the_sink_equal_to_the_source(
        pg_dsn: str, kafka_bootstrap: str, name_prefix: str, drop_replication_slot) -> None:
    """Rows move between partition keys while the consumer is stopped; it then catches up partition by
    partition (partitions interleave freely) and the sink, keyed by (key, id), equals the source."""
    p = name_prefix
    make_source(pg_dsn, p)
    execute(pg_dsn, f"CREATE TABLE {p}sink (grp text NOT NULL, id bigint NOT NULL, n int, body text, "
                    "PRIMARY KEY (grp, id))")
    producer = Producer(pg_dsn, kafka_bootstrap, f"{p}slot", f"{p}pub",
                        {f"{p}src": {"name": f"{p}src", "partition_key": ["grp"]}})
    workload = Workload(pg_dsn, p, seed=33, max_ops=3000, move_keys=True)
    with running(producer):
        wait_streaming(pg_dsn, f"{p}slot")
        workload.start()
        workload.join(120)
        workload.finish()
        end = current_wal_lsn(pg_dsn)
        wait_for(lambda: (slot_state(pg_dsn, f"{p}slot")[0] or 0) >= end, timeout=120, what="the slot to catch up")
    drop_replication_slot(f"{p}slot")
    moved = sum(1 for _, _, _, v in read_topic(kafka_bootstrap, f"{p}src") if b'"Delete"' in v)
    assert moved > 0

    def apply(cur: Any, ops: List[ReplicationOp]) -> None:
        for op in ops:
            if op.op.kind == "Delete":
                old = op.op.old or ()
                cur.execute(f"DELETE FROM {p}sink WHERE grp = %s AND id = %s", (old[1], old[0]))
            else:
                new = op.op.new or ()
                cur.execute(f"INSERT INTO {p}sink VALUES (%s, %s, %s, %s) ON CONFLICT (grp, id) DO UPDATE "
                            "SET n = EXCLUDED.n, body = EXCLUDED.body", (new[1], new[0], new[2], new[3]))

    consumer = Consumer(f"{p}group", [f"{p}src"], kafka_bootstrap, dict(GROUP_SETTINGS), stop_at_eof=True,
                        batch_size=7, poll_batch=50, handle_signals=False)  # small batches: partitions interleave
    consumer.start_idempotent_batch(apply, pg_dsn)
    conn = psycopg2.connect(pg_dsn)
    with conn.cursor() as cur:
        cur.execute(f"SELECT id::text, grp, n::text, body FROM {p}sink")
        sink = {r[0]: tuple(r) for r in cur.fetchall()}
    conn.close()
    assert sink == source_rows(pg_dsn, p)


# ------------------------------------------------------------------------------------------
# The idempotent consumer waits out its sink
# ------------------------------------------------------------------------------------------


def test_a_sink_down_for_20_seconds_loses_and_dead_letters_nothing(
        pg_dsn: str, kafka_bootstrap: str, name_prefix: str, drop_replication_slot) -> None:
    p = name_prefix
    make_source(pg_dsn, p)
    producer = Producer(pg_dsn, kafka_bootstrap, f"{p}slot", f"{p}pub",
                        {f"{p}src": {"name": f"{p}src", "partition_key": ["grp"]}})
    workload = Workload(pg_dsn, p, seed=44, max_ops=4000)
    with running(producer):
        wait_streaming(pg_dsn, f"{p}slot")
        workload.start()
        workload.join(120)
        workload.finish()
        end = current_wal_lsn(pg_dsn)
        wait_for(lambda: (slot_state(pg_dsn, f"{p}slot")[0] or 0) >= end, timeout=120, what="the slot to catch up")
    drop_replication_slot(f"{p}slot")

    with LocalPostgres() as sink_pg:
        execute(sink_pg.dsn, "CREATE TABLE sink (id bigint PRIMARY KEY, grp text, n int, body text)")
        applied = [0]

        def apply(cur: Any, ops: List[ReplicationOp]) -> None:
            for op in ops:
                if op.op.kind == "Delete":
                    cur.execute("DELETE FROM sink WHERE id = %s", ((op.op.old or ())[0],))
                else:
                    new = op.op.new or ()
                    cur.execute("INSERT INTO sink VALUES (%s, %s, %s, %s) ON CONFLICT (id) DO UPDATE SET grp = "
                                "EXCLUDED.grp, n = EXCLUDED.n, body = EXCLUDED.body", new)
            applied[0] += len(ops)
            time.sleep(0.02)  # slow enough that the outage lands mid-stream

        consumer = Consumer(f"{p}group", [f"{p}src"], kafka_bootstrap, dict(GROUP_SETTINGS), stop_at_eof=True,
                            on_error="dead_letter", dead_letter_topic=f"{p}dlq", max_attempts=1, batch_size=20,
                            retry_backoff=0.2, max_backoff=2.0, handle_signals=False)
        errors: List[BaseException] = []
        thread = threading.Thread(target=lambda: _run(lambda: consumer.start_idempotent_batch(apply, sink_pg.dsn), errors))
        thread.start()
        wait_for(lambda: applied[0] >= 200, timeout=60, what="the consumer to apply some ops")
        sink_pg.stop(keep_data=True)
        time.sleep(20)
        sink_pg.start()
        thread.join(180)
        assert not thread.is_alive() and not errors, errors
        assert consumer.stats.dead_lettered == 0 and consumer.stats.sink_outages > 0
        conn = psycopg2.connect(sink_pg.dsn)
        with conn.cursor() as cur:
            cur.execute("SELECT id::text, grp, n::text, body FROM sink")
            sink = {r[0]: tuple(r) for r in cur.fetchall()}
        conn.close()
    assert sink == source_rows(pg_dsn, p)
    assert read_topic(kafka_bootstrap, f"{p}dlq") == []


def _run(target: Any, errors: List[BaseException]) -> None:
    try:
        target()
    except BaseException as exc:  # noqa: BLE001 - reported to the test
        errors.append(exc)


def test_on_slot_loss_resnapshot_recreates_the_slot_with_a_snapshot(
        pg_dsn: str, kafka_bootstrap: str, name_prefix: str, drop_replication_slot) -> None:
    """The explicit way out of a lost slot: a new slot and a snapshot, so the topic holds the table again."""
    p = name_prefix
    make_source(pg_dsn, p)
    topic_map = {f"{p}src": {"name": f"{p}src", "partition_key": ["grp"]}}
    with running(Producer(pg_dsn, kafka_bootstrap, f"{p}slot", f"{p}pub", topic_map)) as producer:
        wait_streaming(pg_dsn, f"{p}slot")
        execute(pg_dsn, f"INSERT INTO {p}src SELECT g, 'g', 0, 'x' FROM generate_series(1, 100) g")
        wait_for(lambda: producer.stats.records == 100, what="the records")
    assert drop_replication_slot(f"{p}slot")
    # changes made while there is no slot: a plain restart would lose them
    execute(pg_dsn, f"UPDATE {p}src SET n = 1 WHERE id <= 50", f"DELETE FROM {p}src WHERE id > 90")
    again = Producer(pg_dsn, kafka_bootstrap, f"{p}slot", f"{p}pub", topic_map, on_slot_loss="resnapshot")
    with running(again):
        wait_streaming(pg_dsn, f"{p}slot")
        wait_for(lambda: again.snapshots.rows == 90 and not again.snapshots.active, what="the snapshot")
    drop_replication_slot(f"{p}slot")
    latest: Dict[str, Any] = {}
    for _, value in sorted(dedupe(read_topic(kafka_bootstrap, f"{p}src")).items()):
        ((kind, payload),) = orjson.loads(value)["op"].items()
        row = payload[1] if kind == "Update" else payload
        latest[row[0]] = None if kind == "Delete" else tuple(row)
    # every current row is on the topic again in its current version ...
    assert {k: v for k, v in latest.items() if int(k) <= 90} == source_rows(pg_dsn, p)
    # ... but rows deleted while there was no slot have no Delete record (documented: rebuild sinks
    # from the new snapshot, whose records carry the pgrepl.snapshot header)
    assert all(latest[str(i)] is not None for i in range(91, 101))


# ------------------------------------------------------------------------------------------
# Failover (PostgreSQL 17: failover slots)
# ------------------------------------------------------------------------------------------


def test_failover_to_the_promoted_standby_continues_without_a_gap(
        kafka_bootstrap: str, name_prefix: str) -> None:
    """A producer on a multi-host DSN (target_session_attrs=read-write) streams from a PostgreSQL 17 primary;
    its slot is a failover slot, synchronized to the standby. The primary dies mid-workload, the standby
    is promoted, and the producer goes on from the synchronized slot: every change the new primary
    has is on Kafka, none missing (the replay check fails on a gap), duplicates only exact replays."""
    import os

    from pgrepl.testing.pg_binaries import INSTALL_HINT, packaged_install

    if packaged_install(17) is None and not os.environ.get("CI"):  # CI installs it: there it fails instead
        pytest.skip("PostgreSQL 17 is not installed: " + INSTALL_HINT.format(major=17))
    p = name_prefix
    with LocalPostgres(version=17) as primary:
        make_source(primary.dsn, p)
        with primary.start_standby() as standby:
            dsn = (f"host=127.0.0.1,127.0.0.1 port={primary.port},{standby.port} dbname=postgres user=postgres "
                   "target_session_attrs=read-write")
            producer = Producer(dsn, kafka_bootstrap, f"{p}slot", f"{p}pub",
                                {f"{p}src": {"name": f"{p}src", "partition_key": ["grp"]}}, max_backoff=1)
            with running(producer):
                wait_streaming(primary.dsn, f"{p}slot")

                def synced() -> bool:
                    primary.query("SELECT pg_log_standby_snapshot()")  # lets the synced copy become persistent
                    return standby.query("SELECT synced, failover FROM pg_replication_slots WHERE slot_name = %s",
                                         (f"{p}slot",)) == [(True, True)]

                wait_for(synced, timeout=60, interval=0.5, what="the failover slot on the standby")
                before = Workload(primary.dsn, p, seed=51)
                before.start()
                time.sleep(3)
                primary.stop()  # the primary dies under the workload
                before.halt.set()
                before.join(30)  # its last transaction may have failed with the server: that is the point
                standby.promote()
                after = Workload(standby.dsn, p, seed=52, first_id=5_000_000)
                after.start()
                time.sleep(3)
                after.finish()
                end = current_wal_lsn(standby.dsn)
                wait_for(lambda: (slot_state(standby.dsn, f"{p}slot")[0] or 0) >= end, timeout=120,
                         what="the producer to catch up on the promoted standby")
                assert producer.stats.sessions >= 2 and after.ops > 0 and before.ops > 0
            final = dedupe(read_topic(kafka_bootstrap, f"{p}src", timeout=60))
            assert replay(final) == source_rows(standby.dsn, p)


def test_decoding_from_a_standby(kafka_bootstrap: str, name_prefix: str) -> None:
    """PostgreSQL 16+: the producer may stream from a standby (its slot lives there)."""
    import os

    from pgrepl.testing.pg_binaries import INSTALL_HINT, packaged_install

    if packaged_install(17) is None and not os.environ.get("CI"):
        pytest.skip("PostgreSQL 17 is not installed: " + INSTALL_HINT.format(major=17))
    p = name_prefix
    with LocalPostgres(version=17) as primary:
        make_source(primary.dsn, p)
        with primary.start_standby(failover_slots=False) as standby:
            producer = Producer(standby.dsn, kafka_bootstrap, f"{p}slot", f"{p}pub",
                                {f"{p}src": {"name": f"{p}src", "partition_key": ["grp"]}}, snapshot="never")
            stop = threading.Event()

            def nudge() -> None:  # slot creation on a standby waits for the primary's next running-xacts record
                while not stop.is_set():
                    primary.query("SELECT pg_log_standby_snapshot()")
                    stop.wait(0.5)

            nudger = threading.Thread(target=nudge, daemon=True)
            nudger.start()
            try:
                with running(producer):
                    wait_streaming(standby.dsn, f"{p}slot", timeout=60)
                    primary.query(f"INSERT INTO {p}src SELECT g, 'g', 0, 'x' FROM generate_series(1, 50) g")
                    wait_for(lambda: producer.stats.records == 50, timeout=60, what="changes made on the primary")
            finally:
                stop.set()
                nudger.join(5)
