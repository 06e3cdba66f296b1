"""``LocalStandby``: a physical streaming standby of a running ``LocalPostgres``, promotable, failover-slot ready.

Made by ``primary.start_standby()``. ``pg_basebackup`` copies the running primary into the
standby's own sandbox directory, creating a physical replication slot for it on the primary
(``-C -S``; the standby streams from it, so the primary keeps the WAL the standby still
needs); the standby then starts with ``standby.signal``, ``primary_conninfo``,
``primary_slot_name`` and ``hot_standby = on``, and :meth:`LocalStandby.start` returns once
it streams. :meth:`LocalStandby.promote` makes it a primary (``pg_promote``).

Logical failover slots (PostgreSQL 17+, on by default there): the standby runs with
``sync_replication_slots = on`` and ``hot_standby_feedback = on`` (and ``dbname`` in
``primary_conninfo``), and the primary's ``synchronized_standby_slots`` names the standby's
physical slot, so a logical slot created on the primary with ``failover = true`` appears on
the standby as ``synced`` and is usable after promotion; logical walsenders on the primary
never send a change the standby has not received.

The standby is a ``LocalPostgres`` of its own: the same orphan guarantees (sweep, death signal,
atexit) apply, ``pg_basebackup`` dies with its parent like ``initdb``. Discarding the standby
(``stop()``) removes its slot from ``synchronized_standby_slots`` and drops its physical slot on
the primary if that still runs, so a gone standby never holds the primary's WAL or its
failover-slot walsenders.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from typing import Any, Dict, List, Mapping, Optional

from pgrepl.errors import ConfigError
from pgrepl.testing._service import SandboxError, logger
from pgrepl.testing.postgres import LocalPostgres

#: First major version with logical failover slots (``failover``, ``sync_replication_slots``).
FAILOVER_SLOTS_MAJOR = 17
_SYNCED_SLOTS = "synchronized_standby_slots"


class LocalStandby(LocalPostgres):
    """A hot standby of ``primary`` streaming through a physical slot; see the module docstring.

    ``settings`` are merged over the primary's (a standby needs ``max_connections`` and the
    like at least as high) and the standby's own; ``failover_slots`` defaults to on for
    PostgreSQL 17+ and is refused below.
    """

    def __init__(
        self,
        primary: LocalPostgres,
        *,
        settings: Optional[Mapping[str, Any]] = None,
        failover_slots: Optional[bool] = None,
        port: Optional[int] = None,
    ) -> None:
        if primary.pid is None:
            raise SandboxError("start_standby(): the primary is not running")
        super().__init__(port=port, install=primary.install)
        if failover_slots is None:
            failover_slots = primary.major >= FAILOVER_SLOTS_MAJOR
        elif failover_slots and primary.major < FAILOVER_SLOTS_MAJOR:
            raise ConfigError(
                f"logical failover slots need PostgreSQL {FAILOVER_SLOTS_MAJOR}+; the primary runs {primary.version}"
            )
        self._primary = primary
        self._failover = failover_slots
        self._slot = f"pgrepl_standby_{uuid.uuid4().hex[:8]}"
        merged: Dict[str, Any] = {k: v for k, v in primary._settings.items() if k != _SYNCED_SLOTS}
        conninfo = (f"host=127.0.0.1 port={primary.port} user=postgres dbname=postgres "
                    f"application_name={self._slot}")
        merged.update(hot_standby=True, primary_conninfo=conninfo, primary_slot_name=self._slot)
        if failover_slots:
            merged.update(sync_replication_slots=True, hot_standby_feedback=True)
        merged.update(settings or {})
        self._settings = merged

    # -- public -----------------------------------------------------------------------------

    @property
    def primary(self) -> LocalPostgres:
        """The server this standby was copied from and streams from."""
        return self._primary

    @property
    def slot_name(self) -> str:
        """The physical replication slot on the primary that this standby streams from."""
        return self._slot

    @property
    def failover_slots(self) -> bool:
        """Whether this standby syncs the primary's logical failover slots."""
        return self._failover

    def in_recovery(self) -> bool:
        """Whether the server is still a standby (``pg_is_in_recovery()``)."""
        return bool(self.query("SELECT pg_is_in_recovery()")[0][0])

    def promote(self, timeout: float = 60.0) -> None:
        """Promote the standby to a primary and wait until it accepts writes."""
        rows = self.query("SELECT pg_promote(true, %s)", (max(1, int(timeout)),))
        if not rows or not rows[0][0] or self.in_recovery():
            raise self._fail(f"promotion of the standby on 127.0.0.1:{self.port} did not finish within {timeout:.0f} s")
        logger.info("PostgreSQL standby on 127.0.0.1:%d promoted", self.port)

    def wait_streaming(self, timeout: float = 60.0) -> None:
        """Wait until the primary reports this standby's walsender as ``streaming``."""
        deadline = time.monotonic() + timeout
        while True:
            rows = self._primary.query(
                "SELECT state FROM pg_stat_replication WHERE application_name = %s", (self._slot,))
            if rows and rows[0][0] == "streaming":
                return
            if time.monotonic() >= deadline:
                raise self._fail(f"standby not streaming from 127.0.0.1:{self._primary.port} after {timeout:.0f} s")
            time.sleep(0.1)

    def start(self) -> "LocalStandby":
        """Copy the primary (first start only), start the standby, and wait until it streams."""
        fresh = self._dir is None
        super().start()
        if fresh:
            try:
                self.wait_streaming()
                if self._failover:
                    self._primary.set_settings({_SYNCED_SLOTS: ",".join(self._synced_slots() + [self._slot])})
            except BaseException:
                self.stop()
                raise
        return self

    def __repr__(self) -> str:
        return f"<LocalStandby of 127.0.0.1:{self._primary._port} {super().__repr__()[1:]}"

    # -- internals --------------------------------------------------------------------------

    def _synced_slots(self) -> List[str]:
        """The primary's ``synchronized_standby_slots`` as configured in the sandbox (without this standby's)."""
        value = str(self._primary._settings.get(_SYNCED_SLOTS) or "")
        return [s for s in (part.strip() for part in value.split(",")) if s and s != self._slot]

    def _create_cluster(self) -> None:
        """Make the sandbox directory and ``pg_basebackup`` the primary into ``<dir>/data`` (a standby)."""
        try:
            self._new_sandbox()
            os.rmdir(self.data_dir)  # pg_basebackup makes it, with the primary's permissions
            # As ourselves, then handed over: the client tools may be out of the server user's reach.
            self._run_tool([
                self.bin("pg_basebackup"),
                "-D", self.data_dir,
                "-d", f"host=127.0.0.1 port={self._primary.port} user=postgres",
                "-X", "stream",
                "-c", "fast",
                "-C", "-S", self._slot,
                "--no-sync",
            ], as_server_user=False, timeout=300)
            open(os.path.join(self.data_dir, "standby.signal"), "w").close()
            self._give_to_server_user(self.data_dir)
        except BaseException:
            self._discard()
            raise

    def _discard(self) -> None:
        """Stop and delete the standby, then release what it held on the primary (if that still runs)."""
        super()._discard()
        if self._primary.pid is None:
            return
        with contextlib.suppress(Exception):
            if self._failover and self._slot in str(self._primary._settings.get(_SYNCED_SLOTS) or ""):
                self._primary.set_settings({_SYNCED_SLOTS: ",".join(self._synced_slots()) or None})
            from pgrepl.postgres.slot import drop_slot

            conn = self._primary.connect()
            try:
                drop_slot(conn, self._slot, timeout=10.0)
            finally:
                conn.close()
