"""``pgrepl consume``: print the ops of Kafka topics as JSON lines (inspection, piping)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Dict, List

from pgrepl.cli.common import parse_kafka_items
from pgrepl.cli.errors import SECRETS
from pgrepl.cli.produce import add_metrics_options, metrics_overrides
from pgrepl.errors import ConfigError


def add_parser(commands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    consume = commands.add_parser("consume", help="print the ops of Kafka topics as JSON lines (inspection, piping)")
    consume.add_argument("--config", help="TOML or JSON file: brokers, topics, group, kafka (secrets as ${VAR}), "
                         "metrics_port; options given here win")
    consume.add_argument("--topics", help="comma-separated topic names")
    consume.add_argument("--group", help="consumer group id")
    consume.add_argument("--brokers", help="bootstrap servers (default localhost:9092)")
    consume.add_argument("--kafka", action="append", default=[], metavar="KEY=VALUE",
                         help="extra librdkafka setting, repeatable (e.g. security.protocol=SSL)")
    consume.add_argument("--until-eof", action="store_true", help="exit once every assigned partition is read to its end")
    consume.add_argument("--no-commit", action="store_true", help="never commit offsets: the group does not move")
    consume.add_argument("--meta", action="store_true",
                         help='print {"topic","partition","offset","op"} objects instead of bare ops')
    add_metrics_options(consume)
    consume.set_defaults(run=run)


def settings(args: argparse.Namespace) -> Dict[str, Any]:
    """The config file's settings (if any) with the command-line options over them."""
    from pgrepl.config import consumer_settings, load_file

    config = consumer_settings(load_file(args.config)) if args.config else {}
    for key in ("topics", "group", "brokers"):
        if getattr(args, key):
            config[key] = getattr(args, key)
    config["kafka"] = {**(config.get("kafka") or {}), **parse_kafka_items(args.kafka)}
    config.setdefault("brokers", "localhost:9092")
    missing = [f"--{key}" for key in ("topics", "group") if not config.get(key)]
    if missing:
        raise ConfigError(f"pgrepl consume needs {' and '.join(missing)} (or the same keys in --config FILE)")
    SECRETS.add_kafka(config["kafka"])
    return config


def run(args: argparse.Namespace) -> int:
    """Ops as JSON lines on stdout; a record that is not an op stops it (exit 1)."""
    import orjson

    from pgrepl.consumer import Consumer, StopConsuming

    config = settings(args)
    extra: Dict[str, Any] = {}
    metrics_overrides(args, extra)
    for key in ("metrics_port", "metrics_host"):
        if key in config and key not in extra:
            extra[key] = config[key]
    consumer = Consumer(config["group"], config["topics"], config["brokers"], config["kafka"], on_error="stop",
                        max_attempts=1, commit_offsets=not args.no_commit, stop_at_eof=args.until_eof, **extra)
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
