"""``LocalPostgres``: a throwaway PostgreSQL cluster (``wal_level=logical``) in a temporary directory.

Which binaries run it (a system install, ``$PGREPL_PG_BINDIR``, or a packaged version chosen by
``$PGREPL_PG_VERSION``) is decided by :mod:`pgrepl.testing.pg_binaries`; ``bindir``, ``version``
and ``install`` say what was picked. :meth:`LocalPostgres.start_standby` adds a streaming
standby (:mod:`pgrepl.testing.standby`).

PostgreSQL refuses to run as root. When running as root the data directory is given to
the ``postgres`` OS user (or ``nobody``, see :mod:`pgrepl.testing._serveruser`) and the server
is started as that user directly by ``subprocess.Popen(user=..., group=...)`` rather than
through ``runuser``: ``runuser`` forks and waits, so the recorded PID would be ``runuser``'s
and not the postmaster's, and a death signal set on ``runuser`` would not reach the server.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional

from pgrepl.errors import ConfigError, first_line
from pgrepl.testing import _service
from pgrepl.testing._service import (
    ENV_SANDBOX_ROOT, MAX_PORT_ATTEMPTS, READY_TIMEOUT, AddressInUse, SandboxError, Service, children_titles,
    clean_env, log_tail, logger, make_preexec, send_signal,
)
from pgrepl.testing._serveruser import blocked_dir, server_user
from pgrepl.testing.pg_binaries import ENV_PG_BINDIR, PgInstall, find_pg_bindir, find_pg_install, reachable_install

if TYPE_CHECKING:
    from pgrepl.testing.standby import LocalStandby

__all__ = ["ENV_PG_BINDIR", "LocalPostgres", "find_pg_bindir"]

# Linux: the socket path (directory + "/.s.PGSQL.NNNNN") must fit in sockaddr_un.sun_path.
_MAX_SOCKET_PATH = 107


# --------------------------------------------------------------------------------------------
# PostgreSQL
# --------------------------------------------------------------------------------------------


def _pg_value(value: Any) -> str:
    """Render a setting value for postgresql.conf (strings quoted, booleans as on/off)."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (int, float)):
        return str(value)
    return "'" + str(value).replace("\\", "\\\\").replace("'", "''") + "'"


