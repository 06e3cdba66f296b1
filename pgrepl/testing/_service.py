"""Shared plumbing of the throwaway servers: directories, process identity, the orphan sweep.

Nothing may outlive the Python process that started a server, even when that process is
killed with SIGKILL half-way. Three mechanisms cover this:

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
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import ctypes.util
import fcntl
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
from typing import Any, Callable, Dict, List, Mapping, Optional, Set, Tuple, Union

from pgrepl.errors import ConfigError

logger = logging.getLogger("pgrepl.testing")

#: Environment variable naming the directory under which every sandbox directory is created.
ENV_SANDBOX_ROOT = "PGREPL_SANDBOX_ROOT"

READY_TIMEOUT = 30.0
MAX_PORT_ATTEMPTS = 5
_META_NAME = "sandbox.json"
_LOCK_NAME = ".sweep.lock"
# A directory without a readable sandbox.json is normally one being created right now; it is
# only treated as debris once it is this old.
_INCOMPLETE_DIR_GRACE = 120.0

# Tests flip this off in a throwaway subprocess to prove the sweep alone reaps orphans.
PDEATHSIG_ENABLED = True
_PR_SET_PDEATHSIG = 1

_ANSI_RE = re.compile(r"\x1b\[[0-9;]*m")

# Services with a directory (usually a running server): kept referenced so atexit can stop them.
_live: "Set[Service]" = set()


class SandboxError(RuntimeError):
    """A throwaway local service failed to start or stop; the message carries the server log's tail."""


class AddressInUse(Exception):
    """The chosen port was taken between picking it and the server binding it: pick another."""


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


def pid_exists(pid: int) -> bool:
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


def children_titles(parent: int) -> List[Tuple[int, str]]:
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


def wait_gone(pid: int, timeout: float) -> bool:
    """Poll until ``pid`` no longer runs (or is a zombie); True if it went within ``timeout``."""
    deadline = time.monotonic() + timeout
    while pid_exists(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def send_signal(pid: int, sig: int) -> None:
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
                send_signal(pid, signal.SIGCONT)  # a paused (SIGSTOPped) server cannot act on SIGQUIT
                send_signal(pid, stop_sig)
                if not wait_gone(pid, 10.0):
                    send_signal(pid, signal.SIGKILL)
                    if not wait_gone(pid, 5.0):
                        logger.warning("sandbox sweep: pid %d survived SIGKILL; keeping %s", pid, path)
                        return False
            elif not _have_proc() and pid_exists(pid):
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
                if owner and pid_exists(owner) and (
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


def free_port() -> int:
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


def make_preexec(deathsig: Optional[int]) -> Optional[Callable[[], None]]:
    """A ``preexec_fn`` arranging for the child to get ``deathsig`` when the spawning thread dies.

    Popen applies ``user``/``group`` before ``preexec_fn``, so this runs after the privilege
    drop, as it must (a credential change clears the death signal). Returns None when the
    death signal cannot be used (not Linux, disabled, or not spawning from the main thread).
    """
    if deathsig is None or _prctl is None or not PDEATHSIG_ENABLED:
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


def log_tail(path: str, start: int = 0, lines: int = 20) -> str:
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


class Service:
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
                preexec_fn=make_preexec(self.stop_signal),
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
            send_signal(proc.pid, signal.SIGCONT)  # a paused process acts on nothing but SIGKILL
            for step, timeout in steps + [(int(signal.SIGKILL), 10.0)]:
                if callable(step):
                    step(proc.pid)
                else:
                    send_signal(proc.pid, step)
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
        tail = log_tail(self._log_path or "", self._log_offset, lines=200)
        return any(n in tail for n in needles)

    def _fail(self, what: str) -> SandboxError:
        """A SandboxError for ``what`` carrying the tail of the server log."""
        return SandboxError(f"{what}; server log {self._log_path}:\n{log_tail(self._log_path or '', self._log_offset)}")

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


def clean_env(drop_prefixes: Tuple[str, ...], drop: Tuple[str, ...] = ()) -> Dict[str, str]:
    """A copy of the environment without variables that would reconfigure the child server."""
    return {k: v for k, v in os.environ.items() if not k.startswith(drop_prefixes) and k not in drop}
