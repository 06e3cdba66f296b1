"""PostgreSQL side of the producer: connections, preflight checks, the replication slot.

Every check that can fail raises ``ConfigError`` with one line that says what to change.
Identifiers only ever reach SQL as bound parameters, or quoted by ``quote_ident``.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import psycopg2
import psycopg2.extensions
import psycopg2.extras

from pgrepl.errors import ConfigError, first_line
from pgrepl.lsn import parse_lsn
from pgrepl.topics import TopicInfo

log = logging.getLogger(__name__)

_SLOT_NAME = re.compile(r"^[a-z0-9_]{1,63}$")

# libpq errors that retrying will not fix: the user must change the DSN or the server's setup.
_PERMANENT_CONNECT_ERRORS = (
    "password authentication failed",
    "no pg_hba.conf entry",
    "does not exist",
    "invalid dsn",
    "invalid connection option",
    "missing \"=\"",
    "is not permitted to log in",
    "must be superuser or replication role",
    "permission denied",
)


def redact_dsn(dsn: str) -> str:
    """The DSN with any password replaced by ``***``: safe for logs and error messages."""
    redacted = re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", dsn)
    return re.sub(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", r"\1***", redacted, flags=re.IGNORECASE)


def is_permanent_connect_error(exc: Exception) -> bool:
    """True when a connection error will not go away by retrying (bad password, unknown db...)."""
    text = str(exc).lower()
    return any(marker in text for marker in _PERMANENT_CONNECT_ERRORS)


def connect(dsn: str, *, replication: bool = False, application_name: str = "pgrepl") -> psycopg2.extensions.connection:
    """Open a connection (a logical replication connection when ``replication``).

    A failure that retrying cannot fix becomes ``ConfigError``; others stay
    ``psycopg2.OperationalError`` for the caller's retry loop. Neither carries the password.
    """
    kwargs: Dict[str, object] = {"application_name": application_name}
    if replication:
        kwargs["connection_factory"] = psycopg2.extras.LogicalReplicationConnection
    try:
        conn = psycopg2.connect(dsn, **kwargs)
    except psycopg2.ProgrammingError as exc:  # malformed DSN
        raise ConfigError(f"invalid PostgreSQL DSN {redact_dsn(dsn)!r}: {str(exc).strip()}") from None
    except psycopg2.OperationalError as exc:
        reason = first_line(exc)
        if is_permanent_connect_error(exc):
            raise ConfigError(f"cannot connect to PostgreSQL at {redact_dsn(dsn)}: {reason}") from None
        raise psycopg2.OperationalError(f"cannot connect to PostgreSQL at {redact_dsn(dsn)}: {reason}") from None
    if not replication:
        conn.autocommit = True
    return conn


def quote_ident(name: str) -> str:
    """A SQL identifier in double quotes, inner quotes doubled (never interpolate raw names)."""
    if "\x00" in name:
        raise ConfigError(f"identifier contains a NUL byte: {name!r}")
    return '"' + name.replace('"', '""') + '"'


def validate_slot_name(slot: str) -> None:
    """PostgreSQL's own rule for slot names: 1-63 chars of lower-case letters, digits and '_'."""
    if not isinstance(slot, str) or not _SLOT_NAME.match(slot):
        raise ConfigError(
            f"invalid replication slot name {slot!r}: use 1-63 lower-case letters, digits and underscores")


@dataclass(frozen=True)
class PublishedTable:
    """One table of the publication, with what the producer needs to know about it."""

    schema: str
    name: str
    replica_identity: str  # 'd' default, 'n' nothing, 'f' full, 'i' index
    columns: Dict[str, bool]  # column name -> NOT NULL
    partitions_not_full: Tuple[str, ...] = ()  # leaf partitions (of a partitioned table) lacking REPLICA IDENTITY FULL

    @property
    def qualified_name(self) -> str:
        return f"{self.schema}.{self.name}"


@dataclass(frozen=True)
class Publication:
    """A publication's settings and tables."""

    name: str
    publishes: Tuple[str, ...]  # of "insert", "update", "delete", "truncate"
    tables: Tuple[PublishedTable, ...]


@dataclass(frozen=True)
class SlotInfo:
    """An existing replication slot as pg_replication_slots describes it."""

    name: str
    plugin: Optional[str]
    slot_type: str
    database: Optional[str]
    active_pid: Optional[int]
    confirmed_flush_lsn: Optional[int]


