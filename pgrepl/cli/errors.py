"""How the CLI reports failures: one line, what is wrong and what to change, no traceback, no secret.

Exit status 2 for what the user must change (configuration, DSN, settings, schema), 1 for
runtime failures (an outage, a refused change). Every line, and every log line, passes through
``SECRETS``, which knows the passwords of the DSNs and Kafka settings the command was given.
"""

from __future__ import annotations

import logging
import re
from typing import Any, List, Mapping, Tuple

import psycopg2
import psycopg2.errors
from confluent_kafka import KafkaError, KafkaException

from pgrepl.errors import ConfigError, PgreplError, first_line
from pgrepl.postgres.connect import dsn_secrets, redact_dsn, scrub
from pgrepl.postgres.lease import LeaseLost
from pgrepl.producer.output import Retry

CONFIG = 2
RUNTIME = 1

#: librdkafka error codes that mean a setting is wrong, not that something is down.
_KAFKA_CONFIG_CODES = {KafkaError._INVALID_ARG, KafkaError._SSL, KafkaError._NOT_CONFIGURED,
                       KafkaError.SASL_AUTHENTICATION_FAILED, KafkaError._AUTHENTICATION}
#: Kafka setting names whose values are secrets.
_SECRET_SETTING = re.compile(r"password|secret|token|\.pem$|key$", re.IGNORECASE)


class Secrets:
    """The secrets this command was given; ``scrub`` hides them (and passwords in DSNs) in any text."""

    def __init__(self) -> None:
        self._values: List[str] = []

    def add_dsn(self, dsn: Any) -> None:
        if isinstance(dsn, str):
            self._add(dsn_secrets(dsn))

    def add_kafka(self, settings: Mapping[str, Any]) -> None:
        self._add(str(v) for k, v in settings.items() if _SECRET_SETTING.search(str(k)) and v not in (None, ""))

    def _add(self, values: Any) -> None:
        self._values = sorted({*self._values, *values}, key=len, reverse=True)

    def scrub(self, text: str) -> str:
        return scrub(text, self._values)


SECRETS = Secrets()


class ScrubSecrets(logging.Filter):
    """Logging filter: a record's formatted message with ``SECRETS`` hidden."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = SECRETS.scrub(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


def describe(exc: BaseException) -> Tuple[int, str]:
    """The exit status and the one line for an exception that ended a command."""
    if isinstance(exc, ConfigError):
        return CONFIG, f"configuration error: {exc}"
    if isinstance(exc, KafkaException):
        error = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
        text = error.str() if error is not None else str(exc)
        if error is not None and error.code() in _KAFKA_CONFIG_CODES:
            return CONFIG, f"configuration error: Kafka: {text}; check the kafka settings"
        return RUNTIME, f"Kafka: {text}"
    if isinstance(exc, psycopg2.OperationalError):
        return RUNTIME, f"PostgreSQL: {first_line(exc)}"
    if isinstance(exc, psycopg2.ProgrammingError) and "invalid dsn" in str(exc):
        return CONFIG, f"configuration error: invalid PostgreSQL DSN: {first_line(exc)}"
    if isinstance(exc, psycopg2.errors.InsufficientPrivilege):
        return CONFIG, f"configuration error: PostgreSQL: {first_line(exc)}; grant the role what it needs"
    if isinstance(exc, psycopg2.Error):
        return RUNTIME, f"PostgreSQL: {first_line(exc)}"
    if isinstance(exc, (Retry, LeaseLost)):  # an outage the producer would have retried
        return RUNTIME, str(exc)
    if isinstance(exc, PgreplError):
        return RUNTIME, f"{type(exc).__name__}: {exc}"
    if isinstance(exc, KeyboardInterrupt):
        return 130, "interrupted"
    if isinstance(exc, OSError):
        return RUNTIME, f"{exc.strerror or exc}{': ' + str(exc.filename) if exc.filename else ''}"
    return RUNTIME, (f"internal error: {type(exc).__name__}: {first_line(exc)} (this is a bug in pgrepl; "
                     "run with --log-level DEBUG for the traceback)")


def report(exc: BaseException) -> Tuple[int, str]:
    """``describe`` with the secrets scrubbed and ``pgrepl:`` in front."""
    code, line = describe(exc)
    return code, "pgrepl: " + SECRETS.scrub(line)


__all__ = ["CONFIG", "RUNTIME", "SECRETS", "ScrubSecrets", "describe", "redact_dsn", "report"]
