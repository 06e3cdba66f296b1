"""Producer configuration files (TOML or JSON), with ``${VAR}`` taken from the environment.

Secrets stay out of the file: any string may be ``${NAME}`` (or contain it), and
``dsn_env = "NAME"`` reads the whole DSN from the environment.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Dict, Mapping, Union

from pgrepl.errors import ConfigError

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")

#: Producer settings a config file may give as they are (the Producer checks their values).
PRODUCER_OPTIONS = (
    "truncate", "status_interval", "stop_timeout", "on_slot_loss", "history_topic", "allow_repartition",
    "split_key_changes", "failover", "snapshot", "snapshot_connections", "snapshot_chunk_size",
)

PRODUCER_KEYS = {"dsn", "dsn_env", "brokers", "slot", "publication", "topic_map", "kafka", *PRODUCER_OPTIONS}


def _expand(value: Any, where: str) -> Any:
    if isinstance(value, str):
        def substitute(match: "re.Match[str]") -> str:
            name = match.group(1)
            if name not in os.environ:
                raise ConfigError(f"{where} refers to environment variable {name}, which is not set")
            return os.environ[name]

        return _VAR.sub(substitute, value)
    if isinstance(value, dict):
        return {k: _expand(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, f"{where}[{i}]") for i, v in enumerate(value)]
    return value


def load_file(path: Union[str, Path]) -> Dict[str, Any]:
    """Parse a TOML (``.toml``) or JSON file into a dict, with ``${VAR}`` expanded."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise ConfigError(f"config file {path} is not valid JSON: {exc}") from None
    else:
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # pragma: no cover - exercised on older Pythons
            import tomli as tomllib
        try:
            data = tomllib.loads(raw.decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a table/object at the top level")
    expanded: Dict[str, Any] = _expand(data, path.name)
    return expanded


def producer_kwargs(config: Mapping[str, Any]) -> Dict[str, Any]:
    """Turn a loaded config into ``Producer(**kwargs)`` arguments, checking names and types."""
    unknown = sorted(set(config) - PRODUCER_KEYS)
    if unknown:
        raise ConfigError(f"unknown config keys {unknown}; allowed: {sorted(PRODUCER_KEYS)}")
    dsn = config.get("dsn")
    if dsn is None and "dsn_env" in config:
        name = config["dsn_env"]
        dsn = os.environ.get(name)
        if not dsn:
            raise ConfigError(f"dsn_env names environment variable {name}, which is not set")
    missing = [k for k, v in (("dsn", dsn), ("brokers", config.get("brokers")), ("slot", config.get("slot")),
                              ("publication", config.get("publication")), ("topic_map", config.get("topic_map")))
               if not v]
    if missing:
        raise ConfigError(f"config lacks {', '.join(missing)}")
    kwargs: Dict[str, Any] = {
        "pg_dsn": dsn,
        "brokers": config["brokers"],
        "slot": config["slot"],
        "publication": config["publication"],
        "topic_map": config["topic_map"],
        "kafka_config": dict(config.get("kafka") or {}),
    }
    for key in PRODUCER_OPTIONS:
        if key in config:
            kwargs[key] = config[key]
    return kwargs
