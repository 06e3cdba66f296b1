"""``pgrepl produce --config FILE``: run the producer until SIGTERM/Ctrl-C."""

from __future__ import annotations

import argparse
from typing import Any, Dict

from pgrepl.cli.errors import SECRETS


def add_parser(commands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    produce = commands.add_parser("produce", help="stream a slot's changes into Kafka until stopped (SIGTERM/Ctrl-C)")
    produce.add_argument("--config", required=True, help="TOML or JSON file: dsn, brokers, slot, publication, topic_map, kafka")
    produce.add_argument("--status-interval", type=float, default=None, help="seconds between status lines (default 10)")
    add_metrics_options(produce)
    produce.set_defaults(run=run)


def add_metrics_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--metrics-port", type=int, default=None,
                        help="serve Prometheus metrics, /healthz and /readyz on this port (pip install 'pgrepl[metrics]')")
    parser.add_argument("--metrics-host", default=None, help="address to serve them on (default 0.0.0.0)")


def metrics_overrides(args: argparse.Namespace, kwargs: Dict[str, Any]) -> None:
    """``--metrics-port``/``--metrics-host`` win over the config file's."""
    if args.metrics_port is not None:
        kwargs["metrics_port"] = args.metrics_port
    if args.metrics_host is not None:
        kwargs["metrics_host"] = args.metrics_host


def producer_config(path: str) -> Dict[str, Any]:
    """``Producer(**kwargs)`` arguments from a config file, its secrets registered for scrubbing."""
    from pgrepl.config import load_file, producer_kwargs

    kwargs = producer_kwargs(load_file(path))
    SECRETS.add_dsn(kwargs["pg_dsn"])
    SECRETS.add_kafka(kwargs["kafka_config"])
    return kwargs


def run(args: argparse.Namespace) -> int:
    from pgrepl.producer import Producer

    kwargs = producer_config(args.config)
    if args.status_interval is not None:
        kwargs["status_interval"] = args.status_interval
    metrics_overrides(args, kwargs)
    Producer(**kwargs).start()
    return 0
