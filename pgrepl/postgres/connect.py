"""Connections to PostgreSQL, and DSNs that never show their password."""

from __future__ import annotations

import re
from typing import Any, Tuple

import psycopg2
import psycopg2.extensions
import psycopg2.extras

from pgrepl.errors import ConfigError, first_line

# libpq errors that retrying will not fix: the user must change the DSN or the server's setup.
_PERMANENT_CONNECT_ERRORS = (
    "password authentication failed",
    "no pg_hba.conf entry",
    "does not exist",
    "invalid dsn",
    "invalid connection option",
    "missing \"=\"",
    "is not permitted to log in",
    "must be superuser or replication role",
    "permission denied",
)


def redact_dsn(dsn: str) -> str:
    """The DSN with any password replaced by ``***``: safe for logs and error messages."""
    redacted = re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", dsn)
    return re.sub(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", r"\1***", redacted, flags=re.IGNORECASE)


def is_permanent_connect_error(exc: Exception) -> bool:
    """True when a connection error will not go away by retrying (bad password, unknown db...)."""
    text = str(exc).lower()
    return any(marker in text for marker in _PERMANENT_CONNECT_ERRORS)


def query_one(conn: psycopg2.extensions.connection, query: str, params: Any = None) -> Tuple[Any, ...]:
    """The one row a query returns (``LookupError`` when it returns none)."""
    with conn.cursor() as cur:
        cur.execute(query, params)
        row = cur.fetchone()
    if row is None:
        raise LookupError(f"no row from: {query}")
    return tuple(row)


def connect(dsn: str, *, replication: bool = False, application_name: str = "pgrepl") -> psycopg2.extensions.connection:
    """Open a connection (a logical replication connection when ``replication``).

    A failure that retrying cannot fix becomes ``ConfigError``; others stay
    ``psycopg2.OperationalError`` for the caller's retry loop. Neither carries the password.
    """
    factory = psycopg2.extras.LogicalReplicationConnection if replication else None
    try:
        conn: psycopg2.extensions.connection = psycopg2.connect(
            dsn, connection_factory=factory, application_name=application_name)
    except psycopg2.ProgrammingError as exc:  # malformed DSN
        raise ConfigError(f"invalid PostgreSQL DSN {redact_dsn(dsn)!r}: {str(exc).strip()}") from None
    except psycopg2.OperationalError as exc:
        reason = first_line(exc)
        if is_permanent_connect_error(exc):
            raise ConfigError(f"cannot connect to PostgreSQL at {redact_dsn(dsn)}: {reason}") from None
        raise psycopg2.OperationalError(f"cannot connect to PostgreSQL at {redact_dsn(dsn)}: {reason}") from None
    if not replication:
        conn.autocommit = True
    return conn


def quote_ident(name: str) -> str:
    """A SQL identifier in double quotes, inner quotes doubled (never interpolate raw names)."""
    if "\x00" in name:
        raise ConfigError(f"identifier contains a NUL byte: {name!r}")
    return '"' + name.replace('"', '""') + '"'


def publication_option(name: str) -> str:
    """The ``publication_names`` option value: pgoutput splits it as an identifier list."""
    return quote_ident(name)
