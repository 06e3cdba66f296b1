"""Record the golden pgoutput captures in tests/data/ from a real PostgreSQL.

Run: ``python tests/data/record_captures.py`` (starts a throwaway sandbox PostgreSQL) or
``python tests/data/record_captures.py --dsn DSN`` (a server with wal_level=logical).

Writes, for each scenario, ``<name>.pgcap.gz`` (every XLogData payload of the stream, see
pgrepl.capture) and ``<name>.expected.jsonl.gz``: the records the decoder must produce, built
independently of it: values come from ``SELECT col::text`` snapshots taken around each
statement, positions from the Begin messages, JSON from ``json.dumps`` (serde_json's format).
"""

from __future__ import annotations

import argparse
import gzip
import json
import select
import struct
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import psycopg2
import psycopg2.extras

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from pgrepl.testing.capture import write_capture  # noqa: E402

Row = Tuple[Optional[str], ...]
TOPIC_MAP = {
    "types": {"name": "types_topic", "partition_key": ["id"]},
    "notes": {"name": "notes_topic", "partition_key": ["owner", "id"]},
    "inventory": {"name": "inventory_topic", "partition_key": ["organization_id"]},
}

SETUP = [
    """CREATE TABLE types (id int PRIMARY KEY, i int, b bigint, n numeric, t text, u uuid, ts timestamptz,
         j jsonb, arr int[], tarr text[], by bytea, bo boolean, f float8, d date, big text)""",
    "ALTER TABLE types ALTER COLUMN big SET STORAGE EXTERNAL",
    "ALTER TABLE types REPLICA IDENTITY FULL",
    "CREATE TABLE notes (id int PRIMARY KEY, owner text NOT NULL, body text)",
    "ALTER TABLE notes REPLICA IDENTITY FULL",
    """CREATE TABLE inventory (id bigint PRIMARY KEY, organization_id uuid NOT NULL, name text, quantity int,
         price numeric(12,2), updated_at timestamptz, attrs jsonb)""",
    "ALTER TABLE inventory REPLICA IDENTITY FULL",
    "CREATE PUBLICATION golden FOR TABLE types, notes, inventory",
]

NASTY = "quote \" backslash \\ slash / newline \n cr \r tab \t bs \b ff \f nul-less ctrl \x01\x1f del \x7f é ß € 中文 😀 \u2028"

# Each transaction is a list of (table, sql, params).
GOLDEN_TRANSACTIONS: List[List[Tuple[str, str, Any]]] = [
    [("types", """INSERT INTO types VALUES (1, -2147483648, 9223372036854775807, 12345678901234567890.123456789, %s,
                   'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '2026-11-24 01:02:03.456789+00', %s, '{1,NULL,3}',
                   '{"a b","c\\"d",NULL,""}', '\\x00ff10', true, 1.5e-300, '2026-02-28', %s)""",
      (NASTY, json.dumps({"k": [1, 2.5, None, True, "x\ny"], "é": {"nested": "\"q\""}}), "B" * 3000)),
     ("types", "INSERT INTO types (id, t, bo) VALUES (2, '', false), (3, NULL, NULL)", None)],
    # update leaving the TOASTed column unchanged (its new value arrives as 'u')
    [("types", "UPDATE types SET i = 7, t = 'changed' WHERE id = 1", None)],
    # empty string -> NULL and back, and a key change
    [("types", "UPDATE types SET t = NULL WHERE id = 2", None),
     ("types", "UPDATE types SET t = '' WHERE id = 3", None),
     ("types", "UPDATE types SET id = 4 WHERE id = 3", None)],
    # a transaction over two tables
    [("notes", "INSERT INTO notes VALUES (1, 'ann', 'first'), (2, 'bob', NULL)", None),
     ("types", "DELETE FROM types WHERE id = 2", None),
     ("notes", "UPDATE notes SET body = 'second' WHERE id = 1", None),
     ("notes", "DELETE FROM notes WHERE id = 2", None)],
    # schema changes mid-stream
    [("notes", "ALTER TABLE notes ADD COLUMN tags text[] DEFAULT '{x}'", None),
     ("notes", "INSERT INTO notes VALUES (3, 'cy', 'third', '{y,z}')", None)],
    [("notes", "UPDATE notes SET tags = NULL WHERE id = 1", None)],
    [("notes", "ALTER TABLE notes DROP COLUMN body", None),
     ("notes", "INSERT INTO notes VALUES (4, 'dee', '{}')", None),
     ("notes", "DELETE FROM notes WHERE id = 3", None)],
    # the big value itself changes, then the row goes
    [("types", "UPDATE types SET big = repeat('C', 4000) WHERE id = 1", None)],
    [("types", "DELETE FROM types WHERE id = 1", None)],
]

