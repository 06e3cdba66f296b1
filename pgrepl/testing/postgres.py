"""``LocalPostgres``: a throwaway PostgreSQL cluster (``wal_level=logical``) in a temporary directory.

PostgreSQL refuses to run as root. When running as root the data directory is given to
the ``postgres`` OS user and the server is started as that user directly by
``subprocess.Popen(user=..., group=...)`` rather than through ``runuser``: ``runuser``
forks and waits, so the recorded PID would be ``runuser``'s and not the postmaster's, and
a death signal set on ``runuser`` would not reach the server.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import stat
import subprocess
import time
from typing import Any, Dict, Mapping, Optional, Tuple

from pgrepl.errors import ConfigError, first_line
from pgrepl.testing import _service
from pgrepl.testing._service import (
    ENV_SANDBOX_ROOT, MAX_PORT_ATTEMPTS, READY_TIMEOUT, AddressInUse, SandboxError, Service, children_titles,
    clean_env, log_tail, logger, make_preexec, send_signal,
)

#: Environment variable naming the directory that holds ``postgres``, ``initdb``, ``pg_recvlogical``...
ENV_PG_BINDIR = "PGREPL_PG_BINDIR"
# Linux: the socket path (directory + "/.s.PGSQL.NNNNN") must fit in sockaddr_un.sun_path.
_MAX_SOCKET_PATH = 107


# --------------------------------------------------------------------------------------------
# Locating binaries
# --------------------------------------------------------------------------------------------


def _has_server(bindir: str) -> bool:
    """Whether ``bindir`` holds both the ``postgres`` server and ``initdb`` executables."""
    return all(os.access(os.path.join(bindir, name), os.X_OK) for name in ("postgres", "initdb"))


def _version_key(bindir: str) -> Tuple[int, ...]:
    """Sort key for ``/usr/lib/postgresql/<version>/bin`` paths: the numeric version."""
    version = os.path.basename(os.path.dirname(bindir)).replace("pgsql-", "")
    try:
        return tuple(int(part) for part in version.split("."))
    except ValueError:
        return (-1,)


def find_pg_bindir() -> str:
    """Return the directory of the PostgreSQL server binaries (``postgres``, ``initdb``, ...).

    Looks at ``$PGREPL_PG_BINDIR``, then ``postgres`` on ``PATH`` (symlinks resolved, since
    ``/usr/local/bin`` often links only a few of the tools), then ``pg_config --bindir`` (only
    if it really holds the server: ``pg_config`` may come from a client-only package), then the
    highest version under ``/usr/lib/postgresql/*/bin`` and ``/usr/pgsql-*/bin``.
    """
    override = os.environ.get(ENV_PG_BINDIR)
    if override:
        if not _has_server(override):
            raise ConfigError(
                f"{ENV_PG_BINDIR}={override!r} does not contain the 'postgres' and 'initdb' executables"
            )
        return os.path.abspath(override)

    on_path = shutil.which("postgres")
    if on_path:
        bindir = os.path.dirname(os.path.realpath(on_path))
        if _has_server(bindir):
            return bindir

    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=False
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            out = ""
        if out and _has_server(out):
            return out

    candidates = [d for d in glob.glob("/usr/lib/postgresql/*/bin") + glob.glob("/usr/pgsql-*/bin") if _has_server(d)]
    if candidates:
        return max(candidates, key=_version_key)

    raise ConfigError(
        "PostgreSQL server binaries not found: install the 'postgresql' package "
        f"(Debian: apt-get install postgresql) or set {ENV_PG_BINDIR}"
    )


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

    def __init__(self, *, port: Optional[int] = None, settings: Optional[Mapping[str, Any]] = None) -> None:
        super().__init__()
        self._settings: Dict[str, Any] = dict(settings or {})
        if "port" in self._settings:
            if port is not None:
                raise ConfigError("LocalPostgres: give the port either as port= or in settings, not both")
            port = int(self._settings.pop("port"))
        self._requested_port = port
        self._port: Optional[int] = None
        self._bindir = find_pg_bindir()
        self._user = self._server_user()

    # -- public properties ------------------------------------------------------------------

    @property
    def bindir(self) -> str:
        """Directory of the PostgreSQL server binaries in use."""
        return self._bindir

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

    @staticmethod
    def _server_user() -> Optional[pwd.struct_passwd]:
        """The OS user to run PostgreSQL as: None (ourselves) unless we are root, then ``postgres``."""
        if os.geteuid() != 0:
            return None
        try:
            return pwd.getpwnam("postgres")
        except KeyError:
            raise ConfigError(
                "running as root, but PostgreSQL refuses root and there is no 'postgres' OS user: install the "
                "'postgresql' package (it creates the user), create one (useradd -r postgres), or run as non-root"
            ) from None

    def _check_reachable(self, path: str) -> None:
        """Fail clearly if the ``postgres`` OS user cannot traverse to ``path`` (root runs only)."""
        user = self._user
        if user is None:
            return
        groups = set(os.getgrouplist(user.pw_name, user.pw_gid))
        current = path
        while True:
            st = os.stat(current)
            ok = (
                st.st_uid == user.pw_uid
                or st.st_mode & stat.S_IXOTH
                or (st.st_gid in groups and st.st_mode & stat.S_IXGRP)
            )
            if not ok:
                raise ConfigError(
                    f"the 'postgres' OS user cannot traverse {current} (mode {stat.S_IMODE(st.st_mode):o}): "
                    f"set {ENV_SANDBOX_ROOT} to a directory it can reach, e.g. under /tmp"
                )
            parent = os.path.dirname(current)
            if parent == current:
                return
            current = parent

    def _pg_env(self) -> Dict[str, str]:
        """Environment for initdb/postgres: no PG* variables, C locale, the server user's HOME."""
        env = clean_env(("PG", "LC_"), ("LANG", "LANGUAGE", "TZ"))
        env.update(LANG="C", LC_ALL="C", TZ="UTC")
        if self._user is not None:
            env.update(HOME=self._user.pw_dir, USER=self._user.pw_name, LOGNAME=self._user.pw_name)
        return env

    def _create_cluster(self) -> None:
        """Make the sandbox directory and run initdb into ``<dir>/data``."""
        path = self._make_dir(os.path.join(self._bindir, "postgres"))
        try:
            self._check_reachable(path)
            sock_dir = os.path.join(path, "sock")
            if len(sock_dir) + len("/.s.PGSQL.65535") > _MAX_SOCKET_PATH:
                raise ConfigError(
                    f"sandbox path {path} is too long for a Unix socket: set {ENV_SANDBOX_ROOT} to a shorter directory"
                )
            data_dir = os.path.join(path, "data")
            for d in (data_dir, sock_dir):
                os.mkdir(d, 0o700)
                if self._user is not None:
                    os.chown(d, self._user.pw_uid, self._user.pw_gid)
            argv = [
                os.path.join(self._bindir, "initdb"),
                "-D", data_dir,
                "-U", "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--no-locale",
                "--no-sync",
            ]
            started = time.monotonic()
            log_path = self._log_path
            assert log_path is not None
            with open(log_path, "ab") as log:
                offset = log.tell()
                kwargs: Dict[str, Any] = {}
                if self._user is not None:
                    kwargs.update(user=self._user.pw_uid, group=self._user.pw_gid, extra_groups=[])
                result = subprocess.run(
                    argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=path,
                    env=self._pg_env(), preexec_fn=make_preexec(signal.SIGKILL), timeout=120, check=False,
                    **kwargs,
                )
            if result.returncode != 0:
                raise SandboxError(f"initdb failed (exit {result.returncode}); log {log_path}:\n{log_tail(log_path, offset)}")
            logger.debug("initdb %s took %.2f s", data_dir, time.monotonic() - started)
            with open(os.path.join(data_dir, "postgresql.conf"), "a", encoding="utf-8") as conf:
                conf.write("\n# pgrepl sandbox\ninclude_if_exists = 'pgrepl_sandbox.conf'\n")
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
