"""pgrepl's exception hierarchy: what went wrong, and whose move it is to fix it."""

from __future__ import annotations

from typing import Optional


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (libpq errors span several), or its type name."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class PgreplError(Exception):
    """Base class of every error pgrepl raises on purpose."""


class ConfigError(PgreplError):
    """The user must change something (configuration, schema, publication) before pgrepl can go on."""


class ReplicationError(PgreplError):
    """The stream holds a change pgrepl refuses to pass on (it would have to drop or guess a row)."""


class DecodeError(PgreplError):
    """A pgoutput message is malformed: truncated, bad length, unknown type or relation, invalid UTF-8.

    ``msg_type`` is the message's type byte as a one-character string (or ``None`` when the
    message is empty), ``offset`` the byte offset within the message where decoding failed,
    ``index`` the message's position in the batch, and ``lsn`` its WAL position when the
    caller knows it.
    """

    def __init__(
        self,
        reason: str,
        msg_type: Optional[str] = None,
        offset: int = 0,
        index: int = 0,
        lsn: Optional[int] = None,
    ) -> None:
        self.reason = reason
        self.msg_type = msg_type
        self.offset = offset
        self.index = index
        self.lsn = lsn
        super().__init__(reason)

    def __str__(self) -> str:
        where = f"message type {self.msg_type!r}" if self.msg_type is not None else "empty message"
        text = f"malformed pgoutput {where} at byte {self.offset}: {self.reason}"
        if self.lsn is not None:
            from pgrepl.lsn import format_lsn

            text += f" (message LSN {format_lsn(self.lsn)})"
        return text

    def __reduce__(self):  # keep attributes across pickling (multiprocessing, logging handlers)
        return (type(self), (self.reason, self.msg_type, self.offset, self.index, self.lsn))


class MalformedRecordError(PgreplError):
    """A Kafka record is not a valid ReplicationOp (bad JSON, missing fields, wrong types)."""


class DeliveryError(PgreplError):
    """Kafka refused or lost a record (or the producer hit a fatal error): nothing past it is confirmed."""
