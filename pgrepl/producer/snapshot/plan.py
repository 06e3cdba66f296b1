"""What a snapshot reads: each table's published columns, its chunk key, its filters, its key ranges.

A table is read in chunks of its primary key (or of a unique index over NOT NULL columns) in
key order; a table without such a key is read in one consistent pass (and the log says so).
The columns are the ones pgoutput publishes for it (the publication's column list, no
generated columns), in its order, so a snapshot row encodes to the stream's Insert byte for byte.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import psycopg2.extensions

from pgrepl.errors import ConfigError
from pgrepl.postgres.connect import query_one, quote_ident
from pgrepl.postgres.preflight import published_column_condition

log = logging.getLogger("pgrepl.snapshot")

#: A key value as the snapshot keeps it: the key columns' text, as COPY prints them.
Key = Tuple[Optional[str], ...]


@dataclass
class KeyRange:
    """A part of a table, read chunk by chunk: keys after ``after`` up to ``upto`` (None: unbounded).

    ``after`` moves forward as chunks are confirmed (that is what a restart resumes from);
    ``reading`` is where the next chunk starts, ahead of ``after`` while a chunk is in flight;
    ``exhausted`` says the last chunk was read (``done`` follows once it is confirmed).
    """

    after: Optional[Key] = None
    upto: Optional[Key] = None
    done: bool = False
    reading: Optional[Key] = None
    busy: bool = False
    exhausted: bool = False

    def to_json(self) -> Dict[str, Any]:
        return {"after": list(self.after) if self.after is not None else None,
                "upto": list(self.upto) if self.upto is not None else None, "done": self.done}

    @classmethod
    def from_json(cls, data: Dict[str, Any]) -> "KeyRange":
        after = tuple(data["after"]) if data.get("after") is not None else None
        upto = tuple(data["upto"]) if data.get("upto") is not None else None
        done = bool(data.get("done"))
        return cls(after=after, upto=upto, done=done, reading=after, exhausted=done)

    def rewind(self) -> None:
        """Forget chunks read but not confirmed: reading goes on from the confirmed key."""
        self.reading = self.after
        self.exhausted = self.done
        self.busy = False


@dataclass
class TablePlan:
    """One table of a snapshot: how to read it and how far it got."""

    schema: str
    name: str
    relkind: str
    columns: Tuple[str, ...]
    key_columns: Tuple[str, ...]       # empty: no usable key, one consistent read
    key_types: Tuple[str, ...]
    row_filter: Optional[str] = None   # the publication's row filter (PostgreSQL 15+)
    where: Optional[str] = None        # the request's filter
    estimated_rows: int = 0
    ranges: List[KeyRange] = field(default_factory=list)
    rows: int = 0

    @property
    def qualified_name(self) -> str:
        return f"{self.schema}.{self.name}"

    @property
    def sql_name(self) -> str:
        only = "" if self.relkind == "p" else "ONLY "  # inheritance children are published on their own
        return f"{only}{quote_ident(self.schema)}.{quote_ident(self.name)}"

    @property
    def done(self) -> bool:
        return all(r.done for r in self.ranges)

    def key_positions(self) -> Tuple[int, ...]:
        """Positions of the chunk key among the columns (every column for a keyless table)."""
        if not self.key_columns:
            return tuple(range(len(self.columns)))
        return tuple(self.columns.index(c) for c in self.key_columns)

    def to_json(self) -> Dict[str, Any]:
        return {"table": self.qualified_name, "where": self.where, "rows": self.rows,
                "ranges": [r.to_json() for r in self.ranges]}


def published_tables(conn: psycopg2.extensions.connection, publication: str) -> List[Tuple[str, str]]:
    """The (schema, table) pairs pgoutput publishes for ``publication``."""
    with conn.cursor() as cur:
        cur.execute("SELECT schemaname, tablename FROM pg_publication_tables WHERE pubname = %s ORDER BY 1, 2",
                    (publication,))
        return [(str(s), str(t)) for s, t in cur.fetchall()]


def resolve_tables(conn: psycopg2.extensions.connection, publication: str, names: Sequence[str]) -> List[Tuple[str, str]]:
    """Map requested names (``table`` or ``schema.table``) to published tables; ``ConfigError`` for the rest."""
    published = published_tables(conn, publication)
    found: List[Tuple[str, str]] = []
    for name in names:
        matches = [(s, t) for s, t in published if f"{s}.{t}" == name or t == name]
        if not matches:
            raise ConfigError(f"cannot snapshot {name!r}: it is not in publication {publication!r}; add it first "
                              f"(ALTER PUBLICATION {quote_ident(publication)} ADD TABLE ...)")
        if len(matches) > 1:
            raise ConfigError(f"{name!r} matches several published tables ({', '.join(f'{s}.{t}' for s, t in matches)}); "
                              "name it as schema.table")
        if matches[0] not in found:
            found.append(matches[0])
    return found


def plan_table(conn: psycopg2.extensions.connection, publication: str, schema: str, name: str,
               where: Optional[str], ranges: int) -> TablePlan:
    """Read the catalog for one table; check that it can be snapshotted; split it into ``ranges`` key ranges."""
    relid, relkind, estimated = query_one(
        conn, "SELECT c.oid, c.relkind, greatest(c.reltuples, 0)::bigint FROM pg_class c "
              "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relname = %s", (schema, name))
    (allowed,) = query_one(conn, "SELECT has_table_privilege(%s::oid, 'SELECT')", (relid,))
    if not allowed:
        raise ConfigError(f"cannot snapshot {schema}.{name}: permission denied; GRANT SELECT ON "
                          f"{quote_ident(schema)}.{quote_ident(name)} TO the producer's role")
    columns, row_filter = _published_columns(conn, publication, relid, schema, name)
    key_columns, key_types = _chunk_key(conn, relid)
    plan = TablePlan(schema, name, str(relkind), columns, key_columns, key_types, row_filter, where, int(estimated))
    if where:
        _check_where(conn, plan)
    if not key_columns:
        log.warning("table %s has no primary key or unique NOT NULL key: it is snapshotted in one consistent "
                    "read (rows are told apart by their whole value)", plan.qualified_name)
        plan.ranges = [KeyRange()]
    elif not set(key_columns) <= set(columns):
        raise ConfigError(f"cannot snapshot {plan.qualified_name}: its key ({', '.join(key_columns)}) is not among "
                          "the published columns (a publication column list must include the key)")
    else:
        plan.ranges = _split(conn, plan, ranges)
    return plan


def _published_columns(conn: psycopg2.extensions.connection, publication: str, relid: int, schema: str,
                       name: str) -> Tuple[Tuple[str, ...], Optional[str]]:
    """The columns pgoutput sends for the table, in its order, and the publication's row filter (15+)."""
    version = conn.server_version
    with conn.cursor() as cur:
        cur.execute(f"""
            SELECT a.attname FROM pg_publication_tables pt
            JOIN pg_attribute a ON a.attrelid = %s AND a.attnum > 0 AND NOT a.attisdropped
            WHERE pt.pubname = %s AND pt.schemaname = %s AND pt.tablename = %s
              AND {published_column_condition(version) or 'true'}
            ORDER BY a.attnum""", (relid, publication, schema, name))
        columns = tuple(str(r[0]) for r in cur.fetchall())
    row_filter: Optional[str] = None
    if version >= 150000:
        (row_filter,) = query_one(conn, "SELECT rowfilter FROM pg_publication_tables WHERE pubname = %s AND "
                                        "schemaname = %s AND tablename = %s", (publication, schema, name))
    return columns, row_filter


