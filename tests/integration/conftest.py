"""Integration-test fixtures: one real PostgreSQL (wal_level=logical) and one Kafka broker per session.

By default both are throwaway local servers from :mod:`pgrepl.sandbox`. To run the same tests
against real services set ``PGREPL_TEST_PG_DSN`` (a server with ``wal_level=logical``; no local
PostgreSQL is started) and/or ``PGREPL_TEST_KAFKA`` (bootstrap servers). A missing or broken
service fails the tests with a clear message; it never skips them, so CI cannot go green silently.
Every test here gets the ``integration`` marker.
"""

from __future__ import annotations

import logging
import os
import re
import uuid
from pathlib import Path
from typing import Any, Callable, Generator, Iterator, List, Optional

import psycopg2
import psycopg2.errors
import psycopg2.extensions
import pytest
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from pgrepl.errors import ConfigError, first_line
from pgrepl.postgres.connect import redact_dsn
from pgrepl.postgres.slot import drop_slot
from pgrepl.testing import LocalBroker, LocalPostgres, SandboxError

logger = logging.getLogger(__name__)

#: libpq DSN of an external PostgreSQL (wal_level=logical) to test against instead of a local one.
ENV_PG_DSN = "PGREPL_TEST_PG_DSN"
#: bootstrap.servers of an external Kafka cluster to test against instead of a local broker.
ENV_KAFKA = "PGREPL_TEST_KAFKA"

_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: List[pytest.Item]) -> None:
    """Mark every test collected from this directory (and only those) as ``integration``."""
    for item in items:
        if _HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.integration)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    """Keep each phase's report on the item so fixture teardown can tell whether the test passed."""
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"_pgrepl_report_{report.when}", report)


# ------------------------------------------------------------------------------------------
# Services
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def local_pg() -> Iterator[Optional[LocalPostgres]]:
    """The session's throwaway PostgreSQL, or None when ``PGREPL_TEST_PG_DSN`` names an external one."""
    if os.environ.get(ENV_PG_DSN):
        yield None
        return
    pg: Optional[LocalPostgres] = None
    error = ""
    try:
        pg = LocalPostgres().start()
    except (ConfigError, SandboxError) as exc:
        error = str(exc)
    if pg is None:
        pytest.fail(f"cannot start a local PostgreSQL for the integration tests (or set {ENV_PG_DSN}): {error}", pytrace=False)
    try:
        yield pg
    finally:
        pg.stop()


@pytest.fixture(scope="session")
def local_broker() -> Iterator[Optional[LocalBroker]]:
    """The session's throwaway Kafka broker (tansu), or None when ``PGREPL_TEST_KAFKA`` names an external one."""
    if os.environ.get(ENV_KAFKA):
        yield None
        return
    broker: Optional[LocalBroker] = None
    error = ""
    try:
        broker = LocalBroker().start()
    except (ConfigError, SandboxError) as exc:
        error = str(exc)
    if broker is None:
        pytest.fail(f"cannot start a local Kafka broker for the integration tests (or set {ENV_KAFKA}): {error}", pytrace=False)
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def pg_dsn(local_pg: Optional[LocalPostgres]) -> str:
    """DSN of a PostgreSQL server with ``wal_level=logical`` (local sandbox or ``PGREPL_TEST_PG_DSN``)."""
    if local_pg is not None:
        return local_pg.dsn
    dsn = os.environ[ENV_PG_DSN]
    conn = None
    error = ""
    try:
        conn = psycopg2.connect(dsn, connect_timeout=10)
    except psycopg2.Error as exc:
        error = first_line(exc)
    if conn is None:
        pytest.fail(f"{ENV_PG_DSN} ({redact_dsn(dsn)}): cannot connect: {error}", pytrace=False)
    try:
        with conn.cursor() as cur:
            cur.execute("SHOW wal_level")
            row = cur.fetchone()
    finally:
        conn.close()
    wal_level = row[0] if row else "?"
    if wal_level != "logical":
        pytest.fail(
            f"{ENV_PG_DSN} ({redact_dsn(dsn)}): wal_level is {wal_level!r}; set wal_level = logical and restart the server",
            pytrace=False,
        )
    return dsn


@pytest.fixture(scope="session")
def kafka_bootstrap(local_broker: Optional[LocalBroker]) -> str:
    """bootstrap.servers of a Kafka-protocol broker (local tansu or ``PGREPL_TEST_KAFKA``)."""
    if local_broker is not None:
        return local_broker.bootstrap
    bootstrap = os.environ[ENV_KAFKA]
    error = ""
    try:
        kafka_admin(bootstrap).list_topics(timeout=15)
    except KafkaException as exc:
        error = str(exc)
    if error:
        pytest.fail(f"{ENV_KAFKA}={bootstrap}: no Kafka metadata within 15 s: {error}", pytrace=False)
    return bootstrap


