"""Who may stream from a slot: a lease, built on PostgreSQL itself, so that producers take turns, not fight.

Any number of producers may run for one slot. Each holds a connection next to its replication
connection and asks for a session advisory lock keyed by the slot's name: the one holding it
is *active* and streams; the others are *standbys* blocked on the lock. When the active one
dies its connection closes (at once for a killed process; within seconds for a dead host,
thanks to the server-side keepalives ``connect`` asks for), the server releases the lock and
one standby gets it.

A producer's connections are named ``pgrepl/<instance>``, so a standby that takes over can
tell whose walsender still holds the slot: its own from an earlier session, or another pgrepl
producer's (which lost the lease: dead, or cut off and about to notice) are terminated after a
short grace; a holder that is not a pgrepl producer is never terminated, only waited for.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Optional

import psycopg2
import psycopg2.errors
import psycopg2.extensions

from pgrepl._runtime import Waker
from pgrepl.postgres.connect import close_quietly, connect, query_one
from pgrepl.postgres.slot import SlotInfo, get_slot

log = logging.getLogger(__name__)

#: First key of the two-key advisory lock: "pgrp" as an int4, so pgrepl's locks are recognizable.
LOCK_CLASS = 0x70677270


class LeaseLost(Exception):
    """The lease's connection is gone: another producer may take over, so this one must stop streaming."""


class SlotLease:
    """The advisory lock that makes one producer the slot's only streamer."""

    def __init__(self, dsn: str, slot: str, instance: str) -> None:
        self.dsn = dsn
        self.slot = slot
        self.instance = instance
        self.application_name = f"pgrepl/{instance}"
        self._conn: Optional[psycopg2.extensions.connection] = None

    @property
    def connection(self) -> psycopg2.extensions.connection:
        """The lease's connection (autocommit): also the producer's connection for queries."""
        if self._conn is None:
            raise LeaseLost(f"lease on slot {self.slot} is not held")
        return self._conn

    @property
    def held(self) -> bool:
        """Whether this producer holds the lease (as far as it knows: ``check`` makes sure)."""
        return self._conn is not None

    def acquire(self, waker: Waker, on_wait: Optional[Callable[[], None]] = None) -> bool:
        """Block until the lease is ours (True) or ``waker`` is set (False).

        ``psycopg2.OperationalError`` when the server cannot be reached (the caller retries).
        ``on_wait`` is called once if another producer holds it (this one is then a standby).
        """
        conn = connect(self.dsn, application_name=f"{self.application_name}/lease")
        try:
            with conn.cursor() as cur:
                cur.execute("SET lock_timeout = '1s'")
                waited = False
                while not waker.is_set:
                    try:
                        cur.execute("SELECT pg_advisory_lock(%s, hashtext(%s))", (LOCK_CLASS, self.slot))
                    except psycopg2.errors.LockNotAvailable:
                        if not waited and on_wait is not None:
                            on_wait()
                        waited = True
                        continue
                    cur.execute("SET lock_timeout = 0")
                    self._conn = conn
                    return True
        except BaseException:
            conn.close()
            raise
        conn.close()
        return False

    def check(self) -> None:
        """``LeaseLost`` unless the lease's connection is alive (one round trip)."""
        conn = self._conn
        if conn is None:
            raise LeaseLost(f"lease on slot {self.slot} is not held")
        try:
            query_one(conn, "SELECT 1")
        except psycopg2.Error as exc:
            self.release()
            raise LeaseLost(f"lost the lease on slot {self.slot}: {str(exc).strip() or type(exc).__name__}") from None

    def release(self) -> None:
        """Give the lease up (closing its connection releases the lock)."""
        conn, self._conn = self._conn, None
        close_quietly(conn)

    def wait_until_free(self, conn: psycopg2.extensions.connection, waker: Waker, grace: float = 4.0) -> Optional[SlotInfo]:
        """Wait for the slot to have no walsender, freeing it from holders that lost the lease.

        Returns the slot (None if it does not exist, or on stop). Holds only while this producer
        holds the lease, which is what makes a pgrepl holder provably not the rightful one.
        """
        first_seen: Optional[float] = None
        last_log = 0.0
        while not waker.is_set:
            info = get_slot(conn, self.slot)
            if info is None or info.active_pid is None:
                return info
            holder = self._holder_name(conn, info.active_pid)
            now = time.monotonic()
            first_seen = first_seen if first_seen is not None else now
            ours = holder == self.application_name
            pgrepl = holder is not None and holder.startswith("pgrepl/")
            if ours or (pgrepl and now - first_seen >= grace):
                log.warning("slot %s is held by walsender pid %d of %s, which %s; terminating it", self.slot,
                            info.active_pid, holder, "is this producer's earlier session" if ours else
                            "does not hold the lease (dead, or cut off from the server)")
                query_one(conn, "SELECT pg_terminate_backend(%s)", (info.active_pid,))
            elif now - last_log >= 30:
                log.warning("slot %s is in use by pid %d (%s); waiting for it to be released", self.slot,
                            info.active_pid, holder or "unknown application")
                last_log = now
            waker.wait(0.2)
        return None

    @staticmethod
    def _holder_name(conn: psycopg2.extensions.connection, pid: int) -> Optional[str]:
        with conn.cursor() as cur:
            cur.execute("SELECT application_name FROM pg_stat_activity WHERE pid = %s", (pid,))
            row = cur.fetchone()
        return str(row[0]) if row and row[0] else None