def check_server(conn: psycopg2.extensions.connection) -> None:
    """``wal_level`` must be ``logical`` and the database encoding UTF-8."""
    with conn.cursor() as cur:
        cur.execute("SELECT current_setting('wal_level'), current_setting('server_encoding')")
        wal_level, encoding = cur.fetchone()
    if wal_level != "logical":
        raise ConfigError(
            f"wal_level is {wal_level!r}; set wal_level = logical in postgresql.conf "
            "(ALTER SYSTEM SET wal_level = logical) and restart PostgreSQL")
    if encoding.upper() not in ("UTF8", "UTF-8"):
        raise ConfigError(
            f"database encoding is {encoding}; pgrepl publishes JSON and needs a UTF8 database")


def load_publication(conn: psycopg2.extensions.connection, name: str) -> Publication:
    """Read a publication and its tables; ``ConfigError`` when it does not exist."""
    with conn.cursor() as cur:
        cur.execute(
            "SELECT pubinsert, pubupdate, pubdelete, pubtruncate FROM pg_publication WHERE pubname = %s",
            (name,))
        row = cur.fetchone()
        if row is None:
            raise ConfigError(
                f"publication {name!r} does not exist; create it: CREATE PUBLICATION {quote_ident(name)} "
                "FOR TABLE ... (the tables of your topic map)")
        publishes = tuple(op for op, on in zip(("insert", "update", "delete", "truncate"), row) if on)
        cur.execute(
            """
            SELECT n.nspname, c.relname, c.relreplident, c.relkind, a.attname, a.attnotnull
            FROM pg_publication_tables pt
            JOIN pg_namespace n ON n.nspname = pt.schemaname
            JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = pt.tablename
            JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
            WHERE pt.pubname = %s
            ORDER BY n.nspname, c.relname, a.attnum
            """,
            (name,))
        tables: Dict[Tuple[str, str], Tuple[str, Dict[str, bool]]] = {}
        partitioned = set()
        for schema, table, replident, relkind, column, notnull in cur.fetchall():
            entry = tables.setdefault((schema, table), (replident, {}))
            entry[1][column] = notnull
            if relkind == "p":
                partitioned.add((schema, table))
        # with publish_via_partition_root the root is listed, but the old rows come from the
        # partitions, each with its own replica identity
        not_full: Dict[Tuple[str, str], Tuple[str, ...]] = {}
        for schema, table in partitioned:
            cur.execute(
                """
                SELECT pn.nspname || '.' || pc.relname
                FROM pg_partition_tree(%s::regclass) t
                JOIN pg_class pc ON pc.oid = t.relid
                JOIN pg_namespace pn ON pn.oid = pc.relnamespace
                WHERE t.isleaf AND pc.relreplident <> 'f'
                ORDER BY 1
                """,
                (f"{quote_ident(schema)}.{quote_ident(table)}",))
            not_full[(schema, table)] = tuple(r[0] for r in cur.fetchall())
    return Publication(
        name=name,
        publishes=publishes,
        tables=tuple(PublishedTable(s, t, ri, cols, not_full.get((s, t), ()))
                     for (s, t), (ri, cols) in tables.items()),
    )


def check_publication(publication: Publication, topic_map: Dict[str, TopicInfo]) -> None:
    """The publication and the topic map must describe the same tables, with usable keys.

    Every published table needs a topic-map entry and every entry a published table;
    partition-key columns must exist and be NOT NULL; tables need REPLICA IDENTITY FULL
    when updates or deletes are published (the old row is part of every Update/Delete).
    """
    if not publication.tables:
        raise ConfigError(
            f"publication {publication.name!r} publishes no tables; add them: ALTER PUBLICATION "
            f"{quote_ident(publication.name)} ADD TABLE ...")
    matched: Dict[str, str] = {}
    by_bare: Dict[str, List[PublishedTable]] = {}
    for table in publication.tables:
        by_bare.setdefault(table.name, []).append(table)
    for table in publication.tables:
        key = table.qualified_name if table.qualified_name in topic_map else table.name
        if key not in topic_map:
            raise ConfigError(
                f"table {table.qualified_name} is in publication {publication.name!r} but not in the "
                f"topic map; add an entry for {table.name!r} or remove it from the publication")
        if key == table.name and len(by_bare[table.name]) > 1 and table.qualified_name not in topic_map:
            others = ", ".join(t.qualified_name for t in by_bare[table.name])
            raise ConfigError(
                f"topic-map entry {table.name!r} matches several published tables ({others}); "
                "use schema-qualified keys such as 'schema.table'")
        matched[key] = table.qualified_name
        info = topic_map[key]
        for column in info.partition_key:
            if column not in table.columns:
                raise ConfigError(
                    f"partition-key column {column!r} does not exist in table {table.qualified_name}; "
                    f"its columns are {sorted(table.columns)}")
            if not table.columns[column]:
                raise ConfigError(
                    f"partition-key column {column!r} of table {table.qualified_name} is nullable; "
                    f"make it NOT NULL (ALTER TABLE {quote_ident(table.schema)}.{quote_ident(table.name)} "
                    f"ALTER COLUMN {quote_ident(column)} SET NOT NULL) or choose another partition key")
        if "update" in publication.publishes or "delete" in publication.publishes:
            if table.replica_identity != "f":
                raise ConfigError(
                    f"table {table.qualified_name} needs the full old row for updates and deletes; run: "
                    f"ALTER TABLE {quote_ident(table.schema)}.{quote_ident(table.name)} REPLICA IDENTITY FULL")
            if table.partitions_not_full:
                raise ConfigError(
                    f"partitions {list(table.partitions_not_full)} of table {table.qualified_name} need the full "
                    "old row for updates and deletes (replica identity is set per partition); run ALTER TABLE "
                    "<partition> REPLICA IDENTITY FULL on each")
    unmatched = sorted(set(topic_map) - set(matched))
    if unmatched:
        raise ConfigError(
            f"topic-map tables {unmatched} are not in publication {publication.name!r}; add them: "
            f"ALTER PUBLICATION {quote_ident(publication.name)} ADD TABLE ... (or remove them from the topic map)")