def kafka_admin(bootstrap: str) -> AdminClient:
    """An AdminClient whose librdkafka logs go to Python logging instead of stderr."""
    return AdminClient(
        {
            "bootstrap.servers": bootstrap,
            "logger": logging.getLogger(__name__ + ".librdkafka"),
            "error_cb": lambda err: logger.debug("kafka admin: %s", err),
        }
    )


# ------------------------------------------------------------------------------------------
# Per-test names and cleanup
# ------------------------------------------------------------------------------------------


def _wait_and_drop_slot(dsn: str, slot: str, timeout: float = 15.0) -> bool:
    """Drop replication slot ``slot`` once no walsender uses it (pgrepl's own ``drop_slot``); True if it existed."""
    conn = psycopg2.connect(dsn, connect_timeout=10)
    conn.autocommit = True
    try:
        return drop_slot(conn, slot, timeout=timeout)
    finally:
        conn.close()


@pytest.fixture
def drop_replication_slot(pg_dsn: str) -> Callable[[str], bool]:
    """A function dropping a replication slot by name (waits for its walsender to go; no-op if absent)."""
    return lambda slot: _wait_and_drop_slot(pg_dsn, slot)


def _slug(text: str, limit: int) -> str:
    """Lowercase ``[a-z0-9_]`` form of ``text``, at most ``limit`` characters."""
    return re.sub(r"[^a-z0-9_]+", "_", text.lower()).strip("_")[:limit].rstrip("_")


@pytest.fixture
def name_prefix(request: pytest.FixtureRequest) -> Iterator[str]:
    """A prefix unique to this test for slots, publications, tables, topics and groups.

    Valid as a PostgreSQL identifier and a Kafka topic name, at most 30 characters so that
    ``prefix + suffix`` fits PostgreSQL's 63-byte names. On teardown, objects still carrying
    the prefix are removed (tables, publications, slots on ``pg_dsn``; topics on
    ``kafka_bootstrap``), but a *passing* test that leaves a replication slot behind fails:
    a forgotten slot pins WAL on a shared server forever.
    """
    test_name = _slug(request.node.name.replace("test_", "", 1), 14) or "t"
    prefix = f"pgr_{uuid.uuid4().hex[:8]}_{test_name}_"
    yield prefix

    leftover_slots: List[str] = []
    if "pg_dsn" in request.fixturenames:
        dsn: str = request.getfixturevalue("pg_dsn")
        leftover_slots = _cleanup_pg(dsn, prefix)
    if "kafka_bootstrap" in request.fixturenames:
        _cleanup_topics(request.getfixturevalue("kafka_bootstrap"), prefix)
    report = getattr(request.node, "_pgrepl_report_call", None)
    if leftover_slots and report is not None and report.passed:
        pytest.fail(f"test left replication slot(s) behind (now dropped): {', '.join(leftover_slots)}", pytrace=False)


def _cleanup_pg(dsn: str, prefix: str) -> List[str]:
    """Drop slots, publications and public tables whose names start with ``prefix``; return the slots."""
    conn = psycopg2.connect(dsn, connect_timeout=10)
    conn.autocommit = True
    starts = "left({col}, %(n)s) = %(prefix)s"
    params = {"n": len(prefix), "prefix": prefix}
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT slot_name FROM pg_replication_slots WHERE " + starts.format(col="slot_name"), params)
            slots = [r[0] for r in cur.fetchall()]
            cur.execute("SELECT pubname FROM pg_publication WHERE " + starts.format(col="pubname"), params)
            pubs = [r[0] for r in cur.fetchall()]
            cur.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public' AND " + starts.format(col="tablename"),
                params,
            )
            tables = [r[0] for r in cur.fetchall()]
            for pub in pubs:
                cur.execute(f'DROP PUBLICATION IF EXISTS "{pub}"')
            for table in tables:
                cur.execute(f'DROP TABLE IF EXISTS public."{table}" CASCADE')
    finally:
        conn.close()
    for slot in slots:
        try:
            _wait_and_drop_slot(dsn, slot)
        except (psycopg2.Error, TimeoutError) as exc:
            logger.warning("could not drop leftover replication slot %s: %s", slot, exc)
    if slots or pubs or tables:
        logger.info("cleaned up after test: slots=%s publications=%s tables=%s", slots, pubs, tables)
    return slots


def _cleanup_topics(bootstrap: str, prefix: str) -> None:
    """Delete (best effort) the topics whose names start with ``prefix``."""
    admin = kafka_admin(bootstrap)
    try:
        topics = [t for t in admin.list_topics(timeout=10).topics if t.startswith(prefix)]
        if topics:
            for topic, future in admin.delete_topics(topics, operation_timeout=10).items():
                future.result(15)
    except Exception as exc:  # cleanup must not mask the test's own outcome
        logger.warning("could not delete test topics with prefix %s: %s", prefix, exc)
