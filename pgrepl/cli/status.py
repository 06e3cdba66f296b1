"""``pgrepl status``: the server's logical slots, with pgrepl's own state where there is some.

Per slot: plugin, database, the walsender's pid and application, confirmed LSN, retained WAL,
``wal_status``, ``safe_wal_size``, lag; the producer holding the slot's lease (pgrepl's
advisory lock); with Kafka (``--brokers`` or ``--config``), the last position and writer from
the slot history topic.
"""

from __future__ import annotations

import argparse
from typing import Any, Dict, List, Optional

import psycopg2.extensions

from pgrepl.cli.common import Target, add_target_options, identify, print_json, print_table, resolve_target
from pgrepl.lsn import format_lsn

COLUMNS = ("slot", "plugin", "database", "active_pid", "holder", "confirmed_lsn", "retained_wal", "wal_status",
           "safe_wal_size", "lag", "lease_holder", "history_lsn", "history_instance")


def add_parser(commands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    status = commands.add_parser("status", help="list logical replication slots, their WAL and pgrepl's state")
    add_target_options(status, kafka=True)
    status.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    target = resolve_target(args)
    rows = slot_rows(target)
    if args.json:
        print_json(rows)
    elif rows:
        print_table(rows, COLUMNS)
    else:
        print("no logical replication slots")
    return 0


def slot_rows(target: Target) -> List[Dict[str, Any]]:
    """One dict per logical slot of the server (sizes in bytes, LSNs as text)."""
    from pgrepl.postgres.connect import connect
    from pgrepl.postgres.slot import list_slots, slot_usage, wal_position

    assert target.dsn is not None
    conn = connect(target.dsn, application_name="pgrepl/cli")
    try:
        position, _ = wal_position(conn)
        slots = [s for s in list_slots(conn) if s.slot_type == "logical"]
        rows = []
        for info in slots:
            retained, lag = slot_usage(info, position)
            rows.append({
                "slot": info.name, "plugin": info.plugin, "database": info.database, "active_pid": info.active_pid,
                "holder": _application(conn, info.active_pid),
                "confirmed_lsn": format_lsn(info.confirmed_flush_lsn) if info.confirmed_flush_lsn else None,
                "retained_wal": retained, "wal_status": info.wal_status, "safe_wal_size": info.safe_wal_size,
                "lag": lag, "lease_holder": _lease_holder(conn, info.name), "invalidated": info.invalidated,
            })
    finally:
        conn.close()
    if target.brokers and rows:
        _add_history(target, rows)
    return rows


def _application(conn: psycopg2.extensions.connection, pid: Optional[int]) -> Optional[str]:
    if pid is None:
        return None
    with conn.cursor() as cur:
        cur.execute("SELECT application_name FROM pg_stat_activity WHERE pid = %s", (pid,))
        row = cur.fetchone()
    return str(row[0]) if row and row[0] else None


def _lease_holder(conn: psycopg2.extensions.connection, slot: str) -> Optional[str]:
    """The application (``pgrepl/<instance>/lease``) and pid holding pgrepl's lease on ``slot``."""
    from pgrepl.postgres.lease import LOCK_CLASS

    with conn.cursor() as cur:
        cur.execute("SELECT l.pid, a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
                    "WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2 AND l.classid = %s::int4::oid "
                    "AND l.objid = hashtext(%s)::oid AND l.database = (SELECT oid FROM pg_database "
                    "WHERE datname = current_database())", (LOCK_CLASS, slot))
        row = cur.fetchone()
    return f"{row[1] or '?'} (pid {row[0]})" if row else None


def _add_history(target: Target, rows: List[Dict[str, Any]]) -> None:
    """The slot history's last position for each slot of this server and database."""
    from pgrepl.producer.history import SlotHistory, history_key

    assert target.dsn is not None and target.brokers is not None
    system_identifier, _ = identify(target.dsn)
    records = SlotHistory(None, target.brokers, target.kafka, target.history_topic).load_all()
    for row in rows:
        record = records.get(history_key(system_identifier, str(row["database"]), row["slot"]))
        row["history_lsn"] = format_lsn(record.confirmed_lsn) if record else None
        row["history_instance"] = record.instance if record else None