class LocalPostgres(Service):
    """A throwaway PostgreSQL cluster with ``wal_level=logical``, trust auth and user ``postgres``.

    ``start()`` runs ``initdb`` into a fresh sandbox directory and starts the server on a free
    port on 127.0.0.1 (or ``port``); ``settings`` are merged over the defaults below. ``stop()``
    shuts down and deletes everything unless ``keep_data=True``, in which case ``start()``
    brings the same cluster back on the same port (an outage); ``restart()`` does both at once.
    """

    kind = "postgres"
    stop_signal = signal.SIGQUIT  # immediate shutdown: children are stopped, shared memory removed

    DEFAULT_SETTINGS: Mapping[str, Any] = {
        "wal_level": "logical",
        "max_replication_slots": 20,
        "max_wal_senders": 20,
        "listen_addresses": "127.0.0.1",
        "timezone": "UTC",
        "log_timezone": "UTC",
        "fsync": False,
        "synchronous_commit": False,
        "full_page_writes": False,
        "max_connections": 100,
        "logging_collector": False,
        "log_destination": "stderr",
    }

    def __init__(
        self,
        *,
        port: Optional[int] = None,
        settings: Optional[Mapping[str, Any]] = None,
        version: Optional[int] = None,
        bindir: Optional[str] = None,
        install: Optional[PgInstall] = None,
    ) -> None:
        """Choose the binaries (``version``: a packaged major, ``bindir``: a directory or ``"packaged"``,
        ``install``: another server's :attr:`install`; default ``$PGREPL_PG_VERSION`` /
        ``$PGREPL_PG_BINDIR``, then the machine's server, then the packaged one); nothing starts
        before :meth:`start`."""
        super().__init__()
        self._settings: Dict[str, Any] = dict(settings or {})
        if "port" in self._settings:
            if port is not None:
                raise ConfigError("LocalPostgres: give the port either as port= or in settings, not both")
            port = int(self._settings.pop("port"))
        self._requested_port = port
        self._port: Optional[int] = None
        self._user = server_user()
        self._install = reachable_install(install or find_pg_install(version=version, bindir=bindir), self._user)
        self._bindir = self._install.bindir

    # -- public properties ------------------------------------------------------------------

    @property
    def bindir(self) -> str:
        """Directory of the PostgreSQL server binaries in use."""
        return self._bindir

    @property
    def install(self) -> PgInstall:
        """The binaries in use: bindir, version and where they come from (``system``, ``pip ...``, ``npm ...``)."""
        return self._install

    @property
    def version(self) -> str:
        """The server's version, e.g. ``"17.10"``."""
        return self._install.version

    @property
    def major(self) -> int:
        """The server's major version, e.g. 17."""
        return self._install.major

    @property
    def port(self) -> int:
        """TCP port the server listens on (127.0.0.1)."""
        if self._port is None:
            raise SandboxError("LocalPostgres is not started")
        return self._port

    @property
    def dsn(self) -> str:
        """libpq URI of the ``postgres`` database as superuser ``postgres`` (trust auth, no password)."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def data_dir(self) -> str:
        """The cluster's data directory."""
        return os.path.join(self._require_dir(), "data")

    @property
    def log_path(self) -> str:
        """The server's log file (stdout and stderr of the postmaster)."""
        self._require_dir()
        assert self._log_path is not None
        return self._log_path

    @property
    def pid(self) -> Optional[int]:
        """PID of the postmaster, or None while stopped."""
        return None if self._exited() else self._proc.pid  # type: ignore[union-attr]

    def bin(self, name: str) -> str:
        """Path of a PostgreSQL binary of the same installation, e.g. ``bin("pg_recvlogical")``."""
        path = os.path.join(self._bindir, name)
        if not os.access(path, os.X_OK):
            raise ConfigError(f"{name} not found in {self._bindir}: install the PostgreSQL client/server tools")
        return path

    def connect(self, dbname: str = "postgres", **kwargs: Any) -> Any:
        """A psycopg2 connection (autocommit) to ``dbname`` as superuser ``postgres``."""
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=self.port, user="postgres", dbname=dbname,
                                connect_timeout=10, **kwargs)
        conn.autocommit = True
        return conn

    def query(self, sql: str, params: Any = None) -> List[Any]:
        """Run one statement on the ``postgres`` database and return its rows (empty if it returns none)."""
        conn = self.connect()
        try:
            with conn.cursor() as cur:
                cur.execute(sql, params)
                return list(cur.fetchall()) if cur.description is not None else []
        finally:
            conn.close()

    def set_settings(self, settings: Mapping[str, Any]) -> None:
        """Merge ``settings`` (``None`` removes one) into the sandbox's; a running server reloads them.

        Only settings that take effect on reload (``sighup`` context) apply before a restart.
        """
        for name, value in settings.items():
            if name == "port":
                raise ConfigError("LocalPostgres.set_settings: the port cannot change")
            if value is None:
                self._settings.pop(name, None)
            else:
                self._settings[name] = value
        if self._port is not None and self._dir is not None:
            self._write_settings(self._port)
            if not self._exited():
                self.query("SELECT pg_reload_conf()")

    def start_standby(
        self,
        settings: Optional[Mapping[str, Any]] = None,
        *,
        failover_slots: Optional[bool] = None,
        port: Optional[int] = None,
    ) -> "LocalStandby":
        """Start a physical streaming standby of this (running) server; see :class:`~pgrepl.testing.standby.LocalStandby`.

        ``failover_slots`` (default: on for PostgreSQL 17+) makes it sync logical failover slots.
        """
        from pgrepl.testing.standby import LocalStandby

        return LocalStandby(self, settings=settings, failover_slots=failover_slots, port=port).start()

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> "LocalPostgres":
        """Start the server (creating the cluster first if needed) and wait until it accepts connections."""
        if not self._exited():
            return self
        fresh = self._dir is None
        if fresh:
            self._create_cluster()
        try:
            self._start_server(may_change_port=fresh and self._requested_port is None)
        except BaseException:
            if fresh:
                self._discard()
            raise
        logger.info("PostgreSQL started: pid %s, 127.0.0.1:%d, data %s", self.pid, self.port, self.data_dir)
        return self

    def stop(self, *, keep_data: bool = False) -> None:
        """Fast-shutdown the server; delete the cluster unless ``keep_data`` (then ``start()`` resumes it).

        A fast shutdown (SIGINT: sessions rolled back, shutdown checkpoint written) waits for each
        walsender to send all WAL to its client, which takes until ``wal_sender_timeout`` when a
        replication client has stopped reading. Walsenders still there after 2 s are therefore
        terminated, as that timeout would do, once the checkpoint is safely written; an
        immediate shutdown (SIGQUIT) and SIGKILL are the last resorts.
        """
        if not self._exited():
            pid = self.pid
            self._terminate(
                [
                    (int(signal.SIGINT), 2.0),
                    (self._terminate_walsenders, 20.0),
                    (int(signal.SIGQUIT), 10.0),
                ]
            )
            logger.info("PostgreSQL stopped: pid %s, 127.0.0.1:%s", pid, self._port)
        if not keep_data:
            self._discard()

    def restart(self) -> None:
        """Fast-stop and start again on the same data directory and port (simulates a server restart)."""
        if self._dir is None:
            raise SandboxError("LocalPostgres.restart(): the server was never started")
        logger.info("PostgreSQL restarting on 127.0.0.1:%s", self._port)
        self.stop(keep_data=True)
        self.start()

    def __enter__(self) -> "LocalPostgres":
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid={self.pid} port={self._port}" if self._port else "not started"
        return f"<LocalPostgres {state} dir={self._dir}>"

    # -- internals --------------------------------------------------------------------------

    def _require_dir(self) -> str:
        """The sandbox directory, or a clear error when the cluster does not exist."""
        if self._dir is None:
            raise SandboxError("LocalPostgres is not started")
        return self._dir

    def _check_reachable(self, path: str) -> None:
        """Fail clearly if the server's OS user cannot traverse to ``path`` (root runs only)."""
        blocked = blocked_dir(self._user, path)
        if blocked is not None:
            user = self._user.pw_name if self._user else "?"
            raise ConfigError(
                f"the '{user}' OS user cannot traverse {blocked[0]} (mode {blocked[1]:o}): "
                f"set {ENV_SANDBOX_ROOT} to a directory it can reach, e.g. under /tmp"
            )

    def _pg_env(self) -> Dict[str, str]:
        """Environment for initdb/postgres: no PG* variables, C locale, the server user's HOME."""
        env = clean_env(("PG", "LC_"), ("LANG", "LANGUAGE", "TZ"))
        env.update(LANG="C", LC_ALL="C", TZ="UTC")
        if self._user is not None:
            env.update(HOME=self._user.pw_dir, USER=self._user.pw_name, LOGNAME=self._user.pw_name)
        return env

    def _new_sandbox(self) -> str:
        """Make the sandbox directory with ``data`` and ``sock`` owned by the server user; return its path."""
        path = self._make_dir(os.path.join(self._bindir, "postgres"))
        self._check_reachable(path)
        sock_dir = os.path.join(path, "sock")
        if len(sock_dir) + len("/.s.PGSQL.65535") > _MAX_SOCKET_PATH:
            raise ConfigError(
                f"sandbox path {path} is too long for a Unix socket: set {ENV_SANDBOX_ROOT} to a shorter directory"
            )
        for d in (os.path.join(path, "data"), sock_dir):
            os.mkdir(d, 0o700)
            self._give_to_server_user(d)
        return path

    def _give_to_server_user(self, path: str) -> None:
        """Make ``path`` (recursively) owned by the server's OS user when that is not us."""
        if self._user is None:
            return
        uid, gid = self._user.pw_uid, self._user.pw_gid
        os.chown(path, uid, gid)
        for top, dirs, files in os.walk(path):
            for name in dirs + files:
                os.chown(os.path.join(top, name), uid, gid, follow_symlinks=False)

    def _run_tool(self, argv: List[str], *, as_server_user: bool = True, timeout: float = 120) -> None:
        """Run a PostgreSQL tool to completion, its output appended to the server log; SandboxError on failure."""
        log_path = self._log_path
        assert log_path is not None and self._dir is not None
        started = time.monotonic()
        with open(log_path, "ab") as log:
            offset = log.tell()
            kwargs: Dict[str, Any] = {}
            if as_server_user and self._user is not None:
                kwargs.update(user=self._user.pw_uid, group=self._user.pw_gid, extra_groups=[])
            try:
                result = subprocess.run(
                    argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=self._dir,
                    env=self._pg_env(), preexec_fn=make_preexec(signal.SIGKILL), timeout=timeout, check=False,
                    **kwargs,
                )
            except subprocess.TimeoutExpired:
                raise SandboxError(f"{os.path.basename(argv[0])} took over {timeout:.0f} s; log {log_path}:\n"
                                   f"{log_tail(log_path, offset)}") from None
        if result.returncode != 0:
            raise SandboxError(f"{os.path.basename(argv[0])} failed (exit {result.returncode}); log {log_path}:\n"
                               f"{log_tail(log_path, offset)}")
        logger.debug("%s took %.2f s", os.path.basename(argv[0]), time.monotonic() - started)

    def _include_sandbox_conf(self) -> None:
        """Make postgresql.conf include pgrepl_sandbox.conf, where :meth:`_write_settings` puts ours."""
        with open(os.path.join(self.data_dir, "postgresql.conf"), "a", encoding="utf-8") as conf:
            conf.write("\n# pgrepl sandbox\ninclude_if_exists = 'pgrepl_sandbox.conf'\n")

    def _create_cluster(self) -> None:
        """Make the sandbox directory and run initdb into ``<dir>/data``."""
        try:
            self._new_sandbox()
            self._run_tool([
                os.path.join(self._bindir, "initdb"),
                "-D", self.data_dir,
                "-U", "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--no-locale",
                "--no-sync",
            ])
            self._include_sandbox_conf()
        except BaseException:
            self._discard()
            raise

    def _write_settings(self, port: int) -> None:
        """Write the sandbox settings (defaults, caller's, port, socket dir) to pgrepl_sandbox.conf."""
        assert self._dir is not None
        merged: Dict[str, Any] = dict(self.DEFAULT_SETTINGS)
        merged.update(self._settings)
        merged.update(port=port, unix_socket_directories=os.path.join(self._dir, "sock"))
        text = "".join(f"{name} = {_pg_value(value)}\n" for name, value in merged.items())
        path = os.path.join(self._dir, "data", "pgrepl_sandbox.conf")
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(text)
        if self._user is not None:
            os.chown(path, self._user.pw_uid, self._user.pw_gid)

    def _start_server(self, *, may_change_port: bool) -> None:
        """Spawn the postmaster and wait for readiness; on 'address in use' retry (new port if allowed)."""
        port = self._port or self._requested_port or _service.free_port()
        # A fixed port (caller's choice, or a restart) is retried briefly in case it frees up.
        attempts = MAX_PORT_ATTEMPTS if may_change_port else 3
        for attempt in range(1, attempts + 1):
            self._port = port
            self._write_settings(port)
            self._spawn(
                [os.path.join(self._bindir, "postgres"), "-D", self.data_dir],
                env=self._pg_env(),
                user=self._user,
            )
            try:
                self._wait_ready()
                return
            except AddressInUse:
                self._terminate([(int(signal.SIGQUIT), 10.0)])
                if attempt == attempts:
                    raise self._fail(f"PostgreSQL could not listen on 127.0.0.1:{port}: address in use") from None
                if may_change_port:
                    logger.info("port %d was taken; retrying PostgreSQL on another port", port)
                    port = _service.free_port()
                else:
                    time.sleep(0.5)
            except BaseException:
                with contextlib.suppress(Exception):
                    self._terminate([(int(signal.SIGQUIT), 10.0)])
                raise

    def _pidfile_ready(self) -> bool:
        """Whether ``postmaster.pid`` names our postmaster and says "ready" (as ``pg_ctl -w`` checks).

        The postmaster only gets there after binding its port, so no connection attempt is made
        (and hangs) against whatever else may be listening there while ours is failing.
        """
        try:
            with open(os.path.join(self.data_dir, "postmaster.pid"), encoding="utf-8", errors="replace") as fh:
                lines = fh.read().splitlines()
        except OSError:
            return False
        return (
            len(lines) >= 8
            and self._proc is not None
            and lines[0].strip() == str(self._proc.pid)
            and lines[7].strip() == "ready"
        )

    def _wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Block until the postmaster reports ready and a real connection (checked by data directory) succeeds."""
        import psycopg2

        deadline = time.monotonic() + timeout
        last_error = "server not ready"
        while True:
            if self._exited():
                if self._log_mentions("Address already in use", "could not create any TCP/IP sockets"):
                    raise AddressInUse()
                code = self._proc.returncode if self._proc is not None else None
                raise self._fail(f"PostgreSQL exited during startup (exit {code})")
            if not self._pidfile_ready():
                if time.monotonic() >= deadline:
                    raise self._fail(f"PostgreSQL on 127.0.0.1:{self._port} not ready after {timeout:.0f} s")
                time.sleep(0.02)
                continue
            try:
                conn = psycopg2.connect(
                    host="127.0.0.1", port=self._port, user="postgres", dbname="postgres", connect_timeout=2
                )
            except psycopg2.OperationalError as exc:
                last_error = first_line(exc)
            else:
                try:
                    with conn.cursor() as cur:
                        cur.execute("SHOW data_directory")
                        row = cur.fetchone()
                finally:
                    conn.close()
                if row and os.path.realpath(row[0]) == os.path.realpath(self.data_dir):
                    return
                # Another server answers on our port: ours cannot have bound it.
                last_error = f"another PostgreSQL ({row[0] if row else '?'}) answers on port {self._port}"
                if self._log_mentions("Address already in use", "could not create any TCP/IP sockets"):
                    raise AddressInUse()
            if time.monotonic() >= deadline:
                raise self._fail(
                    f"PostgreSQL on 127.0.0.1:{self._port} not accepting connections after {timeout:.0f} s ({last_error})"
                )
            time.sleep(0.05)

    def _terminate_walsenders(self, postmaster: int) -> None:
        """SIGTERM the postmaster's walsender processes (found by their process title)."""
        pids = [pid for pid, title in children_titles(postmaster) if title.startswith("postgres: walsender")]
        if pids:
            logger.info(
                "PostgreSQL shutdown waits on %d walsender(s) whose clients are not reading; terminating pid(s) %s",
                len(pids), ", ".join(map(str, pids)),
            )
        for pid in pids:
            send_signal(pid, signal.SIGTERM)

    def _discard(self) -> None:
        """Make sure the server is down, then delete the sandbox directory."""
        if not self._exited():
            with contextlib.suppress(Exception):
                self._terminate([(int(signal.SIGQUIT), 10.0)])
        self._remove_dir()
        self._port = None
