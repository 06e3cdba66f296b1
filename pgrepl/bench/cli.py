"""``pgrepl-bench``: end-to-end throughput, CPU, memory and latency against your PostgreSQL's ceiling.

For each workload the bench creates its own tables, publication and one slot per reader and
repeat, *then* makes the changes, so every reader streams exactly the same WAL:

1. ``pg_recvlogical`` (pgoutput, same publication) to /dev/null -- the walsender's ceiling;
2. pgrepl's producer into Kafka, until every record is delivered and the slot confirmed;
3. a pure-Python baseline producer (``pgrepl.bench.baseline.producer``) doing the same job.

Each reader runs in its own child process, so its CPU (user+sys, all threads) and peak RSS
are its own. Everything it creates is named ``pgrepl_bench_<run id>_*`` and dropped at the
end, on error, Ctrl-C and SIGTERM. With no ``--dsn``/``--brokers`` it starts a throwaway
PostgreSQL and Kafka-protocol broker (``pgrepl.testing``) itself.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from pgrepl._version import __version__
from pgrepl.bench.workloads import LATENCY_COLUMNS, LATENCY_STAMP_COLUMN, TX_MODES, WORKLOADS, Workload
from pgrepl.errors import ConfigError, PgreplError

log = logging.getLogger("pgrepl.bench")

READERS = ("recvlogical", "pgrepl", "baseline")
KAFKA_READERS = ("pgrepl", "baseline")
DEFAULT_ROWS = 1_000_000
DEFAULT_REPEAT = 3
DEFAULT_TX_SIZE = 100
QUICK_ROWS = 100_000


class BenchInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM: stop, clean up, exit 130."""


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text.replace("_", "").replace(",", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {value}")
    return value


def _choices(kind: str, allowed: Sequence[str]) -> Callable[[str], List[str]]:
    """Comma-separated names out of ``allowed`` (``all`` for every one)."""
    def parse(text: str) -> List[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        if names == ["all"]:
            return list(allowed)
        unknown = [n for n in names if n not in allowed]
        if unknown or not names:
            raise argparse.ArgumentTypeError(
                f"unknown {kind} {', '.join(unknown) or repr(text)}; choose from {', '.join(allowed)} or all")
        return names
    return parse


def build_parser() -> argparse.ArgumentParser:
    """The ``pgrepl-bench`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="pgrepl-bench",
        description="Benchmark pgrepl end to end against pg_recvlogical (the walsender's ceiling) and a "
                    "pure-Python producer, on your machine. Without --dsn/--brokers it starts a throwaway "
                    "PostgreSQL and Kafka-protocol broker.",
        epilog="Runtime: each workload makes --rows changes (toast: --rows/50) twice (one big transaction, "
               "then transactions of --tx-size) and streams them --repeat times through each reader. The "
               "defaults (inventory, 1,000,000 rows, 3 repeats) take about 10 minutes on 2 cores; --quick "
               "(100,000 rows, 1 repeat) about a minute per workload.")
    parser.add_argument("--version", action="version", version=f"pgrepl-bench {__version__}")
    target = parser.add_argument_group("where")
    target.add_argument("--dsn", help="PostgreSQL (wal_level=logical) to use; only pgrepl_bench_<run>_* objects "
                                      "are created and dropped (default: a throwaway local server). "
                                      "Prefer PGPASSWORD over a password in the DSN.")
    target.add_argument("--brokers", help="Kafka bootstrap servers to use (default: a throwaway local broker)")
    target.add_argument("--pg-recvlogical", metavar="PATH", help="pg_recvlogical to use (default: found next to "
                                                                  "the PostgreSQL binaries or on PATH)")
    what = parser.add_argument_group("what")
    what.add_argument("--workload", action="append", type=_choices("workload", list(WORKLOADS)), metavar="NAMES",
                      help=f"comma-separated, repeatable: {', '.join(WORKLOADS)} or all (default: inventory)")
    what.add_argument("--tx", type=_choices("transaction shape", TX_MODES), metavar="SHAPES",
                      help="big (the whole workload in one transaction), small (--tx-size changes each), or "
                           "both (default)")
    what.add_argument("--tx-size", type=_positive_int, default=DEFAULT_TX_SIZE,
                      help=f"row changes per transaction in the small shape (default {DEFAULT_TX_SIZE})")
    what.add_argument("--rows", type=_positive_int, help=f"row changes per workload (default {DEFAULT_ROWS:,}; "
                                                         "toast makes a fiftieth: 20 kB values)")
    what.add_argument("--repeat", type=_positive_int, help=f"runs per reader; figures are the median with min "
                                                           f"and max (default {DEFAULT_REPEAT})")
    what.add_argument("--readers", type=_choices("reader", READERS), metavar="NAMES",
                      help=f"comma-separated subset of {', '.join(READERS)} (default: all)")
    what.add_argument("--partitions", type=_positive_int, default=4, help="partitions of each topic (default 4)")
    what.add_argument("--latency-rate", type=_positive_int, default=200,
                      help="rows/s of the latency workload, one row per transaction (default 200)")
    what.add_argument("--latency-seconds", type=_non_negative_float,
                      help="duration of the latency workload per reader and repeat; 0 skips it (default 5)")
    what.add_argument("--consumer", action="store_true",
                      help="also measure consumer throughput over the topic the pgrepl producer filled")
    what.add_argument("--decoder-only", action="store_true",
                      help="only replay a captured pgoutput stream through the Cython and pure-Python "
                           "decoders (no PostgreSQL or Kafka needed)")
    what.add_argument("--capture", metavar="FILE", help="capture file for the decoder figures (pgrepl.testing.capture "
                                                        "format; default: the repository's, else synthetic)")
    what.add_argument("--no-decoder", action="store_true", help="skip the decoder figures in a full run")
    what.add_argument("--quick", action="store_true",
                      help=f"{QUICK_ROWS:,} rows, 1 repeat, 2 s latency workload (explicit flags still win)")
    out = parser.add_argument_group("output")
    out.add_argument("--json", metavar="FILE", help="write every figure, every run and the machine description")
    out.add_argument("--plot", metavar="FILE.png", help="draw throughput per workload against the ceiling "
                                                        "(needs matplotlib: pip install 'pgrepl[plot]')")
    out.add_argument("--markdown", action="store_true", help="print the tables as Markdown")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")
    out.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    out.add_argument("--timeout", type=_positive_int, default=1800,
                     help="seconds one reader run may take before it counts as failed (default 1800)")
    maint = parser.add_argument_group("maintenance")
    maint.add_argument("--drop-leftovers", action="store_true",
                       help="drop pgrepl_bench_* slots, publications and tables that a killed run left on --dsn "
                            "(runs with an active slot are left alone), then exit")
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse and complete the arguments (defaults, --quick); errors exit with status 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    workloads: List[str] = []
    for names in args.workload or [["inventory"]]:
        workloads.extend(n for n in names if n not in workloads)
    args.workloads = workloads
    args.tx_modes = args.tx or list(TX_MODES)
    args.readers = args.readers or list(READERS)
    args.rows = args.rows or (QUICK_ROWS if args.quick else DEFAULT_ROWS)
    args.repeat = args.repeat or (1 if args.quick else DEFAULT_REPEAT)
    if args.latency_seconds is None:
        args.latency_seconds = 2.0 if args.quick else 5.0
    if args.drop_leftovers and not args.dsn:
        parser.error("--drop-leftovers needs --dsn (a throwaway server has nothing left over)")
    if args.decoder_only and (args.dsn or args.brokers or args.consumer):
        parser.error("--decoder-only needs no services: drop --dsn/--brokers/--consumer")
    if args.consumer and "pgrepl" not in args.readers:
        parser.error("--consumer reads the topic the pgrepl producer filled: include pgrepl in --readers")
    if args.plot and not args.plot.lower().endswith(".png"):
        parser.error("--plot writes a PNG: give a FILE.png")
    return args


def redacted_command(argv: Sequence[str]) -> str:
    """The command line with any DSN password hidden (it goes into reports and logs)."""
    from pgrepl.postgres.connect import redact_dsn

    out: List[str] = []
    hide_next = False
    for arg in argv:
        if hide_next:
            out.append(redact_dsn(arg))
            hide_next = False
        elif arg == "--dsn":
            out.append(arg)
            hide_next = True
        elif arg.startswith("--dsn="):
            out.append("--dsn=" + redact_dsn(arg[len("--dsn="):]))
        else:
            out.append(arg)
    return " ".join(["pgrepl-bench"] + out)


# ---------------------------------------------------------------------------------------------
# Progress display
# ---------------------------------------------------------------------------------------------


class Ui:
    """A progress bar on stderr (rich), or plain log lines when rich is missing or disabled."""

    def __init__(self, enabled: bool, total_steps: int) -> None:
        self._progress: Any = None
        self._overall: Any = None
        self._task: Any = None
        if enabled:
            try:
                from rich.console import Console
                from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                                           TimeElapsedColumn)
            except ImportError:
                pass
            else:
                self._progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                          MofNCompleteColumn(), TimeElapsedColumn(),
                                          console=Console(stderr=True), transient=True)
                self._overall = self._progress.add_task("pgrepl-bench", total=total_steps)

    def __enter__(self) -> "Ui":
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.stop()

    def step(self, description: str, total: Optional[int]) -> None:
        """A new step (one reader run, one generation) with ``total`` rows, or unknown."""
        if self._progress is None:
            sys.stderr.write(f"pgrepl-bench: {description}\n")
            sys.stderr.flush()
            return
        if self._task is not None:
            self._progress.remove_task(self._task)
        self._task = self._progress.add_task(description, total=total)

    def advance_rows(self, rows: int) -> None:
        """Rows done so far in the current step (absolute)."""
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, completed=rows)

    def add_rows(self, rows: int) -> None:
        """Rows done in the current step (increment)."""
        if self._progress is not None and self._task is not None:
            self._progress.advance(self._task, rows)

    def done_step(self) -> None:
        """The current step is over (advances the overall bar)."""
        if self._progress is not None:
            if self._task is not None:
                self._progress.remove_task(self._task)
                self._task = None
            self._progress.advance(self._overall)

    def note(self, text: str) -> None:
        """A line that stays above the bar."""
        if self._progress is not None:
            self._progress.console.print(text)
        else:
            sys.stderr.write(text + "\n")


# ---------------------------------------------------------------------------------------------
# Running readers
# ---------------------------------------------------------------------------------------------


def _lsn_int(text: str) -> int:
    from pgrepl.lsn import parse_lsn

    return parse_lsn(text)


def _split_password(dsn: str) -> Tuple[str, Dict[str, str]]:
    """The DSN without its password, and the environment that carries it (never on a command line)."""
    import psycopg2.extensions

    params = psycopg2.extensions.parse_dsn(dsn)
    env: Dict[str, str] = {}
    password = params.pop("password", None)
    if password:
        env["PGPASSWORD"] = password
    return psycopg2.extensions.make_dsn(**params), env


def find_pg_recvlogical(explicit: Optional[str], bindir: Optional[str]) -> str:
    """pg_recvlogical: ``--pg-recvlogical``, the sandbox's bindir, PATH, or the PostgreSQL install."""
    candidates: List[Optional[str]] = [explicit]
    if bindir:
        candidates.append(os.path.join(bindir, "pg_recvlogical"))
    candidates.append(shutil.which("pg_recvlogical"))
    if not explicit:
        with contextlib.suppress(ConfigError):
            from pgrepl.testing import find_pg_bindir

            candidates.append(os.path.join(find_pg_bindir(), "pg_recvlogical"))
    for path in candidates:
        if path and os.access(path, os.X_OK):
            return path
    if explicit:
        raise ConfigError(f"--pg-recvlogical {explicit}: not an executable")
    raise ConfigError("pg_recvlogical not found: install the PostgreSQL client tools, pass --pg-recvlogical PATH, "
                      "or leave recvlogical out of --readers")


def _exited(proc: "subprocess.Popen[Any]") -> bool:
    """Whether our child has exited, without reaping it (``os.wait4`` must still get its rusage)."""
    if proc.returncode is not None:
        return True
    try:
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _wait_child(proc: "subprocess.Popen[Any]", timeout: float) -> Tuple[Optional[int], Any, float]:
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


class Bench:
    """One ``pgrepl-bench`` run: services, resources, cases, figures."""

    def __init__(self, args: argparse.Namespace, dsn: str, brokers: str, recvlogical: Optional[str],
                 resources: Any, ui: Ui, log_dir: str) -> None:
        self.args = args
        self.dsn = dsn
        self.brokers = brokers
        self.recvlogical = recvlogical
        self.resources = resources
        self.ui = ui
        self.log_dir = log_dir
        self.prefix: str = resources.run_prefix
        self.report: Dict[str, Any] = {}
        self.failures = 0
        self._latency_next_id = 1

    # -- helpers -------------------------------------------------------------------------

    def _log_file(self, name: str) -> Any:
        return open(os.path.join(self.log_dir, f"{name}.log"), "ab")

    def _worker_env(self) -> Dict[str, str]:
        env = dict(os.environ)
        package_parent = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join([package_parent] + [p for p in [env.get("PYTHONPATH")] if p])
        env.setdefault("PGREPL_BENCH_WORKER_LOG", "WARNING")
        return env

    def free_slots(self) -> int:
        """How many more replication slots the server allows."""
        with self.resources.conn.cursor() as cur:
            cur.execute("SELECT current_setting('max_replication_slots')::int - (SELECT count(*) FROM pg_replication_slots)")
            (free,) = cur.fetchone()
        return int(free)

    # -- readers -------------------------------------------------------------------------

    def run_recvlogical(self, slot: str, publication: str, target: str, rows: int) -> Dict[str, Any]:
        """pg_recvlogical to /dev/null until ``--endpos``: wall clock and its own rusage."""
        assert self.recvlogical is not None
        dsn, env = _split_password(self.dsn)
        argv = [self.recvlogical, "-d", dsn, "--start", "-S", slot, "-o", "proto_version=1",
                "-o", f"publication_names={publication}", "-f", "/dev/null", "--endpos", target, "--no-loop"]
        with self._log_file(slot) as logf:
            started = time.perf_counter()
            proc = self.resources.spawn(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=logf,
                                        env=dict(os.environ, PGAPPNAME="pgrepl-bench-recvlogical", **env))
            status, usage, _ = _wait_child(proc, self.args.timeout)
            wall = time.perf_counter() - started
        if status is None:
            self.resources.stop_process(proc)
            return {"ok": False, "error": f"pg_recvlogical timed out after {self.args.timeout} s"}
        self.resources.reaped(proc)
        if status != 0:
            return {"ok": False, "error": f"pg_recvlogical exited with {status} (log {self.log_dir}/{slot}.log)"}
        confirmed = self.resources.slot_confirmed(slot)
        if confirmed is None or _lsn_int(confirmed) < _lsn_int(target):
            return {"ok": False, "error": f"slot confirmed only to {confirmed}, target {target}"}
        cpu = usage.ru_utime + usage.ru_stime
        return {"ok": True, "wall_s": wall, "cpu_user_s": usage.ru_utime, "cpu_sys_s": usage.ru_stime,
                "cpu_s": cpu, "peak_rss_kb": usage.ru_maxrss, "records": None}

    def start_worker(self, reader: str, slot: str, publication: str, topic_map: Dict[str, Any],
                     target: Optional[str], expected: Optional[int], *, latency: bool = False,
                     extra: Optional[Dict[str, Any]] = None) -> Tuple["subprocess.Popen[Any]", "queue.Queue[Dict[str, Any]]"]:
        """Start ``python -m pgrepl.bench.worker`` for ``reader``; events arrive on the queue."""
        spec: Dict[str, Any] = {
            "reader": reader, "dsn": self.dsn, "brokers": self.brokers, "slot": slot, "publication": publication,
            "topic_map": topic_map, "target_lsn": _lsn_int(target) if target else None, "expected": expected,
            "timeout": self.args.timeout, "feedback_interval": 0.05,
        }
        if latency:
            spec["latency_column"] = LATENCY_STAMP_COLUMN
        spec.update(extra or {})
        logf = self._log_file(slot)
        proc = self.resources.spawn([sys.executable, "-m", "pgrepl.bench.worker"], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=logf, env=self._worker_env(), text=True)
        logf.close()
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(json.dumps(spec) + "\n")
        proc.stdin.flush()
        events: "queue.Queue[Dict[str, Any]]" = queue.Queue()
        stdout = proc.stdout

        def pump() -> None:
            for line in stdout:
                with contextlib.suppress(ValueError):
                    events.put(json.loads(line))
            events.put({"event": "eof"})

        threading.Thread(target=pump, name=f"bench-{reader}", daemon=True).start()
        return proc, events

    def finish_worker(self, proc: "subprocess.Popen[Any]", events: "queue.Queue[Dict[str, Any]]",
                      slot: str) -> Dict[str, Any]:
        """Follow the worker's progress until it exits; its result plus its peak RSS from wait4."""
        result: Optional[Dict[str, Any]] = None
        deadline = time.monotonic() + self.args.timeout + 60
        while True:
            try:
                event = events.get(timeout=0.2)
            except queue.Empty:
                if time.monotonic() > deadline:
                    self.resources.stop_process(proc)
                    return {"ok": False, "error": f"worker timed out (log {self.log_dir}/{slot}.log)"}
                if _exited(proc):
                    break
                continue
            if event.get("event") == "progress":
                self.ui.advance_rows(int(event.get("records", 0)))
            elif event.get("event") == "result":
                result = event
            elif event.get("event") == "eof":
                break
        with contextlib.suppress(Exception):
            if proc.stdin is not None:
                proc.stdin.close()
        status, usage, _ = _wait_child(proc, 60) if proc.returncode is None else (proc.returncode, None, 0.0)
        if status is None:
            self.resources.stop_process(proc)
        else:
            self.resources.reaped(proc)
        if result is None:
            return {"ok": False, "error": f"worker exited with {status} without a result (log {self.log_dir}/{slot}.log)"}
        if usage is not None:
            result["peak_rss_kb"] = max(int(result.get("peak_rss_kb") or 0), usage.ru_maxrss)
        result["cpu_s"] = float(result.get("cpu_user_s", 0.0)) + float(result.get("cpu_sys_s", 0.0))
        if not result.get("ok"):
            result["error"] = f"{result.get('error')} (log {self.log_dir}/{slot}.log)"
        return result

    def run_reader(self, reader: str, slot: str, publication: str, table: str, workload: Workload,
                   target: str, rows: int, topic: str) -> Dict[str, Any]:
        """One timed run of ``reader`` over the changes, with its figures per row."""
        if reader == "recvlogical":
            result = self.run_recvlogical(slot, publication, target, rows)
        else:
            self.resources.create_topic(topic, self.args.partitions)
            topic_map = {table: {"name": topic, "partition_key": list(workload.partition_key)}}
            proc, events = self.start_worker(reader, slot, publication, topic_map, target, rows)
            result = self.finish_worker(proc, events, slot)
            if result.get("ok") and result.get("records") != rows:
                log.warning("%s produced %s records for %d row changes", reader, result.get("records"), rows)
        if result.get("ok"):
            result["rows_per_s"] = rows / result["wall_s"]
            result["cpu_us_per_row"] = result["cpu_s"] / rows * 1e6
            result["peak_rss_mb"] = result["peak_rss_kb"] / 1024.0
        return result

    # -- throughput cases ----------------------------------------------------------------

    def run_case(self, case_no: int, workload: Workload, tx_mode: str) -> Dict[str, Any]:
        """One workload in one transaction shape: rounds of (tables, slots, changes, readers)."""
        from pgrepl.bench.report import summarize_case
        from pgrepl.bench.workloads import create_table_sql, generate, preload

        args = self.args
        readers = args.readers
        changes_planned = workload.changes_for(args.rows)
        free = self.free_slots()
        if free >= len(readers) * args.repeat:
            rounds = [list(range(args.repeat))]
        elif free >= len(readers):
            log.warning("only %d free replication slots: making the changes once per repeat instead of once", free)
            rounds = [[r] for r in range(args.repeat)]
        else:
            raise ConfigError(f"the server has {free} free replication slots; pgrepl-bench needs {len(readers)} "
                              "(raise max_replication_slots)")
        case: Dict[str, Any] = {"workload": workload.name, "description": workload.description, "tx_mode": tx_mode,
                                "tx_size": args.tx_size if tx_mode == "small" else None, "changes": changes_planned,
                                "runs": [], "generation": []}
        tag = f"{self.prefix}c{case_no}"
        for round_no, repeats in enumerate(rounds):
            table = f"{tag}r{round_no}_{workload.name}"
            publication = f"{tag}r{round_no}_pub"
            self.ui.step(f"{workload.name}/{tx_mode}: loading rows for updates and deletes", None)
            self.resources.create_table(table, create_table_sql(table, workload.columns, workload.external_columns))
            with self.resources.conn.cursor() as cur:
                preload(cur, workload, table, changes_planned)
            self.resources.create_publication(publication, [table])
            slots = {(rep, reader): f"{tag}r{rep}_{reader}" for rep in repeats for reader in readers}
            for slot in slots.values():
                self.resources.create_slot(slot)
            self.ui.done_step()
            self.ui.step(f"{workload.name}/{tx_mode}: making {changes_planned:,} row changes", changes_planned)
            generated = generate(self.resources.conn, workload, table, changes_planned, tx_mode, args.tx_size,
                                 progress=self.ui.add_rows)
            self.ui.done_step()
            case["changes"] = generated.changes
            case["transactions"] = generated.transactions
            case["generation"].append({"seconds": generated.seconds, "target_lsn": generated.target_lsn,
                                       "by_kind": generated.by_kind})
            for rep in repeats:
                order = readers[rep % len(readers):] + readers[:rep % len(readers)]
                for reader in order:
                    slot = slots[(rep, reader)]
                    topic = slot
                    self.ui.step(f"{workload.name}/{tx_mode} run {rep + 1}/{args.repeat}: {reader}",
                                 None if reader == "recvlogical" else generated.changes)
                    result = self.run_reader(reader, slot, publication, table, workload, generated.target_lsn,
                                             generated.changes, topic)
                    result.update(reader=reader, repeat=rep)
                    case["runs"].append(result)
                    if not result.get("ok"):
                        self.failures += 1
                        self.ui.note(f"[{workload.name}/{tx_mode}] {reader} run {rep + 1} failed: {result.get('error')}")
                    self.resources.drop_slot(slot)
                    keep = (args.consumer and reader == "pgrepl" and rep == args.repeat - 1 and result.get("ok"))
                    if reader in KAFKA_READERS and not keep:
                        self.resources.delete_topic(topic)
                    if keep:
                        case["consumer_topic"] = topic
                        case["consumer_table"] = table
                    self.ui.done_step()
            self.resources.drop_publication(publication)
            self.resources.drop_table(table)
        for run in case["runs"]:
            run.pop("latencies_s", None)
        case["summary"] = summarize_case(case["runs"], readers)
        return case

    # -- latency -------------------------------------------------------------------------

    def run_latency(self) -> Dict[str, Any]:
        """Commit-to-delivery latency of each Kafka reader on a low-rate workload."""
        from pgrepl.bench.report import Figure, percentile
        from pgrepl.bench.workloads import create_table_sql, generate_latency_rows

        args = self.args
        table = f"{self.prefix}latency"
        publication = f"{self.prefix}latency_pub"
        self.resources.create_table(table, create_table_sql(table, LATENCY_COLUMNS))
        self.resources.create_publication(publication, [table])
        readers = [r for r in args.readers if r in KAFKA_READERS]
        per_reader: Dict[str, Dict[str, List[float]]] = {r: {"p50": [], "p99": [], "max": [], "rows": []} for r in readers}
        errors: Dict[str, str] = {}
        for rep in range(args.repeat):
            for reader in readers:
                slot = f"{self.prefix}lat{rep}_{reader}"
                self.ui.step(f"latency run {rep + 1}/{args.repeat}: {reader}, {args.latency_rate} rows/s for "
                             f"{args.latency_seconds:g} s", int(args.latency_rate * args.latency_seconds))
                self.resources.create_slot(slot)
                self.resources.create_topic(slot, args.partitions)
                topic_map = {table: {"name": slot, "partition_key": ["id"]}}
                proc, events = self.start_worker(reader, slot, publication, topic_map, None, None, latency=True)
                deadline = time.monotonic() + 60
                while not self.resources.slot_active(slot):
                    if _exited(proc) or time.monotonic() > deadline:
                        break
                    time.sleep(0.05)
                time.sleep(0.5)  # let the reader settle into streaming
                generated = generate_latency_rows(self.resources.conn, table, args.latency_rate, args.latency_seconds,
                                                  first_id=self._latency_next_id)
                self._latency_next_id += generated.changes
                assert proc.stdin is not None
                with contextlib.suppress(OSError):
                    proc.stdin.write(json.dumps({"target_lsn": _lsn_int(generated.target_lsn),
                                                 "expected": generated.changes}) + "\n")
                    proc.stdin.flush()
                result = self.finish_worker(proc, events, slot)
                self.resources.drop_slot(slot)
                self.resources.delete_topic(slot)
                self.ui.done_step()
                samples = [s * 1000.0 for s in result.get("latencies_s") or []]
                if not result.get("ok") or not samples:
                    self.failures += 1
                    errors[reader] = str(result.get("error") or "no delivery reports")
                    continue
                entry = per_reader[reader]
                entry["p50"].append(percentile(samples, 0.50) or 0.0)
                entry["p99"].append(percentile(samples, 0.99) or 0.0)
                entry["max"].append(max(samples))
                entry["rows"].append(float(len(samples)))
        self.resources.drop_publication(publication)
        self.resources.drop_table(table)
        out: Dict[str, Any] = {"rate": float(args.latency_rate), "seconds": args.latency_seconds, "readers": {}}
        for reader in readers:
            entry = per_reader[reader]
            if not entry["p50"]:
                out["readers"][reader] = {"error": errors.get(reader, "no runs")}
                continue
            figures = {key: Figure.of(entry[key]) for key in ("p50", "p99", "max")}
            out["readers"][reader] = {"rows": int(sum(entry["rows"]) / len(entry["rows"])),
                                      "p50_ms": figures["p50"].as_dict() if figures["p50"] else None,
                                      "p99_ms": figures["p99"].as_dict() if figures["p99"] else None,
                                      "max_ms": figures["max"].as_dict() if figures["max"] else None}
        return out

    # -- consumers -----------------------------------------------------------------------

    def run_consumers(self, case: Dict[str, Any]) -> List[Dict[str, Any]]:
        """Consumer throughput over the topic the last pgrepl producer run filled."""
        import importlib.util

        from pgrepl.bench.report import Figure

        topic = case.get("consumer_topic")
        base = {"workload": case["workload"], "tx_mode": case["tx_mode"]}
        if not topic:
            return [dict(base, consumer="all", error="the pgrepl producer run failed: no topic to read")]
        rows = case["changes"]
        kinds = [("raw", "reference: confluent-kafka + ReplicationOp.from_json")]
        out: List[Dict[str, Any]] = []
        if importlib.util.find_spec("pgrepl.consumer") is not None:
            kinds += [("basic", "pgrepl basic (start_basic)"),
                      ("idempotent-batch", "pgrepl idempotent batch (start_idempotent_batch)")]
        else:
            out += [dict(base, consumer=f"pgrepl {k}", error="pgrepl.consumer is not part of this installation")
                    for k in ("basic", "idempotent batch")]
        state_table = f"{self.prefix}consumer_state"
        for kind, label in kinds:
            samples: Dict[str, List[float]] = {"rows_per_s": [], "cpu_us_per_row": [], "peak_rss_mb": []}
            error = None
            for rep in range(self.args.repeat):
                name = f"{topic}_{kind.replace('-', '_')}{rep}"
                extra: Dict[str, Any] = {"topic": topic, "group": name}
                if kind == "idempotent-batch":
                    extra["state_table"] = state_table
                    if state_table not in self.resources.tables:
                        self.resources.tables.append(self.resources.owned(state_table))
                self.ui.step(f"{case['workload']}/{case['tx_mode']}: consumer {kind}, run {rep + 1}/{self.args.repeat}",
                             rows)
                proc, events = self.start_worker(f"consume-{kind}", name, "", {}, None, rows, extra=extra)
                result = self.finish_worker(proc, events, name)
                self.ui.done_step()
                if not result.get("ok"):
                    error = str(result.get("error"))
                    self.failures += 1
                    continue
                samples["rows_per_s"].append(rows / result["wall_s"])
                samples["cpu_us_per_row"].append(result["cpu_s"] / rows * 1e6)
                samples["peak_rss_mb"].append(result["peak_rss_kb"] / 1024.0)
            entry: Dict[str, Any] = dict(base, consumer=label)
            if samples["rows_per_s"]:
                for key, values in samples.items():
                    figure = Figure.of(values)
                    entry[key] = figure.as_dict() if figure else None
            else:
                entry["error"] = error or "no runs"
            out.append(entry)
        with contextlib.suppress(Exception):
            self.resources.delete_topic(topic)
        return out


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _interrupts_raise() -> Iterator[None]:
    """SIGTERM behaves like Ctrl-C (so ``finally`` blocks clean up); restored afterwards."""
    def on_term(signum: int, frame: Any) -> None:
        raise BenchInterrupted()

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _shielded() -> Iterator[None]:
    """Cleanup must finish: a second Ctrl-C or SIGTERM would leave slots that pin WAL forever."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _pg_version(resources: Any) -> str:
    with resources.conn.cursor() as cur:
        cur.execute("SHOW server_version")
        (version,) = cur.fetchone()
    return str(version)


def run_decoder(args: argparse.Namespace, ui: Ui) -> Dict[str, Any]:
    """Decoder figures (no services): rows/s, ns/row and speed-up, median of ``--repeat``."""
    from pgrepl.bench import decoder as bench_decoder
    from pgrepl.bench.report import Figure

    stream = bench_decoder.load_stream(args.capture)
    ui.step(f"decoder-only: {stream.source}", None)
    samples = bench_decoder.measure(stream, args.repeat, progress=lambda text: log.info("%s", text))
    ui.done_step()
    out: Dict[str, Any] = {"source": stream.source, "rows": stream.rows, "batch_messages": 1000}
    for key in ("cython", "python"):
        rate = Figure.of(samples[key])
        ns = Figure.of([1e9 / r for r in samples[key]])
        out[key] = {"rows_per_s": rate.as_dict() if rate else None, "ns_per_row": ns.as_dict() if ns else None,
                    "samples": samples[key]}
    speed = Figure.of(bench_decoder.speedups(samples))
    out["speedup"] = speed.as_dict() if speed else None
    return out


def _total_steps(args: argparse.Namespace) -> int:
    if args.decoder_only:
        return 1
    per_case = 2 + args.repeat * len(args.readers)
    steps = len(args.workloads) * len(args.tx_modes) * per_case
    if args.latency_seconds > 0:
        steps += args.repeat * len([r for r in args.readers if r in KAFKA_READERS])
    if args.consumer:
        steps += len(args.workloads) * len(args.tx_modes) * args.repeat * 3
    return int(steps) + (0 if args.no_decoder else 1)


def run(args: argparse.Namespace, argv: Sequence[str]) -> Tuple[Dict[str, Any], int]:
    """Run the benchmark the arguments describe; returns (report, failures)."""
    from pgrepl.bench.report import machine_description
    from pgrepl.bench.resources import BenchResources, new_run_prefix

    report: Dict[str, Any] = {
        "pgrepl_bench": __version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": redacted_command(argv),
        "config": {"workloads": args.workloads, "tx_modes": args.tx_modes, "tx_size": args.tx_size, "rows": args.rows,
                   "repeat": args.repeat, "readers": args.readers, "partitions": args.partitions,
                   "latency_rate": args.latency_rate, "latency_seconds": args.latency_seconds},
    }
    ui = Ui(not args.no_progress, _total_steps(args))
    if args.decoder_only:
        with ui:
            report["machine"] = machine_description(None)
            report["decoder"] = run_decoder(args, ui)
        return report, 0

    failures = 0
    with contextlib.ExitStack() as stack:
        dsn, brokers, bindir = args.dsn, args.brokers, None
        if not dsn or not brokers:
            from pgrepl.testing import LocalBroker, LocalPostgres

            slots_needed = 3 * len(READERS) * args.repeat + 10
            if not dsn:
                sys.stderr.write("pgrepl-bench: starting a throwaway PostgreSQL ...\n")
                pg = LocalPostgres(settings={"max_replication_slots": slots_needed, "max_wal_senders": slots_needed,
                                             "max_wal_size": "4GB", "checkpoint_timeout": "30min"})
                stack.callback(pg.stop)
                pg.start()
                dsn, bindir = pg.dsn, pg.bindir
                report["config"]["postgres"] = "throwaway local server (pgrepl.testing: fsync off, synchronous_commit off)"
            if not brokers:
                sys.stderr.write("pgrepl-bench: starting a throwaway Kafka-protocol broker (tansu, in memory) ...\n")
                broker = LocalBroker()
                stack.callback(broker.stop)
                broker.start()
                brokers = broker.bootstrap
                report["config"]["kafka"] = "throwaway local broker (tansu, in-memory storage)"
        from pgrepl.postgres import preflight
        from pgrepl.postgres.connect import redact_dsn

        report["config"].setdefault("postgres", redact_dsn(dsn))
        report["config"].setdefault("kafka", brokers)
        recvlogical = find_pg_recvlogical(args.pg_recvlogical, bindir) if "recvlogical" in args.readers else None
        log_dir = tempfile.mkdtemp(prefix="pgrepl-bench-")
        resources = BenchResources(dsn, brokers, new_run_prefix())
        try:
            with ui:
                conn = resources.conn
                preflight.check_server(conn)
                report["machine"] = machine_description(_pg_version(resources))
                bench = Bench(args, dsn, brokers, recvlogical, resources, ui, log_dir)
                report["cases"] = []
                case_no = 0
                for name in args.workloads:
                    for tx_mode in args.tx_modes:
                        case = bench.run_case(case_no, WORKLOADS[name], tx_mode)
                        report["cases"].append(case)
                        if args.consumer:
                            report.setdefault("consumer", []).extend(bench.run_consumers(case))
                        case_no += 1
                if args.latency_seconds > 0 and any(r in KAFKA_READERS for r in args.readers):
                    report["latency"] = bench.run_latency()
                if not args.no_decoder:
                    report["decoder"] = run_decoder(args, ui)
                failures = bench.failures
        finally:
            with _shielded():
                problems = resources.cleanup()
                if problems:
                    sys.stderr.write("pgrepl-bench: could not remove: " + "; ".join(problems) + "\n")
                if failures:  # readers' logs are kept only when a run failed
                    sys.stderr.write(f"pgrepl-bench: {failures} run(s) failed; reader logs in {log_dir}\n")
                else:
                    shutil.rmtree(log_dir, ignore_errors=True)
        report["logs"] = log_dir if failures else None
    return report, failures


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``pgrepl-bench`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        with _interrupts_raise():
            if args.drop_leftovers:
                from pgrepl.bench.resources import drop_leftovers, find_leftovers

                leftovers = find_leftovers(args.dsn)
                names = [f"{kind} {name}" for kind, names in leftovers.items() for name in names]
                sys.stdout.write(("dropping: " + ", ".join(names) if names else "nothing left over") + "\n")
                problems = drop_leftovers(args.dsn, leftovers)
                return 1 if problems else 0
            report, failures = run(args, argv)
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (BenchInterrupted)
        sys.stderr.write("pgrepl-bench: interrupted; everything it created was removed\n")
        return 130
    except ConfigError as exc:
        sys.stderr.write(f"pgrepl-bench: {exc}\n")
        return 2
    except PgreplError as exc:
        sys.stderr.write(f"pgrepl-bench: {type(exc).__name__}: {exc}\n")
        return 1
    except Exception as exc:  # PostgreSQL or Kafka refused something: one line, details in the debug log
        log.debug("pgrepl-bench failed", exc_info=True)
        first_line = (str(exc).strip().splitlines() or [""])[0]
        sys.stderr.write(f"pgrepl-bench: failed: {type(exc).__name__}: {first_line} (--log-level DEBUG for details)\n")
        return 1
    from pgrepl.bench.report import print_report, write_json, write_plot

    print_report(report, sys.stdout, markdown=args.markdown)
    if args.json:
        write_json(report, args.json)
        sys.stderr.write(f"pgrepl-bench: figures written to {args.json}\n")
    if args.plot:
        try:
            write_plot(report, args.plot)
            sys.stderr.write(f"pgrepl-bench: plot written to {args.plot}\n")
        except RuntimeError as exc:
            sys.stderr.write(f"pgrepl-bench: {exc}\n")
            return 1
    return 1 if failures else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
