"""Preflight checks: the server, the publication and the topic map must fit before streaming starts.

Each failed check raises ``ConfigError`` with one line saying what to change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterator, List, Tuple

import psycopg2.extensions

from pgrepl.errors import ConfigError
from pgrepl.postgres.connect import query_one, quote_ident
from pgrepl.topics import TopicInfo


@dataclass(frozen=True)
class PublishedTable:
    """One table of the publication, with what the producer needs to know about it."""

    schema: str
    name: str
    replica_identity: str  # 'd' default, 'n' nothing, 'f' full, 'i' index
    columns: Dict[str, bool]  # published column name -> NOT NULL (what pgoutput sends)
    partitions_not_full: Tuple[str, ...] = ()  # leaf partitions (of a partitioned table) lacking REPLICA IDENTITY FULL
    unpublished: Tuple[str, ...] = ()  # columns the publication leaves out (column list, generated column)

    @property
    def qualified_name(self) -> str:
        return f"{self.schema}.{self.name}"


@dataclass(frozen=True)
class Publication:
    """A publication's settings and tables."""

    name: str
    publishes: Tuple[str, ...]  # of "insert", "update", "delete", "truncate"
    tables: Tuple[PublishedTable, ...]


def check_server(conn: psycopg2.extensions.connection) -> None:
    """``wal_level`` must be ``logical``, the database encoding UTF-8, and a standby PostgreSQL 16+."""
    wal_level, encoding, standby = query_one(
        conn, "SELECT current_setting('wal_level'), current_setting('server_encoding'), pg_is_in_recovery()")
    if standby and conn.server_version < 160000:
        raise ConfigError(
            f"this server is a standby running PostgreSQL {conn.server_version // 10000}; logical decoding on a "
            "standby needs PostgreSQL 16 or later: connect to the primary (e.g. target_session_attrs=read-write)")
    if wal_level != "logical":
        raise ConfigError(
            f"wal_level is {wal_level!r}; set wal_level = logical in postgresql.conf "
            "(ALTER SYSTEM SET wal_level = logical) and restart PostgreSQL")
    if encoding.upper() not in ("UTF8", "UTF-8"):
        raise ConfigError(
            f"database encoding is {encoding}; pgrepl publishes JSON and needs a UTF8 database")


def published_column_condition(server_version_num: int) -> str:
    """SQL over ``pt`` (pg_publication_tables) and ``a`` (pg_attribute): whether pgoutput sends column ``a``.

    Column lists arrived in PostgreSQL 15 (``pt.attnames``). pgoutput sends generated columns
    only from 18 (``publish_generated_columns``), and 15's ``attnames`` still lists them; from 16
    on ``attnames`` is exactly what is sent.
    """
    parts = []
    if server_version_num >= 150000:
        parts.append("a.attname = ANY(pt.attnames)")
    if server_version_num < 160000:
        parts.append("a.attgenerated = ''")
    return " AND ".join(parts)


