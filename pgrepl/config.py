"""Configuration files of ``pgrepl produce`` and ``pgrepl consume`` (TOML or JSON), with ``${VAR}`` from the environment.

Secrets stay out of the file: any string may be ``${NAME}`` (or contain it), and
``dsn_env = "NAME"`` reads the whole DSN from the environment. librdkafka settings are dotted
names; written unquoted in TOML (``security.protocol = "SSL"`` under ``[kafka]``) they parse as
nested tables, so the ``kafka`` table is flattened back into dotted names, and so are
``[topic_map.schema.table]`` entries.
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

#: Settings the observability exporter takes (both sides).
METRICS_KEYS = ("metrics_port", "metrics_host")

#: Producer settings a config file may give as they are (the Producer checks their values).
PRODUCER_OPTIONS = (
    "truncate", "status_interval", "stop_timeout", "on_slot_loss", "history_topic", "allow_repartition",
    "split_key_changes", "failover", "snapshot", "snapshot_connections", "snapshot_chunk_size", *METRICS_KEYS,
    "wal_warning_bytes", "safe_wal_warning_bytes",
)

PRODUCER_KEYS = {"dsn", "dsn_env", "brokers", "slot", "publication", "topic_map", "kafka", *PRODUCER_OPTIONS}

#: Settings of ``pgrepl consume --config``.
CONSUMER_KEYS = {"brokers", "topics", "group", "kafka", *METRICS_KEYS}


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


def flatten_dotted(table: Mapping[str, Any], where: str) -> Dict[str, Any]:
    """``{"security": {"protocol": "SSL"}}`` (TOML's reading of unquoted ``security.protocol``) as
    ``{"security.protocol": "SSL"}``; a key given both ways is an error."""
    flat: Dict[str, Any] = {}
    for key, value in table.items():
        items = flatten_dotted(value, where).items() if isinstance(value, dict) else [("", value)]
        for sub, leaf in items:
            name = f"{key}.{sub}" if sub else str(key)
            if name in flat:
                raise ConfigError(f"{where} sets {name!r} twice (once quoted, once as a dotted key)")
            flat[name] = leaf
    return flat


def _topic_map_entries(topic_map: Any) -> Any:
    """``[topic_map.public.orders]`` parses as schema ``public`` holding table ``orders``: an entry
    without ``name`` whose values are all tables is such a schema."""
    if not isinstance(topic_map, dict):
        return topic_map
    out: Dict[str, Any] = {}
    for key, entry in topic_map.items():
        if isinstance(entry, dict) and entry and "name" not in entry and all(isinstance(v, dict) for v in entry.values()):
            out.update({f"{key}.{table}": info for table, info in entry.items()})
        else:
            out[key] = entry
    return out


def _check_keys(config: Mapping[str, Any], allowed: Any, what: str) -> None:
    unknown = sorted(set(config) - set(allowed))
    if unknown:
        raise ConfigError(f"unknown config keys {unknown}; allowed in a {what} config: {sorted(allowed)}")


def kafka_table(config: Mapping[str, Any]) -> Dict[str, Any]:
    """The ``kafka`` table of a config, with dotted names (see ``flatten_dotted``)."""
    kafka = config.get("kafka") or {}
    if not isinstance(kafka, dict):
        raise ConfigError(f"kafka must be a table of librdkafka settings, got {type(kafka).__name__}")
    return flatten_dotted(kafka, "the kafka table")


def config_dsn(config: Mapping[str, Any]) -> Any:
    """The DSN of a config: ``dsn``, or the environment variable ``dsn_env`` names."""
    dsn = config.get("dsn")
    if dsn is None and "dsn_env" in config:
        name = config["dsn_env"]
        dsn = os.environ.get(name)
        if not dsn:
            raise ConfigError(f"dsn_env names environment variable {name}, which is not set")
    return dsn


def producer_kwargs(config: Mapping[str, Any]) -> Dict[str, Any]:
    """Turn a loaded config into ``Producer(**kwargs)`` arguments, checking names and types."""
    _check_keys(config, PRODUCER_KEYS, "producer")
    dsn = config_dsn(config)
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
        "topic_map": _topic_map_entries(config["topic_map"]),
        "kafka_config": kafka_table(config),
    }
    for key in PRODUCER_OPTIONS:
        if key in config:
            kwargs[key] = config[key]
    return kwargs


def consumer_settings(config: Mapping[str, Any]) -> Dict[str, Any]:
    """A ``pgrepl consume`` config checked: brokers, topics, group, kafka (flattened), metrics."""
    _check_keys(config, CONSUMER_KEYS, "consumer")
    settings = dict(config)
    if "kafka" in settings:
        settings["kafka"] = kafka_table(config)
    topics = settings.get("topics")
    if isinstance(topics, list):
        settings["topics"] = ",".join(str(t) for t in topics)
    return settings
