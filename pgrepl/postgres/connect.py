"""Connections to PostgreSQL, and DSNs that never show their password."""

from __future__ import annotations

import re
from typing import Any, Dict, Iterable, List, Optional, Tuple

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


#: ``password=`` in key=value form: a quoted value, or an unquoted one up to the next ``key=`` (a
#: password with spaces that was not quoted runs on to there: all of it is secret).
_KV_PASSWORD = re.compile(r"(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'?|.*?)(?=\s+[A-Za-z_]+\s*=|\s*$)",
                          re.IGNORECASE | re.DOTALL)
#: ``password=`` in a URL's query string, up to the next ``&``.
_URL_QUERY_PASSWORD = re.compile(r"([?&]password=)[^&]*", re.IGNORECASE)
#: ``user:password@`` in a URL: up to the last ``@`` before the path (an unencoded ``@`` in the
#: password would otherwise leave its tail in the host part).
_URL_PASSWORD = re.compile(r"(://[^:/@]*:)[^/?#]*@")


def redact_dsn(dsn: str) -> str:
    """The DSN with any password replaced by ``***``: safe for logs and error messages."""
    if "://" in dsn:
        redacted = _URL_PASSWORD.sub(r"\1***@", dsn)
        return _URL_QUERY_PASSWORD.sub(r"\1***", redacted)
    return _KV_PASSWORD.sub(r"\1***", dsn)


def dsn_secrets(dsn: str) -> List[str]:
    """The password of a DSN as written (every form), and its words: what no message may show."""
    found: List[str] = []
    if "://" in dsn:
        match = re.search(r"://[^:/@]*:([^/?#]*)@", dsn)
        if match:
            found.append(match.group(1))
        found += [m.group(0).split("=", 1)[1] for m in _URL_QUERY_PASSWORD.finditer(dsn)]
    else:
        found += [m.group(2).strip("'") for m in _KV_PASSWORD.finditer(dsn)]
    words = [word for value in found for word in value.split()]
    return sorted({s for s in found + words if s}, key=len, reverse=True)


def scrub(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every secret replaced by ``***``: libpq's parse errors quote pieces of the DSN
    (``missing "=" after "secret"``), which can be the words of an unquoted password."""
    for secret in secrets:
        text = text.replace(f'"{secret}"', '"***"')
        if len(secret) >= 4:
            text = text.replace(secret, "***")
    return text


def dsn_error(dsn: str, exc: BaseException) -> str:
    """libpq's first error line about ``dsn``, with no piece of its password."""
    return scrub(first_line(exc), dsn_secrets(dsn))


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


#: libpq settings that make a dead server noticed within seconds instead of the kernel's ~2 hours
#: (keepalives for a silent peer, tcp_user_timeout for unacknowledged sends); the DSN wins.
CLIENT_TIMEOUTS = {"keepalives": "1", "keepalives_idle": "10", "keepalives_interval": "5", "keepalives_count": "3",
                   "tcp_user_timeout": "30000", "connect_timeout": "10"}
#: The same for the server's side of the connection, so it notices a dead producer (and frees
#: its slot and lease) within seconds; sent as startup options unless the DSN has ``options``.
SERVER_TIMEOUTS = "-c tcp_keepalives_idle=5 -c tcp_keepalives_interval=2 -c tcp_keepalives_count=3"


def dsn_params(dsn: str) -> Dict[str, str]:
    """The DSN's parameters (URL or key=value form); ``ConfigError`` when it does not parse."""
    try:
        return dict(psycopg2.extensions.parse_dsn(dsn))
    except psycopg2.ProgrammingError as exc:
        raise ConfigError(f"invalid PostgreSQL DSN {redact_dsn(dsn)!r}: {dsn_error(dsn, exc)}") from None


def connect(dsn: str, *, replication: bool = False, application_name: str = "pgrepl") -> psycopg2.extensions.connection:
    """Open a connection (a logical replication connection when ``replication``).

    The session always speaks UTF8 (pgoutput sends text in the client encoding, and the
    records are JSON), and dead peers are noticed in seconds on both ends (``CLIENT_TIMEOUTS``,
    ``SERVER_TIMEOUTS``) unless the DSN says otherwise. A failure that retrying cannot fix
    becomes ``ConfigError``; others stay ``psycopg2.OperationalError`` for the caller's retry
    loop. Neither carries the password.
    """
    params = dsn_params(dsn)
    extra: Dict[str, Any] = {key: value for key, value in CLIENT_TIMEOUTS.items() if key not in params}
    if "options" not in params:
        extra["options"] = SERVER_TIMEOUTS
    factory: Any = psycopg2.extras.LogicalReplicationConnection if replication else psycopg2.extensions.connection
    try:
        conn: psycopg2.extensions.connection = psycopg2.connect(
            dsn, connection_factory=factory, application_name=application_name, client_encoding="UTF8", **extra)
    except psycopg2.ProgrammingError as exc:  # malformed DSN
        raise ConfigError(f"invalid PostgreSQL DSN {redact_dsn(dsn)!r}: {dsn_error(dsn, exc)}") from None
    except psycopg2.OperationalError as exc:
        reason = dsn_error(dsn, exc)
        if is_permanent_connect_error(exc):
            raise ConfigError(f"cannot connect to PostgreSQL at {redact_dsn(dsn)}: {reason}") from None
        raise psycopg2.OperationalError(f"cannot connect to PostgreSQL at {redact_dsn(dsn)}: {reason}") from None
    if not replication:
        conn.autocommit = True
    return conn


def identify_system(rconn: Any) -> Tuple[str, str]:
    """(system identifier, database) from ``IDENTIFY_SYSTEM`` on a replication connection."""
    with rconn.cursor() as cur:
        cur.execute("IDENTIFY_SYSTEM")
        row = cur.fetchone()
    return str(row[0]), str(row[3])


def close_quietly(conn: Optional[psycopg2.extensions.connection]) -> None:
    """Close a connection that may already be broken (or None): nothing is left to report."""
    if conn is not None:
        try:
            conn.close()
        except psycopg2.Error:
            pass


def quote_ident(name: str) -> str:
    """A SQL identifier in double quotes, inner quotes doubled (never interpolate raw names)."""
    if "\x00" in name:
        raise ConfigError(f"identifier contains a NUL byte: {name!r}")
    return '"' + name.replace('"', '""') + '"'


def publication_option(name: str) -> str:
    """The ``publication_names`` option value: pgoutput splits it as an identifier list."""
    return quote_ident(name)
