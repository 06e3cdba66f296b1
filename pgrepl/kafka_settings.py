"""librdkafka settings: the one merge of pgrepl's defaults, the user's ``kafka_config`` and what pgrepl requires."""

from __future__ import annotations

import logging
from typing import Any, Dict, Mapping, Optional

from pgrepl.errors import ConfigError

#: ``kafka_config`` keys about reaching and authenticating to the brokers: what a second client
#: of the same application (the consumer's dead-letter producer) shares with the first.
CONNECTION_PREFIXES = ("security.", "sasl.", "ssl.", "client.", "socket.", "broker.", "metadata.",
                       "reconnect.", "api.version", "retry.backoff", "connections.", "log.", "debug",
                       "client.dns.lookup", "resolve.")


def same_value(given: Any, wanted: Any) -> bool:
    """Whether a user's setting says the same as pgrepl's (librdkafka takes strings, bools and numbers)."""
    return str(given).strip().lower() == str(wanted).strip().lower()


def merge(
    user: Mapping[str, Any],
    *,
    defaults: Mapping[str, Any],
    required: Mapping[str, Any],
    required_because: str,
    arguments: Optional[Mapping[str, Any]] = None,
    logger: Optional[logging.Logger] = None,
) -> Dict[str, Any]:
    """``defaults``, then the user's settings, then ``required`` and ``arguments`` on top.

    The user may repeat a required setting with the same value but not change it
    (``ConfigError`` names the setting and ``required_because``); ``arguments`` are settings
    the caller took as constructor arguments (``bootstrap.servers``...), which ``kafka_config``
    may not contradict. librdkafka's log lines go to ``logger`` unless the user set one.
    """
    if not isinstance(user, Mapping):
        raise ConfigError(f"kafka_config must be a mapping of librdkafka settings, got {type(user).__name__}")
    for key, value in required.items():
        if key in user and not same_value(user[key], value):
            raise ConfigError(f"kafka_config may not set {key}={user[key]!r}: pgrepl needs {key}={value!r} ({required_because})")
    for key, value in (arguments or {}).items():
        if key in user and user[key] != value:
            raise ConfigError(f"kafka_config sets {key}={user[key]!r}, which conflicts with the argument {value!r}")
    settings: Dict[str, Any] = dict(defaults)
    settings.update(user)
    settings.update(required)
    settings.update(arguments or {})
    if logger is not None:
        settings.setdefault("logger", logger)
    return settings


def connection_settings(user: Mapping[str, Any]) -> Dict[str, Any]:
    """The part of ``kafka_config`` that says how to reach and authenticate to the brokers."""
    return {key: value for key, value in user.items() if key.startswith(CONNECTION_PREFIXES)}
