"""What ``pgrepl-bench`` creates on PostgreSQL and Kafka, and the guarantee that it all goes away.

Every name carries the run's own prefix (``pgrepl_bench_<run id>_``), and ``BenchResources``
refuses to create or drop anything without it: the bench never touches a user's objects. It
records each object and child process the moment it exists, and ``cleanup()`` -- called from
``finally`` on success, error, Ctrl-C or SIGTERM -- stops the children, drops the slots
(terminating their walsenders first), publications and tables, and deletes the topics. An
abandoned slot would retain WAL on the user's server forever, so slots go first.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import re
import signal
import subprocess
import uuid
from typing import Any, Callable, Dict, List, Optional, Sequence


from pgrepl.postgres.connect import connect, quote_ident
from pgrepl.postgres.slot import drop_slot
from pgrepl.bench.workloads import PREFIX
from pgrepl.errors import ConfigError

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[a-z0-9_]{1,63}$")


def new_run_prefix() -> str:
    """A prefix unique to one run: ``pgrepl_bench_<6 hex>_``."""
    return f"{PREFIX}{uuid.uuid4().hex[:6]}_"


def _death_signal_preexec() -> Optional[Callable[[], None]]:
    """Linux: children get SIGTERM when the bench dies (even by SIGKILL), so no reader outlives it."""
    if not os.path.exists("/proc/self/stat"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None

    def preexec() -> None:
        prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG

    return preexec


class BenchResources:
    """Objects and processes of one bench run; ``cleanup()`` removes them all, best effort, logged."""

    def __init__(self, dsn: str, brokers: Optional[str], run_prefix: str) -> None:
        if not run_prefix.startswith(PREFIX):
            raise ConfigError(f"bench object prefix must start with {PREFIX!r}")
        self.dsn = dsn
        self.brokers = brokers
        self.run_prefix = run_prefix
        self.slots: List[str] = []
        self.publications: List[str] = []
        self.tables: List[str] = []
        self.topics: List[str] = []
        self.processes: List[subprocess.Popen] = []  # type: ignore[type-arg]
        self._conn: Any = None
        self._admin: Any = None

    # -- connections --------------------------------------------------------------------

    @property
    def conn(self) -> Any:
        """An autocommit connection for DDL and slot management (reopened if it broke)."""
        if self._conn is None or self._conn.closed:
            self._conn = connect(self.dsn, application_name="pgrepl-bench")
        return self._conn

    @property
    def admin(self) -> Any:
        """A Kafka AdminClient (librdkafka logs through Python logging)."""
        if self._admin is None:
            from confluent_kafka.admin import AdminClient

            config: Dict[str, Any] = {"bootstrap.servers": self.brokers, "logger": logging.getLogger("pgrepl.kafka"),
                                      "error_cb": lambda err: log.debug("kafka admin: %s", err)}
            self._admin = AdminClient(config)
        return self._admin

    def owned(self, name: str) -> str:
        """``name`` if it carries this run's prefix and is a plain identifier; else refuse."""
        if not name.startswith(self.run_prefix) or not _NAME.match(name):
            raise ConfigError(f"refusing to touch {name!r}: pgrepl-bench only manages objects named {self.run_prefix}*")
        return name

    # -- PostgreSQL objects ---------------------------------------------------------------

    def create_table(self, name: str, statements: Sequence[str]) -> None:
        """Run ``statements`` (the first creates table ``name``); fails if it already exists."""
        self.owned(name)
        with self.conn.cursor() as cur:
            cur.execute(statements[0])
            self.tables.append(name)
            for statement in statements[1:]:
                cur.execute(statement)

    def create_publication(self, name: str, tables: Sequence[str]) -> None:
        """CREATE PUBLICATION for our own tables only."""
        self.owned(name)
        listed = ", ".join(quote_ident(self.owned(t)) for t in tables)
        with self.conn.cursor() as cur:
            cur.execute(f"CREATE PUBLICATION {quote_ident(name)} FOR TABLE {listed}")
        self.publications.append(name)

    def create_slot(self, name: str) -> str:
        """A new pgoutput slot (an existing one is an error, never reused); returns its LSN."""
        self.owned(name)
        with self.conn.cursor() as cur:
            cur.execute("SELECT lsn::text FROM pg_create_logical_replication_slot(%s, 'pgoutput')", (name,))
            (lsn,) = cur.fetchone()
        self.slots.append(name)
        return str(lsn)

    def slot_confirmed(self, name: str) -> Optional[str]:
        """The slot's confirmed_flush_lsn as text (None if gone)."""
        with self.conn.cursor() as cur:
            cur.execute("SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s", (name,))
            row = cur.fetchone()
        return row[0] if row else None

    def slot_active(self, name: str) -> bool:
        """Whether a walsender streams from the slot right now."""
        with self.conn.cursor() as cur:
            cur.execute("SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s", (name,))
            row = cur.fetchone()
        return bool(row and row[0])

    def drop_slot(self, name: str, timeout: float = 15.0) -> None:
        """Drop our slot: wait briefly for its walsender to go, terminate it if it lingers."""
        drop_slot(self.conn, self.owned(name), timeout=timeout)
        with contextlib.suppress(ValueError):
            self.slots.remove(name)

    def drop_publication(self, name: str) -> None:
        """DROP PUBLICATION IF EXISTS (ours only)."""
        with self.conn.cursor() as cur:
            cur.execute(f"DROP PUBLICATION IF EXISTS {quote_ident(self.owned(name))}")
        with contextlib.suppress(ValueError):
            self.publications.remove(name)

    def drop_table(self, name: str) -> None:
        """DROP TABLE IF EXISTS (ours only)."""
        with self.conn.cursor() as cur:
            cur.execute(f"DROP TABLE IF EXISTS {quote_ident(self.owned(name))}")
        with contextlib.suppress(ValueError):
            self.tables.remove(name)

    # -- Kafka topics ---------------------------------------------------------------------

    def create_topic(self, name: str, partitions: int) -> None:
        """Create our topic (before the timed run, so creation is not measured)."""
        from confluent_kafka.cimpl import NewTopic

        self.owned(name)
        self.topics.append(name)
        for _, future in self.admin.create_topics([NewTopic(name, num_partitions=partitions,
                                                            replication_factor=-1)]).items():
            future.result(30)

    def delete_topic(self, name: str) -> None:
        """Delete our topic (frees the broker's memory between runs)."""
        self.owned(name)
        for _, future in self.admin.delete_topics([name], operation_timeout=30).items():
            try:
                future.result(30)
            except Exception as exc:  # already gone is fine
                if "UNKNOWN_TOPIC" not in str(exc):
                    raise
        with contextlib.suppress(ValueError):
            self.topics.remove(name)

    # -- child processes ------------------------------------------------------------------

    def spawn(self, argv: List[str], **kwargs: Any) -> "subprocess.Popen[Any]":
        """Start a child in its own session (a terminal Ctrl-C reaches only the bench, which then
        stops the child in order) that dies with the bench; tracked until reaped."""
        proc = subprocess.Popen(argv, start_new_session=True, preexec_fn=_death_signal_preexec(), **kwargs)
        self.processes.append(proc)
        return proc

    def reaped(self, proc: "subprocess.Popen[Any]") -> None:
        """Forget a child that has been waited for."""
        with contextlib.suppress(ValueError):
            self.processes.remove(proc)

    def stop_process(self, proc: "subprocess.Popen[Any]", grace: float = 10.0) -> None:
        """SIGTERM our child (readers flush and exit), SIGKILL after ``grace`` seconds."""
        if proc.returncode is None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                log.warning("child pid %d ignored SIGTERM for %.0f s; killing it", proc.pid, grace)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait(10)
        self.reaped(proc)

    # -- everything ------------------------------------------------------------------------

    def cleanup(self) -> List[str]:
        """Stop children, drop slots, publications, tables, delete topics; returns what failed."""
        problems: List[str] = []
        steps: Dict[str, Callable[[str], None]] = {}
        for proc in list(self.processes):
            try:
                self.stop_process(proc)
            except Exception as exc:
                problems.append(f"child pid {proc.pid}: {exc}")
        if self.slots or self.publications or self.tables:
            steps = {"slot": self.drop_slot, "publication": self.drop_publication, "table": self.drop_table}
            for kind, names in (("slot", self.slots), ("publication", self.publications), ("table", self.tables)):
                for name in list(names):
                    try:
                        steps[kind](name)
                        log.info("dropped %s %s", kind, name)
                    except Exception as exc:
                        problems.append(f"{kind} {name}: {str(exc).strip()}")
        for topic in list(self.topics):
            try:
                self.delete_topic(topic)
            except Exception as exc:
                problems.append(f"topic {topic}: {exc}")
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None
        for problem in problems:
            log.error("cleanup: could not remove %s", problem)
        return problems


