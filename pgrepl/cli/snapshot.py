"""``pgrepl snapshot --config FILE [--table T ...] [--where SQL]``: ask the running producer for a snapshot."""

from __future__ import annotations

import argparse
import json

from pgrepl.cli.produce import producer_config


def add_parser(commands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    snapshot = commands.add_parser(
        "snapshot", help="ask the producer for a snapshot of published tables, while it keeps streaming")
    snapshot.add_argument("--config", required=True, help="the producer's config file (TOML or JSON)")
    snapshot.add_argument("--table", action="append", default=[], metavar="TABLE",
                          help="table or schema.table, repeatable (default: every published table)")
    snapshot.add_argument("--where", default=None, help="only the rows this SQL condition holds for")
    snapshot.add_argument("--json", action="store_true", help="print the request as JSON (for scripts)")
    snapshot.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Checks the tables and the filter, then writes the request to the WAL (the active producer sees it)."""
    from pgrepl.producer import Producer

    producer = Producer(**producer_config(args.config))
    job = producer.request_snapshot(args.table or None, where=args.where)
    if args.json:
        print(json.dumps({"snapshot": job, "tables": args.table or None, "where": args.where}))
    else:
        tables = ", ".join(args.table) if args.table else "every published table"
        print(f"snapshot {job} requested: {tables}{' where ' + args.where if args.where else ''}; the active "
              "producer takes it from its stream (its log and metrics show the progress)")
    return 0
