"""The ``pgrepl`` command: ``pgrepl produce --config FILE`` runs the producer."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any, List, Optional

from pgrepl._version import __version__
from pgrepl.errors import ConfigError, PgreplError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pgrepl", description="Stream PostgreSQL logical replication into Kafka.")
    parser.add_argument("--version", action="version", version=f"pgrepl {__version__}")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    commands = parser.add_subparsers(dest="command", required=True)
    produce = commands.add_parser("produce", help="stream a slot's changes into Kafka until stopped (SIGTERM/Ctrl-C)")
    produce.add_argument("--config", required=True, help="TOML or JSON file: dsn, brokers, slot, publication, topic_map, kafka")
    produce.add_argument("--status-interval", type=float, default=None, help="seconds between status lines (default 10)")
    consume = commands.add_parser("consume", help="print the ops of Kafka topics as JSON lines (inspection, piping)")
    consume.add_argument("--topics", required=True, help="comma-separated topic names")
    consume.add_argument("--group", required=True, help="consumer group id")
    consume.add_argument("--brokers", default="localhost:9092", help="bootstrap servers (default localhost:9092)")
    consume.add_argument("--kafka", action="append", default=[], metavar="KEY=VALUE",
                         help="extra librdkafka setting, repeatable (e.g. security.protocol=SSL)")
    consume.add_argument("--until-eof", action="store_true", help="exit once every assigned partition is read to its end")
    consume.add_argument("--no-commit", action="store_true", help="never commit offsets: the group does not move")
    consume.add_argument("--meta", action="store_true",
                         help='print {"topic","partition","offset","op"} objects instead of bare ops')
    return parser


def _consume(args: argparse.Namespace) -> int:
    """``pgrepl consume``: ops as JSON lines on stdout; a record that is not an op stops it (exit 1)."""
    import orjson

    from pgrepl.consumer import Consumer, StopConsuming

    kafka_config = {}
    for item in args.kafka:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--kafka expects KEY=VALUE, got {item!r}")
        kafka_config[key.strip()] = value
    consumer = Consumer(args.group, args.topics, args.brokers, kafka_config, on_error="stop", max_attempts=1,
                        commit_offsets=not args.no_commit, stop_at_eof=args.until_eof)
    out = sys.stdout.buffer

    def write(records: List[Any]) -> None:
        if args.meta:
            data = b"".join(b'{"topic":%s,"partition":%d,"offset":%d,"op":%s}\n' % (
                orjson.dumps(msg.topic()), msg.partition(), msg.offset(), msg.value()) for msg, _ in records)
        else:
            data = b"".join(msg.value() + b"\n" for msg, _ in records)
        try:
            out.write(data)
            out.flush()
        except BrokenPipeError:  # the reader went away (| head): stop, without committing this batch
            sys.stdout = open(os.devnull, "w")
            raise StopConsuming() from None

    consumer.start_basic_batch(write, with_records=True)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``pgrepl`` console script; returns the exit status."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "produce":
            from pgrepl.config import load_file, producer_kwargs
            from pgrepl.producer import Producer

            kwargs = producer_kwargs(load_file(args.config))
            if args.status_interval is not None:
                kwargs["status_interval"] = args.status_interval
            Producer(**kwargs).start()
        elif args.command == "consume":
            return _consume(args)
    except ConfigError as exc:
        print(f"pgrepl: configuration error: {exc}", file=sys.stderr)
        return 2
    except PgreplError as exc:
        print(f"pgrepl: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