def load_publication(conn: psycopg2.extensions.connection, name: str) -> Publication:
    """Read a publication and its tables; ``ConfigError`` when it does not exist."""
    (version_num,) = query_one(conn, "SELECT current_setting('server_version_num')::int")
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
            SELECT n.nspname, c.relname, c.relreplident, c.relkind, a.attname, a.attnotnull,
                   """ + published_column_condition(version_num) + """ AS published
            FROM pg_publication_tables pt
            JOIN pg_namespace n ON n.nspname = pt.schemaname
            JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = pt.tablename
            JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
            WHERE pt.pubname = %s
            ORDER BY n.nspname, c.relname, a.attnum
            """,
            (name,))
        tables: Dict[Tuple[str, str], Tuple[str, Dict[str, bool], List[str]]] = {}
        partitioned = set()
        for schema, table, replident, relkind, column, notnull, published in cur.fetchall():
            entry = tables.setdefault((schema, table), (replident, {}, []))
            if published:
                entry[1][column] = notnull
            else:
                entry[2].append(column)
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
        tables=tuple(PublishedTable(s, t, ri, cols, not_full.get((s, t), ()), tuple(left_out))
                     for (s, t), (ri, cols, left_out) in tables.items()),
    )


def check_publication(publication: Publication, topic_map: Dict[str, TopicInfo]) -> None:
    """The publication and the topic map must describe the same tables, with usable keys.

    Every published table needs a topic-map entry and every entry a published table;
    partition-key columns must exist and be NOT NULL; tables need REPLICA IDENTITY FULL
    when updates or deletes are published (the old row is part of every Update/Delete).
    ``ConfigError`` names the first problem (``publication_problems`` lists them all).
    """
    for _, problem in publication_problems(publication, topic_map):
        raise ConfigError(problem)


def publication_problems(publication: Publication, topic_map: Dict[str, TopicInfo]) -> Iterator[Tuple[str, str]]:
    """Every mismatch of the publication and the topic map, as (``"topic map"``, ``"partition key"``
    or ``"replica identity"``, one line saying what to change)."""
    if not publication.tables:
        yield ("topic map", f"publication {publication.name!r} publishes no tables; add them: ALTER PUBLICATION "
               f"{quote_ident(publication.name)} ADD TABLE ...")
        return
    matched: Dict[str, str] = {}
    by_bare: Dict[str, List[PublishedTable]] = {}
    for table in publication.tables:
        by_bare.setdefault(table.name, []).append(table)
    for table in publication.tables:
        key = table.qualified_name if table.qualified_name in topic_map else table.name
        if key not in topic_map:
            yield ("topic map",
                   f"table {table.qualified_name} is in publication {publication.name!r} but not in the "
                   f"topic map; add an entry for {table.name!r} or remove it from the publication")
            continue
        if key == table.name and len(by_bare[table.name]) > 1 and table.qualified_name not in topic_map:
            others = ", ".join(t.qualified_name for t in by_bare[table.name])
            yield ("topic map", f"topic-map entry {table.name!r} matches several published tables ({others}); "
                   "use schema-qualified keys such as 'schema.table'")
            continue
        matched[key] = table.qualified_name
        yield from _key_problems(table, topic_map[key])
        if "update" in publication.publishes or "delete" in publication.publishes:
            yield from _identity_problems(table)
    unmatched = sorted(set(topic_map) - set(matched) - {t.name for t in publication.tables})
    if unmatched:
        yield ("topic map",
               f"topic-map tables {unmatched} are not in publication {publication.name!r}; add them: "
               f"ALTER PUBLICATION {quote_ident(publication.name)} ADD TABLE ... (or remove them from the topic map)")


def _key_problems(table: PublishedTable, info: TopicInfo) -> Iterator[Tuple[str, str]]:
    """Partition-key columns must exist, be published and be NOT NULL."""
    for column in info.partition_key:
        if column in table.unpublished:
            yield ("partition key",
                   f"partition-key column {column!r} of table {table.qualified_name} is not published (left out "
                   "of the publication's column list, or a generated column, which pgoutput sends only from "
                   "PostgreSQL 18 with publish_generated_columns = stored); publish it or choose another partition key")
        elif column not in table.columns:
            yield ("partition key", f"partition-key column {column!r} does not exist in table "
                   f"{table.qualified_name}; its columns are {sorted(table.columns)}")
        elif not table.columns[column]:
            yield ("partition key",
                   f"partition-key column {column!r} of table {table.qualified_name} is nullable; "
                   f"make it NOT NULL (ALTER TABLE {quote_ident(table.schema)}.{quote_ident(table.name)} "
                   f"ALTER COLUMN {quote_ident(column)} SET NOT NULL) or choose another partition key")


def _identity_problems(table: PublishedTable) -> Iterator[Tuple[str, str]]:
    """Updates and deletes carry the whole old row: REPLICA IDENTITY FULL, on every partition too."""
    if table.replica_identity != "f":
        yield ("replica identity",
               f"table {table.qualified_name} needs the full old row for updates and deletes; run: "
               f"ALTER TABLE {quote_ident(table.schema)}.{quote_ident(table.name)} REPLICA IDENTITY FULL")
    if table.partitions_not_full:
        yield ("replica identity",
               f"partitions {list(table.partitions_not_full)} of table {table.qualified_name} need the full "
               "old row for updates and deletes (replica identity is set per partition); run ALTER TABLE "
               "<partition> REPLICA IDENTITY FULL on each")
