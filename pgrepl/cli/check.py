"""``pgrepl check --config FILE``: every preflight check, each printed with its fix; nothing is created.

No slot, no topic, no record: PostgreSQL is only read, Kafka only asked for metadata (for all
topics, which never auto-creates one) and the slot history only read. Exit status 2 when a
check says the configuration must change, 1 when something could not be reached, else 0.
"""

from __future__ import annotations

import argparse
from typing import Any, Dict, List

from pgrepl.cli.checks import Checkup, Result
from pgrepl.cli.common import print_json
from pgrepl.cli.errors import CONFIG, RUNTIME, SECRETS


def add_parser(commands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    check = commands.add_parser("check", help="run every preflight check of a producer config, creating nothing")
    check.add_argument("--config", required=True, help="the producer's config file (TOML or JSON)")
    check.add_argument("--json", action="store_true", help="print the results as JSON (for scripts)")
    check.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for Kafka (default 10)")
    check.set_defaults(run=run)


def exit_status(results: List[Result]) -> int:
    """2 if a check failed on configuration, 1 if one failed to reach something, else 0."""
    failed = [r for r in results if r.status == "fail"]
    if any(r.kind == "config" for r in failed):
        return CONFIG
    return RUNTIME if failed else 0


def run(args: argparse.Namespace) -> int:
    results = Checkup(args.config, kafka_timeout=args.timeout).run()
    if args.json:
        summary: Dict[str, Any] = {"ok": exit_status(results) == 0, "results": [r.as_dict() for r in results]}
        print_json(summary)
    else:
        width = max(len(r.name) for r in results)
        for r in results:
            print(SECRETS.scrub(f"{r.status.upper():4}  {r.name.ljust(width)}  {r.detail}"))
        failed = sum(r.status == "fail" for r in results)
        print(f"{failed} check{'s' if failed != 1 else ''} failed" if failed else "all checks passed")
    return exit_status(results)


__all__ = ["Checkup", "Result", "exit_status", "run"]