def _chunk_key(conn: psycopg2.extensions.connection, relid: int) -> Tuple[Tuple[str, ...], Tuple[str, ...]]:
    """The primary key, else the unique index with the fewest columns, all NOT NULL; () when none."""
    with conn.cursor() as cur:
        cur.execute(
            """
            SELECT i.indisprimary, array_agg(a.attname ORDER BY k.ord), array_agg(format_type(a.atttypid, a.atttypmod)
                   ORDER BY k.ord), bool_and(a.attnotnull)
            FROM pg_index i
            CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
            JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
            WHERE i.indrelid = %s AND i.indisunique AND i.indisvalid AND i.indpred IS NULL AND i.indexprs IS NULL
            GROUP BY i.indexrelid, i.indisprimary
            """, (relid,))
        candidates = [(bool(p), tuple(cols), tuple(types)) for p, cols, types, notnull in cur.fetchall() if notnull]
    if not candidates:
        return (), ()
    candidates.sort(key=lambda c: (not c[0], len(c[1])))
    return candidates[0][1], candidates[0][2]


def _check_where(conn: psycopg2.extensions.connection, plan: TablePlan) -> None:
    """A request's WHERE filter must be valid SQL over the table (checked read-only, nothing runs)."""
    try:
        with conn.cursor() as cur:
            cur.execute("BEGIN READ ONLY")
            cur.execute(f"EXPLAIN SELECT 1 FROM {plan.sql_name} WHERE {plan.where}")
            cur.execute("ROLLBACK")
    except psycopg2.Error as exc:
        with conn.cursor() as cur:
            cur.execute("ROLLBACK")
        raise ConfigError(f"snapshot filter for {plan.qualified_name} is not valid: WHERE {plan.where}: "
                          f"{str(exc).strip().splitlines()[0]}") from None


