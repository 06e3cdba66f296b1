"""LocalPostgres standbys: streaming, promotion, and PostgreSQL 17 logical failover slots used by the producer."""

from __future__ import annotations

import os

import pytest

from pgrepl.producer import Producer
from pgrepl.testing import LocalPostgres
from pgrepl.testing.pg_binaries import INSTALL_HINT, packaged_install
from tests.integration.helpers import ops_of, read_topic, running, wait_for


def _replayed(primary: LocalPostgres, standby: LocalPostgres) -> bool:
    """Whether the standby has replayed everything the primary has written so far."""
    (lsn,) = primary.query("SELECT pg_current_wal_lsn()::text")[0]
    return bool(standby.query("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (lsn,))[0][0])


@pytest.mark.smoke
def test_standby_streams_and_promotes(local_pg: LocalPostgres, name_prefix: str) -> None:
    """A standby of the session's version follows the primary, is read-only, and takes writes once promoted."""
    if local_pg is None:
        pytest.skip("PostgreSQL is external (PGREPL_TEST_PG_DSN)")
    table = f"{name_prefix}t"
    with LocalPostgres() as primary:
        primary.query(f"CREATE TABLE {table} (id int PRIMARY KEY)")
        primary.query(f"INSERT INTO {table} VALUES (1), (2)")
        with primary.start_standby(failover_slots=False) as standby:
            assert standby.in_recovery() and standby.version == primary.version
            wait_for(lambda: _replayed(primary, standby), what="the standby to replay the inserts")
            assert standby.query(f"SELECT count(*) FROM {table}") == [(2,)]
            slot = standby.slot_name
            assert primary.query("SELECT slot_type, active FROM pg_replication_slots WHERE slot_name = %s",
                                 (slot,)) == [("physical", True)]
            standby.promote()
            assert not standby.in_recovery()
            standby.query(f"INSERT INTO {table} VALUES (3)")
            assert standby.query(f"SELECT count(*) FROM {table}") == [(3,)]
        # the discarded standby's slot no longer holds the primary's WAL
        assert primary.query("SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s", (slot,)) == [(0,)]


def test_failover_slot_is_synced_and_streams_after_promotion(kafka_bootstrap: str, name_prefix: str) -> None:
    """PostgreSQL 17: a logical slot created with failover = true on the primary appears synced on the standby,
    and after promotion pgrepl's producer streams from it the changes made on the old primary."""
    if packaged_install(17) is None and not os.environ.get("CI"):  # CI installs it: there it fails instead
        pytest.skip("PostgreSQL 17 is not installed: " + INSTALL_HINT.format(major=17))
    p = name_prefix
    with LocalPostgres(version=17) as primary:
        primary.query(f"CREATE TABLE {p}t (id int PRIMARY KEY, v text)")
        primary.query(f"ALTER TABLE {p}t REPLICA IDENTITY FULL")
        primary.query(f"CREATE PUBLICATION {p}pub FOR TABLE {p}t")
        with primary.start_standby() as standby:
            assert standby.failover_slots
            assert primary.query("SHOW synchronized_standby_slots") == [(standby.slot_name,)]
            primary.query("SELECT pg_create_logical_replication_slot(%s, 'pgoutput', false, false, true)",
                          (f"{p}slot",))

            def synced() -> bool:
                primary.query("SELECT pg_log_standby_snapshot()")  # lets the synced copy become persistent
                rows = standby.query("SELECT synced, temporary, failover FROM pg_replication_slots "
                                     "WHERE slot_name = %s", (f"{p}slot",))
                return rows == [(True, False, True)]

            wait_for(synced, timeout=60, interval=0.5, what="the failover slot on the standby")
            primary.query(f"INSERT INTO {p}t VALUES (1, 'before failover'), (2, 'also')")
            wait_for(lambda: _replayed(primary, standby), what="the standby to replay the inserts")
            primary.stop()  # the primary is gone
            standby.promote()
            topic = f"{p}topic"
            producer = Producer(standby.dsn, kafka_bootstrap, f"{p}slot", f"{p}pub", {f"{p}t": {"name": topic}})
            with running(producer):
                wait_for(lambda: producer.stats.records >= 2, timeout=60, what="the producer on the promoted standby")
            ops = ops_of(read_topic(kafka_bootstrap, topic))
            assert [op["op"] for op in ops] == [{"Insert": ["1", "before failover"]}, {"Insert": ["2", "also"]}]
