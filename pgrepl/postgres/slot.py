"""Logical replication slots: name rules, inspection, creation and removal."""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from typing import Optional

import psycopg2
import psycopg2.errors
import psycopg2.extensions

from pgrepl.errors import ConfigError, first_line
from pgrepl.lsn import parse_lsn
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
    """An existing replication slot as pg_replication_slots describes it."""

    name: str
    plugin: Optional[str]
    slot_type: str
    database: Optional[str]
    active_pid: Optional[int]
    confirmed_flush_lsn: Optional[int]


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
    (database,) = query_one(conn, "SELECT current_database()")
    info = get_slot(conn, slot)
    if info is None:
        try:
            (lsn,) = query_one(conn, "SELECT lsn::text FROM pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,))
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