def _split(conn: psycopg2.extensions.connection, plan: TablePlan, ranges: int) -> List[KeyRange]:
    """``ranges`` key ranges of about equal size (a large table is read by several connections at once)."""
    if ranges <= 1 or plan.estimated_rows < ranges * 10_000:
        return [KeyRange()]
    bounds = _histogram_bounds(conn, plan, ranges)
    if bounds is None:
        bounds = _offset_bounds(conn, plan, ranges)
    edges: List[Optional[Key]] = [None, *bounds, None]
    return [KeyRange(after=edges[i], upto=edges[i + 1], reading=edges[i]) for i in range(len(edges) - 1)]


def _histogram_bounds(conn: psycopg2.extensions.connection, plan: TablePlan, ranges: int) -> Optional[List[Key]]:
    """Bounds from the planner's histogram of a one-column key (ANALYZE's, no scan at all); None
    when there is none (composite key, never analyzed)."""
    if len(plan.key_columns) != 1:
        return None
    with conn.cursor() as cur:
        cur.execute("SELECT histogram_bounds::text::text[] FROM pg_stats WHERE schemaname = %s AND tablename = %s "
                    "AND attname = %s AND NOT inherited", (plan.schema, plan.name, plan.key_columns[0]))
        row = cur.fetchone()
    values = list(row[0]) if row is not None and row[0] is not None else []
    if len(values) < 2 * ranges:
        return None
    bounds: List[Key] = []
    for i in range(1, ranges):
        bound = (str(values[len(values) * i // ranges]),)
        if not bounds or bound != bounds[-1]:
            bounds.append(bound)
    return bounds


def _offset_bounds(conn: psycopg2.extensions.connection, plan: TablePlan, ranges: int) -> List[Key]:
    """Bounds at the estimated row counts' offsets in key order (one index scan per bound)."""
    keys = ", ".join(quote_ident(c) for c in plan.key_columns)
    # the output columns get names of their own: ORDER BY "id" next to an output column named
    # "id" (what "id"::text is called) would sort by the text, and bounds of a numeric key would
    # come out of order (overlapping ranges, rows read twice)
    cast = ", ".join(f"{quote_ident(c)}::text AS pgrepl_bound_{i}" for i, c in enumerate(plan.key_columns))
    bounds: List[Key] = []
    with conn.cursor() as cur:
        for i in range(1, ranges):
            cur.execute(f"SELECT {cast} FROM {plan.sql_name} ORDER BY {keys} OFFSET %s LIMIT 1",
                        (plan.estimated_rows * i // ranges,))
            row = cur.fetchone()
            if row is not None and (not bounds or tuple(row) != bounds[-1]):
                bounds.append(tuple(row))
    return bounds


def chunk_query(plan: TablePlan, after: Optional[Key], upto: Optional[Key], limit: Optional[int]) -> Tuple[str, List[Any]]:
    """``COPY (SELECT ...) TO STDOUT`` for the next chunk of a range, with its parameters."""
    columns = ", ".join(quote_ident(c) for c in plan.columns)
    conditions: List[str] = []
    params: List[Any] = []
    if plan.key_columns:
        key = f"({', '.join(quote_ident(c) for c in plan.key_columns)})"
        typed = f"({', '.join('%s::' + t for t in plan.key_types)})"
        if after is not None:
            conditions.append(f"{key} > {typed}")
            params.extend(after)
        if upto is not None:
            conditions.append(f"{key} <= {typed}")
            params.extend(upto)
    if plan.row_filter:
        conditions.append(f"({plan.row_filter})")
    if plan.where:
        conditions.append(f"({plan.where})")
    sql = f"SELECT {columns} FROM {plan.sql_name}"
    if conditions:
        sql += " WHERE " + " AND ".join(conditions)
    if plan.key_columns:
        sql += " ORDER BY " + ", ".join(quote_ident(c) for c in plan.key_columns)
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
    return f"COPY ({sql}) TO STDOUT", params