def get_slot(conn: psycopg2.extensions.connection, slot: str) -> Optional[SlotInfo]:
    """The slot as pg_replication_slots shows it, or None."""
    with conn.cursor() as cur:
        cur.execute(
            "SELECT slot_name, plugin, slot_type, database, active_pid, confirmed_flush_lsn::text "
            "FROM pg_replication_slots WHERE slot_name = %s",
            (slot,))
        row = cur.fetchone()
    if row is None:
        return None
    name, plugin, slot_type, database, active_pid, confirmed = row
    return SlotInfo(name, plugin, slot_type, database, active_pid, parse_lsn(confirmed) if confirmed else None)


def ensure_slot(conn: psycopg2.extensions.connection, slot: str, *, terminate_active: bool = True,
                wait_seconds: float = 10.0) -> SlotInfo:
    """Create the pgoutput slot when missing; check an existing one; free it from a stale holder.

    Another backend streaming from the slot (usually an earlier run that did not exit
    cleanly) is terminated, as the original library does, and logged.
    """
    validate_slot_name(slot)
    with conn.cursor() as cur:
        cur.execute("SELECT current_database()")
        (database,) = cur.fetchone()
    info = get_slot(conn, slot)
    if info is None:
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT lsn::text FROM pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,))
                (lsn,) = cur.fetchone()
        except psycopg2.errors.DuplicateObject:
            pass  # created concurrently by another producer: fall through to the checks
        except psycopg2.Error as exc:
            raise ConfigError(f"cannot create replication slot {slot!r}: {first_line(exc)}") from None
        else:
            log.info("created logical replication slot %s (pgoutput) at %s", slot, lsn)
        info = get_slot(conn, slot)
        assert info is not None
    if info.slot_type != "logical" or info.plugin != "pgoutput":
        raise ConfigError(
            f"replication slot {slot!r} exists but is {info.slot_type} with plugin {info.plugin!r}; "
            "pgrepl needs a logical pgoutput slot: choose another slot name or drop this one")
    if info.database != database:
        raise ConfigError(
            f"replication slot {slot!r} belongs to database {info.database!r}, not {database!r}; "
            "connect to that database or choose another slot name")
    if info.active_pid is not None and terminate_active:
        log.warning("replication slot %s is in use by backend pid %d; terminating it", slot, info.active_pid)
        with conn.cursor() as cur:
            cur.execute("SELECT pg_terminate_backend(%s)", (info.active_pid,))
        deadline = time.monotonic() + wait_seconds
        while True:
            info = get_slot(conn, slot)
            assert info is not None
            if info.active_pid is None:
                break
            if time.monotonic() > deadline:
                raise ConfigError(f"replication slot {slot!r} is still in use by backend pid {info.active_pid}")
            time.sleep(0.1)
    return info


def drop_slot(conn: psycopg2.extensions.connection, slot: str) -> bool:
    """Drop a slot if it exists (terminating its holder first); True when one was dropped."""
    info = get_slot(conn, slot)
    if info is None:
        return False
    with conn.cursor() as cur:
        if info.active_pid is not None:
            cur.execute("SELECT pg_terminate_backend(%s)", (info.active_pid,))
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                current = get_slot(conn, slot)
                if current is None or current.active_pid is None:
                    break
                time.sleep(0.05)
        cur.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
    return True


def publication_option(name: str) -> str:
    """The ``publication_names`` option value: pgoutput splits it as an identifier list."""
    return quote_ident(name)
