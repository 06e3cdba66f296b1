"""Logical replication slots: name rules, inspection, creation, health and removal.

``pg_replication_slots`` grows columns with the server version (``wal_status`` and
``safe_wal_size`` in 13, ``conflicting`` in 16, ``failover``, ``synced`` and
``invalidation_reason`` in 17); ``SlotInfo`` reads whichever the server has.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import psycopg2
import psycopg2.errors
import psycopg2.extensions

from pgrepl.errors import ConfigError, SlotLostError, first_line
from pgrepl.lsn import format_lsn, parse_lsn
from pgrepl.postgres.connect import query_one

log = logging.getLogger(__name__)

_SLOT_NAME = re.compile(r"^[a-z0-9_]{1,63}$")


def validate_slot_name(slot: str) -> None:
    """PostgreSQL's own rule for slot names: 1-63 chars of lower-case letters, digits and '_'."""
    if not isinstance(slot, str) or not _SLOT_NAME.match(slot):
        raise ConfigError(
            f"invalid replication slot name {slot!r}: use 1-63 lower-case letters, digits and underscores")


@dataclass(frozen=True)
class SlotInfo:
    """An existing replication slot as pg_replication_slots describes it (None: column absent or NULL)."""

    name: str
    plugin: Optional[str]
    slot_type: str
    database: Optional[str]
    active_pid: Optional[int]
    confirmed_flush_lsn: Optional[int]
    restart_lsn: Optional[int] = None
    wal_status: Optional[str] = None          # reserved / extended / unreserved / lost (13+)
    safe_wal_size: Optional[int] = None       # bytes of WAL that can still be written before it is lost (13+)
    conflicting: Optional[bool] = None        # invalidated by a recovery conflict (16+)
    invalidation_reason: Optional[str] = None  # why it was invalidated (17+)
    failover: Optional[bool] = None           # synchronized to standbys (17+)
    synced: Optional[bool] = None             # a standby's synchronized copy (17+)

    @property
    def invalidated(self) -> Optional[str]:
        """Why the slot can no longer be used, or None."""
        if self.invalidation_reason:
            return f"invalidated ({self.invalidation_reason})"
        if self.wal_status == "lost":
            return "invalidated (wal_status lost: the WAL it needed was removed, see max_slot_wal_keep_size)"
        if self.conflicting:
            return "invalidated by a recovery conflict on the standby"
        return None


def get_slot(conn: psycopg2.extensions.connection, slot: str) -> Optional[SlotInfo]:
    """The slot as pg_replication_slots shows it, or None."""
    found = list_slots(conn, slot)
    return found[0] if found else None


def list_slots(conn: psycopg2.extensions.connection, slot: Optional[str] = None) -> List[SlotInfo]:
    """Every replication slot (or the one named ``slot``), as pg_replication_slots shows them, by name."""
    with conn.cursor() as cur:
        if slot is None:
            cur.execute("SELECT * FROM pg_replication_slots ORDER BY slot_name")
        else:
            cur.execute("SELECT * FROM pg_replication_slots WHERE slot_name = %s", (slot,))
        rows = cur.fetchall()
        columns = [d[0] for d in cur.description or ()]
    return [_slot_info(dict(zip(columns, row))) for row in rows]


def _slot_info(values: Dict[str, Any]) -> SlotInfo:
    def lsn(name: str) -> Optional[int]:
        text = values.get(name)
        return parse_lsn(str(text)) if text else None

    return SlotInfo(
        name=values["slot_name"], plugin=values.get("plugin"), slot_type=values["slot_type"],
        database=values.get("database"), active_pid=values.get("active_pid"),
        confirmed_flush_lsn=lsn("confirmed_flush_lsn"), restart_lsn=lsn("restart_lsn"),
        wal_status=values.get("wal_status"), safe_wal_size=values.get("safe_wal_size"),
        conflicting=values.get("conflicting"), invalidation_reason=values.get("invalidation_reason"),
        failover=values.get("failover"), synced=values.get("synced"))


def wal_position(conn: psycopg2.extensions.connection) -> Tuple[int, bool]:
    """The server's WAL position and whether it is a standby: ``pg_current_wal_lsn()`` on a primary,
    ``pg_last_wal_replay_lsn()`` on a standby (where slots are measured against what was replayed)."""
    standby, position = query_one(
        conn, "SELECT pg_is_in_recovery(), (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() "
              "ELSE pg_current_wal_lsn() END)::text")
    return (parse_lsn(str(position)) if position else 0), bool(standby)


def slot_usage(info: SlotInfo, position: int) -> Tuple[Optional[int], Optional[int]]:
    """(retained WAL, lag) in bytes at WAL ``position``: what the slot keeps on disk (from its
    ``restart_lsn``) and how far its consumer is behind (from ``confirmed_flush_lsn``)."""
    retained = max(position - info.restart_lsn, 0) if info.restart_lsn is not None else None
    lag = max(position - info.confirmed_flush_lsn, 0) if info.confirmed_flush_lsn is not None else None
    return retained, lag