INVENTORY_ROWS = 20_000


def inventory_transactions() -> List[List[Tuple[str, str, Any]]]:
    """The benchmark stream: the 7-column inventory row, inserts then updates and deletes."""
    ins = """INSERT INTO inventory
             SELECT g, md5('org' || (g %% 50))::uuid, 'widget ' || g || ' "deluxe"', g %% 1000,
                    (g %% 10000) / 100.0, '2026-11-24 02:00:00+00'::timestamptz + g * interval '1 second',
                    jsonb_build_object('color', 'red', 'size', g %% 7, 'tags', jsonb_build_array('a', 'b'))
             FROM generate_series(%s, %s) g"""
    txs = [[("inventory", ins, (start, start + 999))] for start in range(1, INVENTORY_ROWS * 8 // 10, 1000)]
    txs.append([("inventory", "UPDATE inventory SET quantity = quantity + 1 WHERE id %% 5 = 0", ())])
    txs.append([("inventory", "DELETE FROM inventory WHERE id %% 9 = 0", ())])
    return txs


def columns(cur: Any, table: str) -> List[str]:
    cur.execute("SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped "
                "ORDER BY attnum", (table,))
    return [r[0] for r in cur.fetchall()]


def snapshot(cur: Any, table: str) -> Tuple[List[str], Dict[str, Row], Dict[str, Tuple[int, int]]]:
    cols = columns(cur, table)
    # format('%s', x) uses the type's output function, as pgoutput does (x::text differs for bool)
    exprs = ", ".join(f"CASE WHEN {c} IS NULL THEN NULL ELSE format('%s', {c}) END" for c in cols)
    cur.execute(f"SELECT ctid::text, {exprs} FROM {table}")
    rows = cur.fetchall()
    ids = [r[cols.index("id") + 1] for r in rows]
    ctids = {i: tuple(int(x) for x in r[0].strip("()").split(",")) for i, r in zip(ids, rows)}
    return cols, {i: tuple(r[1:]) for i, r in zip(ids, rows)}, ctids


def scan_order(before_ctids: Dict[str, Tuple[int, int]]) -> Any:
    """Sort key: UPDATE and DELETE visit old rows in physical (ctid) order; inserts come in id order."""
    return lambda key: (0, before_ctids[key]) if key in before_ctids else (1, (int(key), 0))


def ops_between(cols: List[str], before: Dict[str, Row], after: Dict[str, Row], sql: str,
                ctids: Dict[str, Tuple[int, int]]) -> List[Tuple[str, Any]]:
    """Row changes of one statement, in the order PostgreSQL makes them."""
    ops: List[Tuple[str, Any]] = []
    if sql.lstrip().upper().startswith("UPDATE") and len(set(before) ^ set(after)) == 2 and len(before) == len(after):
        old_key = (set(before) - set(after)).pop()
        new_key = (set(after) - set(before)).pop()
        return [("Update", [list(before[old_key]), list(after[new_key])])]
    for key in sorted(set(before) | set(after), key=scan_order(ctids)):
        old, new = before.get(key), after.get(key)
        if old is None and new is not None:
            ops.append(("Insert", list(new)))
        elif new is None and old is not None:
            ops.append(("Delete", list(old)))
        elif old != new and old is not None and new is not None:
            ops.append(("Update", [list(old), list(new)]))
    return ops


def record(dsn: str, name: str, transactions: List[List[Tuple[str, str, Any]]], out_dir: Path) -> None:
    conn = psycopg2.connect(dsn, options="-c TimeZone=UTC")
    cur = conn.cursor()
    slot = f"golden_{name}"
    cur.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,))
    conn.commit()
    expected: List[Tuple[int, Dict[str, Any]]] = []  # (transaction number, record without lsn)
    for number, tx in enumerate(transactions):
        seq = 0
        for table, sql, params in tx:
            if sql.lstrip().upper().startswith("ALTER"):
                cur.execute(sql, params)
                continue
            cols, before, ctids = snapshot(cur, table)
            cur.execute(sql, params)
            _, after, _ = snapshot(cur, table)
            for kind, payload in ops_between(cols, before, after, sql, ctids):
                info = TOPIC_MAP[table]
                row = payload[1] if kind == "Update" else payload
                key = "".join(row[cols.index(c)] for c in info["partition_key"])
                expected.append((number, {"topic": info["name"], "key": key, "record": {
                    "table_name": table, "col_names": cols, "lsn": None, "seq_id": seq, "op": {kind: payload}}}))
                seq += 1
        conn.commit()

    rconn = psycopg2.connect(dsn, connection_factory=psycopg2.extras.LogicalReplicationConnection,
                             options="-c TimeZone=UTC")
    rcur = rconn.cursor()
    rcur.start_replication(slot_name=slot, decode=False, options={"proto_version": "1", "publication_names": "golden"})
    messages: List[Tuple[int, bytes]] = []
    commit_lsns: List[int] = []
    commits = 0
    deadline = time.monotonic() + 120
    while commits < len(transactions):
        if time.monotonic() > deadline:
            raise TimeoutError(f"saw {commits} of {len(transactions)} commits")
        msg = rcur.read_message()
        if msg is None:
            select.select([rcur], [], [], 1)
            continue
        messages.append((msg.data_start, bytes(msg.payload)))
        if msg.payload[:1] == b"B":
            commit_lsns.append(struct.unpack_from(">Q", msg.payload, 1)[0])
        elif msg.payload[:1] == b"C":
            commits += 1
    rconn.close()
    for _ in range(100):  # the walsender lingers a moment after the client goes
        cur.execute("SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s", (slot,))
        if cur.fetchone()[0] is None:
            break
        time.sleep(0.1)
    cur.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
    conn.commit()
    conn.close()

    count = write_capture(out_dir / f"{name}.pgcap.gz", messages)
    with gzip.open(out_dir / f"{name}.expected.jsonl.gz", "wt", encoding="utf-8", compresslevel=9) as out:
        for number, item in expected:
            item["record"]["lsn"] = commit_lsns[number]
            out.write(json.dumps(item, ensure_ascii=False, separators=(",", ":")) + "\n")
    print(f"{name}: {count} messages, {len(expected)} records, {len(transactions)} transactions")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", help="a PostgreSQL with wal_level=logical (default: a sandbox server)")
    args = parser.parse_args()

    def run(dsn: str) -> None:
        conn = psycopg2.connect(dsn)
        conn.autocommit = True
        with conn.cursor() as cur:
            for statement in SETUP:
                cur.execute(statement)
        conn.close()
        record(dsn, "golden", GOLDEN_TRANSACTIONS, HERE)
        record(dsn, "inventory", inventory_transactions(), HERE)

    if args.dsn:
        run(args.dsn)
    else:
        from pgrepl.testing import LocalPostgres

        with LocalPostgres() as pg:
            run(pg.dsn)


if __name__ == "__main__":
    main()
