"""The ``pgrepl`` command: ``pgrepl produce --config FILE`` runs the producer."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import List, Optional

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
    return parser


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
    except ConfigError as exc:
        print(f"pgrepl: configuration error: {exc}", file=sys.stderr)
        return 2
    except PgreplError as exc:
        print(f"pgrepl: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