def _run_prefix(name: str) -> Optional[str]:
    match = re.match(rf"^({re.escape(PREFIX)}[0-9a-f]{{6}}_)", name)
    return match.group(1) if match else None


def find_leftovers(dsn: str) -> Dict[str, List[str]]:
    """Objects named ``pgrepl_bench_<run>_*`` on a server, left by a bench that was SIGKILLed.

    A run that still has an active slot is running somewhere: its objects are left out.
    """
    conn = connect(dsn, application_name="pgrepl-bench")
    pattern = PREFIX.replace("_", r"\_") + "%"
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT slot_name, active FROM pg_replication_slots "
                        "WHERE slot_name LIKE %s AND database = current_database()", (pattern,))
            slot_rows = cur.fetchall()
            cur.execute("SELECT pubname FROM pg_publication WHERE pubname LIKE %s", (pattern,))
            pubs = [r[0] for r in cur.fetchall()]
            cur.execute("SELECT tablename FROM pg_tables WHERE schemaname = current_schema() AND tablename LIKE %s",
                        (pattern,))
            tables = [r[0] for r in cur.fetchall()]
    finally:
        conn.close()
    running = {_run_prefix(name) for name, active in slot_rows if active}
    found = {"slot": [name for name, _ in slot_rows], "publication": pubs, "table": tables}
    return {kind: [n for n in names if _run_prefix(n) is not None and _run_prefix(n) not in running]
            for kind, names in found.items()}


def drop_leftovers(dsn: str, leftovers: Dict[str, List[str]]) -> List[str]:
    """Drop earlier runs' ``pgrepl_bench_*`` objects (slots first); returns what failed."""
    problems: List[str] = []
    by_run: Dict[str, Dict[str, List[str]]] = {}
    for kind, names in leftovers.items():
        for name in names:
            prefix = _run_prefix(name)
            if prefix is None:
                problems.append(f"{kind} {name}: not a pgrepl-bench name; left alone")
                continue
            by_run.setdefault(prefix, {"slot": [], "publication": [], "table": []})[kind].append(name)
    for prefix, objects in by_run.items():
        resources = BenchResources(dsn, None, prefix)
        resources.slots, resources.publications, resources.tables = objects["slot"], objects["publication"], objects["table"]
        problems.extend(resources.cleanup())
    return problems
