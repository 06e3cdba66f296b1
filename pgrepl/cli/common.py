"""What several commands share: where the settings come from (``--config``, ``--dsn``, ``--brokers``,
``--kafka``), printing tables and JSON, and asking the server who it is."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from pgrepl.cli.errors import SECRETS
from pgrepl.errors import ConfigError
from pgrepl.producer.history import DEFAULT_HISTORY_TOPIC


@dataclass
class Target:
    """Where a command works: the PostgreSQL DSN, and Kafka when it needs it."""

    dsn: Optional[str] = None
    brokers: Optional[str] = None
    kafka: Dict[str, Any] = field(default_factory=dict)
    history_topic: str = DEFAULT_HISTORY_TOPIC
    config: Dict[str, Any] = field(default_factory=dict)


def parse_kafka_items(items: Sequence[str]) -> Dict[str, str]:
    """``--kafka KEY=VALUE`` options as a dict."""
    settings: Dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--kafka expects KEY=VALUE, got {item!r}")
        settings[key.strip()] = value
    return settings


def add_target_options(parser: argparse.ArgumentParser, *, kafka: bool) -> None:
    parser.add_argument("--config", help="the producer's config file (TOML or JSON): dsn, brokers, kafka settings")
    parser.add_argument("--dsn", help="PostgreSQL DSN (instead of --config; prefer PGPASSWORD or ~/.pgpass "
                        "for the password)")
    if kafka:
        parser.add_argument("--brokers", help="Kafka bootstrap servers (instead of --config's)")
        parser.add_argument("--kafka", action="append", default=[], metavar="KEY=VALUE",
                            help="extra librdkafka setting, repeatable (e.g. security.protocol=SSL)")
        parser.add_argument("--history-topic", help=f"the slot history topic (default {DEFAULT_HISTORY_TOPIC})")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text (for scripts)")


def resolve_target(args: argparse.Namespace, *, need_dsn: bool = True) -> Target:
    """The settings of ``--config`` (if given), overridden by the command-line options."""
    from pgrepl.config import config_dsn, kafka_table, load_file

    target = Target()
    if getattr(args, "config", None):
        config = load_file(args.config)
        target.config = config
        target.dsn = config_dsn(config)
        target.brokers = config.get("brokers")
        target.kafka = kafka_table(config)
        target.history_topic = config.get("history_topic") or DEFAULT_HISTORY_TOPIC
    if getattr(args, "dsn", None):
        target.dsn = args.dsn
    if getattr(args, "brokers", None):
        target.brokers = args.brokers
    target.kafka.update(parse_kafka_items(getattr(args, "kafka", None) or []))
    if getattr(args, "history_topic", None):
        target.history_topic = args.history_topic
    SECRETS.add_dsn(target.dsn)
    SECRETS.add_kafka(target.kafka)
    if need_dsn and not target.dsn:
        raise ConfigError("no PostgreSQL DSN: give --dsn or --config FILE (with dsn or dsn_env)")
    return target


def identify(dsn: str) -> Tuple[str, str]:
    """(system identifier, database) of the server, from a replication connection (no slot is made)."""
    from pgrepl.postgres.connect import connect, identify_system

    conn = connect(dsn, replication=True, application_name="pgrepl/cli")
    try:
        return identify_system(conn)
    finally:
        conn.close()


def print_json(data: Any) -> None:
    print(SECRETS.scrub(json.dumps(data, indent=2, sort_keys=True, default=str)))


def print_table(rows: List[Dict[str, Any]], columns: Sequence[str]) -> None:
    """Rows as aligned columns (``-`` for None)."""
    cells = [[("-" if row.get(c) is None else str(row.get(c))) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    for line in [list(columns), *cells]:
        print(SECRETS.scrub("  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip()))


def confirm(question: str, yes: bool) -> bool:
    """True with ``--yes``; otherwise asks on the terminal (never assumes yes without one)."""
    if yes:
        return True
    if not sys.stdin.isatty():
        raise ConfigError(f"{question} needs confirmation: run it on a terminal, or add --yes")
    answer = input(f"{question} [y/N] ")
    return answer.strip().lower() in ("y", "yes")
