"""Workloads of ``pgrepl-bench``: the tables, the row changes and how they are generated.

Each workload is a table shape plus a mix of inserts, updates and deletes. The rows that
updates and deletes hit are loaded *before* the replication slots exist, so every slot sees
exactly the planned changes and nothing else; the changes are then made either as one large
transaction or as many transactions of ``tx_size`` changes. The exact number of row changes
(from the statements' row counts) is what every reader must deliver.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from pgrepl.postgres.connect import quote_ident

log = logging.getLogger(__name__)

#: Every object the bench creates (tables, publications, slots, topics) starts with this.
PREFIX = "pgrepl_bench_"

#: Size of the 20 kB values of the ``toast`` workload.
TOAST_VALUE_BYTES = 20_000

#: The ``jsonb`` workload's document of row ``g``: an order of 24 to 88 line items, 2-8 kB of
#: JSON text (every line item has quoted keys and strings, and a note with escaped quotes: the
#: dense escaping of real JSON documents, unlike the toast workload's plain hex).
JSONB_DOCUMENT_SQL = (
    "jsonb_build_object('order', g, 'rev', 0, 'customer', 'customer ' || (g %% 997), 'items', "
    "(SELECT jsonb_agg(jsonb_build_object('sku', 'sku-' || g || '-' || i, 'qty', i, 'price', i * 1.25, "
    "'tags', jsonb_build_array('red', 'blue'), 'note', 'line \"' || i || '\"')) "
    "FROM generate_series(1, 24 + (g %% 65)::int) i))"
)

ProgressFn = Callable[[int], None]


@dataclass(frozen=True)
class Workload:
    """A table shape and the share of inserts, updates and deletes among its row changes."""

    name: str
    description: str
    columns: Tuple[Tuple[str, str], ...]  # (name, SQL type and constraints)
    partition_key: Tuple[str, ...]
    insert_exprs: Tuple[str, ...]  # SQL expressions of ``g`` (the row id), one per column
    update_set: str  # SET clause of the updates
    mix: Tuple[float, float, float]  # inserts, updates, deletes
    external_columns: Tuple[str, ...] = ()  # stored out of line, uncompressed (STORAGE EXTERNAL)
    rows_divisor: int = 1  # row changes = --rows // rows_divisor (heavy rows get fewer)

    def changes_for(self, rows: int) -> int:
        """How many row changes this workload makes for ``--rows``."""
        return max(1, rows // self.rows_divisor)

    def plan(self, changes: int) -> Tuple[int, int, int]:
        """(inserts, updates, deletes) adding up to ``changes``."""
        inserts = int(round(changes * self.mix[0]))
        updates = int(round(changes * self.mix[1]))
        inserts = min(inserts, changes)
        updates = min(updates, changes - inserts)
        return inserts, updates, changes - inserts - updates


def _wide() -> Workload:
    kinds = [
        ("int", "(g %% 1000)::int"),
        ("bigint", "g * 7919"),
        ("text", "'value ' || g"),
        ("numeric(12,2)", "(g %% 100000) / 100.0"),
        ("timestamptz", "'2026-11-24 02:00:00+00'::timestamptz + g * interval '1 second'"),
        ("boolean", "g %% 2 = 0"),
        ("uuid", "md5(g::text)::uuid"),
        ("double precision", "g / 3.0"),
        ("date", "'2026-01-01'::date + (g %% 365)::int"),
        ("varchar(32)", "substr(md5(g::text), 1, 12)"),
    ]
    columns: List[Tuple[str, str]] = [("id", "bigint PRIMARY KEY")]
    exprs: List[str] = ["g"]
    for index in range(29):
        sql_type, expr = kinds[index % len(kinds)]
        columns.append((f"c{index + 1:02d}", sql_type))
        exprs.append(expr)
    return Workload(
        name="wide",
        description="30 columns (bigint, int, text, numeric, timestamptz, boolean, uuid, float8, date, varchar)",
        columns=tuple(columns),
        partition_key=("id",),
        insert_exprs=tuple(exprs),
        update_set="c01 = c01 + 1, c03 = c03 || '!'",
        mix=(0.6, 0.3, 0.1),
    )


WORKLOADS: Dict[str, Workload] = {
    "inventory": Workload(
        name="inventory",
        description="7 columns: bigint, uuid, text, int, numeric, timestamptz, jsonb",
        columns=(
            ("id", "bigint PRIMARY KEY"),
            ("organization_id", "uuid NOT NULL"),
            ("name", "text"),
            ("quantity", "int"),
            ("price", "numeric(12,2)"),
            ("updated_at", "timestamptz"),
            ("attrs", "jsonb"),
        ),
        partition_key=("organization_id",),
        insert_exprs=(
            "g",
            "md5('org' || (g %% 50))::uuid",
            "'widget ' || g || ' \"deluxe\"'",
            "(g %% 1000)::int",
            "(g %% 10000) / 100.0",
            "'2026-11-24 02:00:00+00'::timestamptz + g * interval '1 second'",
            "jsonb_build_object('color', 'red', 'size', g %% 7, 'tags', jsonb_build_array('a', 'b'))",
        ),
        update_set="quantity = quantity + 1, updated_at = updated_at + interval '1 second'",
        mix=(0.6, 0.3, 0.1),
    ),
    "narrow": Workload(
        name="narrow",
        description="2 columns: bigint id + int",
        columns=(("id", "bigint PRIMARY KEY"), ("v", "int NOT NULL")),
        partition_key=("id",),
        insert_exprs=("g", "(g %% 1000)::int"),
        update_set="v = v + 1",
        mix=(0.6, 0.3, 0.1),
    ),
    "wide": _wide(),
    "jsonb": Workload(
        name="jsonb",
        description="jsonb documents of 2-8 kB; updates change the document (--rows/10 changes)",
        columns=(("id", "bigint PRIMARY KEY"), ("rev", "int NOT NULL"), ("doc", "jsonb")),
        partition_key=("id",),
        insert_exprs=("g", "0", JSONB_DOCUMENT_SQL),
        update_set="rev = rev + 1, doc = jsonb_set(doc, '{rev}', to_jsonb(rev + 1))",
        mix=(0.6, 0.3, 0.1),
        rows_divisor=10,
    ),
    "toast": Workload(
        name="toast",
        description=f"updates leaving a {TOAST_VALUE_BYTES // 1000} kB out-of-line text unchanged (--rows/50 changes)",
        columns=(("id", "bigint PRIMARY KEY"), ("counter", "int NOT NULL"), ("body", "text")),
        partition_key=("id",),
        insert_exprs=("g", "0", f"repeat(md5(g::text), {TOAST_VALUE_BYTES // 32})"),
        update_set="counter = counter + 1",
        mix=(0.1, 0.8, 0.1),
        external_columns=("body",),
        rows_divisor=50,
    ),
}

#: Transaction shapes: the whole workload in one transaction, or one every ``tx_size`` changes.
TX_MODES = ("big", "small")

#: The table of the low-rate latency workload: each row carries the client's clock at commit.
LATENCY_COLUMNS: Tuple[Tuple[str, str], ...] = (
    ("id", "bigint PRIMARY KEY"),
    ("stamp_us", "bigint NOT NULL"),
    ("v", "int"),
)
LATENCY_STAMP_COLUMN = "stamp_us"


@dataclass
class GeneratedChanges:
    """What a workload generation produced: the exact row-change count and the WAL end to reach."""

    changes: int
    transactions: int
    target_lsn: str
    seconds: float
    by_kind: Dict[str, int] = field(default_factory=dict)


def create_table_sql(table: str, workload_columns: Sequence[Tuple[str, str]],
                     external_columns: Sequence[str] = ()) -> List[str]:
    """CREATE TABLE (REPLICA IDENTITY FULL, needed for updates and deletes) and storage settings."""
    quoted = quote_ident(table)
    cols = ", ".join(f"{quote_ident(name)} {sql_type}" for name, sql_type in workload_columns)
    statements = [f"CREATE TABLE {quoted} ({cols})", f"ALTER TABLE {quoted} REPLICA IDENTITY FULL"]
    for column in external_columns:
        statements.append(f"ALTER TABLE {quoted} ALTER COLUMN {quote_ident(column)} SET STORAGE EXTERNAL")
    return statements


def sink_table_sql(table: str, workload: Workload) -> List[str]:
    """CREATE TABLE for ``--consumer``'s sink: ``op`` (I/U/D) and the workload's columns, without
    constraints (every change's row is appended: updates and deletes repeat ids)."""
    columns = [("op", "text")] + [(name, re.sub(r"\s+(PRIMARY KEY|NOT NULL)\b", "", sql_type, flags=re.I))
                                  for name, sql_type in workload.columns]
    return create_table_sql(table, columns)[:1]


def insert_sql(workload: Workload, table: str) -> str:
    """INSERT of the workload's rows with ids in ``[%s, %s]`` (generate_series)."""
    cols = ", ".join(quote_ident(name) for name, _ in workload.columns)
    return (f"INSERT INTO {quote_ident(table)} ({cols}) SELECT {', '.join(workload.insert_exprs)} "
            "FROM generate_series(%s::bigint, %s::bigint) g")


def preload(cur: Any, workload: Workload, table: str, changes: int) -> int:
    """Load the rows the updates and deletes will hit (before any slot exists); returns how many."""
    _, updates, deletes = workload.plan(changes)
    rows = updates + deletes
    if rows:
        chunk = 200_000 if workload.rows_divisor == 1 else 2_000
        for start in range(1, rows + 1, chunk):
            cur.execute(insert_sql(workload, table), (start, min(rows, start + chunk - 1)))
    cur.execute(f"ANALYZE {quote_ident(table)}")
    return rows


def _split(total: int, parts: int) -> List[int]:
    """``total`` split into ``parts`` near-equal non-negative integers."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def wait_flushed(cur: Any, target: str, timeout: float = 30.0) -> None:
    """Wait until WAL up to ``target`` is flushed, so no reader waits for the WAL writer.

    With ``synchronous_commit = off`` (the sandbox's setting) the last commit reaches disk,
    and so the walsender, up to ``wal_writer_delay`` later: the first reader would pay that.
    """
    deadline = time.monotonic() + timeout
    while True:
        cur.execute("SELECT pg_current_wal_flush_lsn() >= %s::pg_lsn", (target,))
        if cur.fetchone()[0] or time.monotonic() > deadline:
            return
        time.sleep(0.01)


def generate(conn: Any, workload: Workload, table: str, changes: int, tx_mode: str, tx_size: int,
             progress: Optional[ProgressFn] = None) -> GeneratedChanges:
    """Make the workload's row changes on ``conn`` (autocommit off here) and return the exact count.

    Changes come in chunks of ``tx_size`` (inserts, updates and deletes interleaved chunk by
    chunk); ``small`` commits after every chunk, ``big`` once at the end (its chunks are only
    a way to interleave the kinds of change). The target LSN is the WAL insert position after
    the last commit: every reader is done once its slot is confirmed up to it.
    """
    if tx_mode not in TX_MODES:
        raise ValueError(f"unknown transaction mode {tx_mode!r}")
    inserts, updates, deletes = workload.plan(changes)
    preloaded = updates + deletes
    chunk_size = tx_size if tx_mode == "small" else max(tx_size, 10_000)
    chunks = max(1, -(-changes // chunk_size))
    ins_parts, upd_parts, del_parts = _split(inserts, chunks), _split(updates, chunks), _split(deletes, chunks)
    inserting = insert_sql(workload, table)
    quoted = quote_ident(table)
    update_sql = f"UPDATE {quoted} SET {workload.update_set} WHERE id BETWEEN %s AND %s"
    delete_sql = f"DELETE FROM {quoted} WHERE id BETWEEN %s AND %s"
    next_insert = preloaded + 1
    next_update = 1
    next_delete = updates + 1
    counts = {"Insert": 0, "Update": 0, "Delete": 0}
    transactions = 0
    started = time.perf_counter()
    conn.autocommit = False
    try:
        with conn.cursor() as cur:
            for index in range(chunks):
                if ins_parts[index]:
                    cur.execute(inserting, (next_insert, next_insert + ins_parts[index] - 1))
                    counts["Insert"] += cur.rowcount
                    next_insert += ins_parts[index]
                if upd_parts[index]:
                    cur.execute(update_sql, (next_update, next_update + upd_parts[index] - 1))
                    counts["Update"] += cur.rowcount
                    next_update += upd_parts[index]
                if del_parts[index]:
                    cur.execute(delete_sql, (next_delete, next_delete + del_parts[index] - 1))
                    counts["Delete"] += cur.rowcount
                    next_delete += del_parts[index]
                if tx_mode == "small":
                    conn.commit()
                    transactions += 1
                if progress is not None:
                    progress(ins_parts[index] + upd_parts[index] + del_parts[index])
            if tx_mode == "big":
                conn.commit()
                transactions += 1
            cur.execute("SELECT pg_current_wal_insert_lsn()::text")
            (target,) = cur.fetchone()
            conn.commit()
            wait_flushed(cur, target)
            conn.commit()
    except BaseException:
        conn.rollback()
        raise
    finally:
        conn.autocommit = True
    total = sum(counts.values())
    if total != changes:
        log.warning("workload %s made %d row changes, planned %d", workload.name, total, changes)
    return GeneratedChanges(total, transactions, target, time.perf_counter() - started, counts)


#: The latency generator commits a transaction at most this often (200 transactions/s).
LATENCY_TICK_S = 0.005


def generate_latency_rows(conn: Any, table: str, rate: float, seconds: float, first_id: int = 1,
                          should_stop: Callable[[], bool] = lambda: False,
                          tick: float = LATENCY_TICK_S) -> GeneratedChanges:
    """Insert ``rate`` rows/s for ``seconds``, rate-controlled, each row stamped with the client's
    clock (microseconds) right before its autocommitted INSERT.

    Transactions are due every ``max(1/rate, tick)`` seconds, each with the rows due by then: at
    200 rows/s and below one row per transaction, above it ``rate * tick`` rows per transaction
    (1,000 rows/s: 5; 20,000 rows/s: 100). A generator that falls behind catches up in larger
    transactions; what it achieved is in the result (``seconds`` is the generation's span).

    The stamp is the bench's own clock, the same clock the reader reads when the delivery
    report arrives, so the latency is right even when the database is on another host. The
    session commits with ``synchronous_commit = on`` (PostgreSQL's default): with it off, as in
    the sandbox, the walsender only sees a commit when the WAL writer flushes it (up to
    ``wal_writer_delay``, 200 ms), which would be measured as replication latency.
    """
    total = max(1, int(rate * seconds))
    interval = max(1.0 / rate, tick)
    sql = (f"INSERT INTO {quote_ident(table)} (id, stamp_us, v) "
           "SELECT g, %s, g - %s FROM generate_series(%s::bigint, %s::bigint) g")
    conn.autocommit = True
    started = time.perf_counter()
    made = transactions = 0
    with conn.cursor() as cur:
        cur.execute("SET synchronous_commit TO on")
        while made < total and not should_stop():
            due_at = started + transactions * interval
            delay = due_at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            due = min(total, max(made + 1, int(round((time.perf_counter() - started) * rate)) + 1))
            first = first_id + made
            cur.execute(sql, (time.time_ns() // 1000, first_id, first, first + due - made - 1))
            made = due
            transactions += 1
        elapsed = time.perf_counter() - started
        cur.execute("RESET synchronous_commit")
        cur.execute("SELECT pg_current_wal_insert_lsn()::text")
        (target,) = cur.fetchone()
    return GeneratedChanges(made, transactions, target, elapsed, {"Insert": made})