def server_version(conn: psycopg2.extensions.connection) -> int:
    """``server_version_num``: 150008 for 15.8."""
    return int(conn.server_version)


def create_slot(conn: psycopg2.extensions.connection, slot: str, *, failover: Optional[bool] = None) -> SlotInfo:
    """Create a pgoutput slot (on PostgreSQL 17+ a failover slot, unless ``failover`` is False or the
    server is a standby, where a slot cannot be one). A slot created concurrently by another
    producer is taken as it is.
    """
    validate_slot_name(slot)
    version = server_version(conn)
    (standby,) = query_one(conn, "SELECT pg_is_in_recovery()")
    if failover and (version < 170000 or standby):
        raise ConfigError("failover slots need PostgreSQL 17 or later and a primary; this server is "
                          f"{'a standby' if standby else version // 10000}: set failover=False")
    use_failover = version >= 170000 and not standby if failover is None else failover
    try:
        if version >= 170000:
            (lsn,) = query_one(conn, "SELECT lsn::text FROM pg_create_logical_replication_slot(%s, 'pgoutput', "
                                     "false, false, %s)", (slot, use_failover))
        else:
            (lsn,) = query_one(conn, "SELECT lsn::text FROM pg_create_logical_replication_slot(%s, 'pgoutput')",
                               (slot,))
    except psycopg2.errors.DuplicateObject:
        log.info("replication slot %s was created concurrently; using it", slot)
    except psycopg2.Error as exc:
        raise ConfigError(f"cannot create replication slot {slot!r}: {first_line(exc)}") from None
    else:
        log.info("created logical replication slot %s (pgoutput%s) at %s", slot,
                 ", failover" if use_failover else "", lsn)
    info = get_slot(conn, slot)
    if info is None:
        raise ConfigError(f"replication slot {slot!r} disappeared right after it was created")
    return info


def check_slot(info: SlotInfo, database: str, last_confirmed: Optional[int] = None) -> None:
    """The slot must be a usable logical pgoutput slot of ``database``.

    ``SlotLostError`` when it was invalidated (the changes it held are gone), ``ConfigError``
    when it is some other kind of slot.
    """
    if info.slot_type != "logical" or info.plugin != "pgoutput":
        raise ConfigError(
            f"replication slot {info.name!r} exists but is {info.slot_type} with plugin {info.plugin!r}; "
            "pgrepl needs a logical pgoutput slot: choose another slot name or drop this one")
    if info.database != database:
        raise ConfigError(
            f"replication slot {info.name!r} belongs to database {info.database!r}, not {database!r}; "
            "connect to that database or choose another slot name")
    reason = info.invalidated
    if reason is not None:
        raise SlotLostError(slot_lost_message(info.name, reason, last_confirmed or info.confirmed_flush_lsn),
                            info.name, last_confirmed or info.confirmed_flush_lsn)


def slot_lost_message(slot: str, what: str, last_confirmed: Optional[int]) -> str:
    """One line: which slot, what happened, where pgrepl was, and the ways out."""
    where = f"pgrepl last confirmed {format_lsn(last_confirmed)} on it" if last_confirmed else "pgrepl streamed from it"
    return (f"replication slot {slot} is {what}; {where}, and the changes after that are not in Kafka. "
            "Ways out: start with on_slot_loss='resnapshot' (a new slot and a snapshot of every published "
            f"table), or, accepting the gap, forget the slot's history (pgrepl slot forget {slot} --config FILE, "
            "with the producer's config file) and start again")


def drop_slot(conn: psycopg2.extensions.connection, slot: str, *, timeout: float = 15.0) -> bool:
    """Drop a slot once no walsender streams from it; True when it existed.

    A walsender lingers for a moment after its client goes, so an active slot is waited for;
    a holder still there halfway through ``timeout`` is terminated. ``TimeoutError`` when the
    slot is still in use at the end.
    """
    deadline = time.monotonic() + timeout
    terminated = False
    with conn.cursor() as cur:
        while True:
            cur.execute("SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s", (slot,))
            row = cur.fetchone()
            if row is None:
                return False
            if row[0] is None:
                try:
                    cur.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
                    return True
                except psycopg2.errors.ObjectInUse:
                    pass  # a walsender took it again in between: go round
                except psycopg2.errors.UndefinedObject:
                    return False
            elif not terminated and time.monotonic() > deadline - timeout / 2:
                cur.execute("SELECT pg_terminate_backend(%s)", (row[0],))
                terminated = True
            if time.monotonic() >= deadline:
                raise TimeoutError(f"replication slot {slot} still in use after {timeout:.0f} s")
            time.sleep(0.05)
