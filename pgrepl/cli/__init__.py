"""The ``pgrepl`` command: one module per command, one line per failure.

* ``produce``  run the producer from a config file
* ``consume``  print ops as JSON lines
* ``check``    every preflight check, without streaming or creating anything
* ``status``   the server's logical slots, with pgrepl's own state
* ``slot``     ``slot drop NAME``, ``slot forget NAME``
* ``snapshot`` ask the running producer for a snapshot
* ``errors``   exit statuses, the one-line messages, secrets kept out of every line
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import List, Optional

from pgrepl._version import __version__
from pgrepl.cli import check, consume, produce, slot, snapshot, status
from pgrepl.cli.errors import ScrubSecrets, report

log = logging.getLogger("pgrepl.cli")


def parser() -> argparse.ArgumentParser:
    """The argument parser of every command."""
    root = argparse.ArgumentParser(prog="pgrepl", description="Stream PostgreSQL logical replication into Kafka.")
    root.add_argument("--version", action="version", version=f"pgrepl {__version__}")
    root.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    commands = root.add_subparsers(dest="command", required=True)
    for module in (produce, consume, check, status, slot, snapshot):
        module.add_parser(commands)
    return root


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``pgrepl`` console script; returns the exit status (0 ok, 1 runtime, 2 configuration)."""
    args = parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, ScrubSecrets) for f in handler.filters):
            handler.addFilter(ScrubSecrets())
    try:
        return int(args.run(args))
    except BaseException as exc:  # noqa: BLE001 - every failure becomes one line and an exit status
        if isinstance(exc, SystemExit):
            raise
        code, line = report(exc)
        log.debug("%s", line, exc_info=True)
        print(line, file=sys.stderr)
        return code
