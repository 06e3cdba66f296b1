"""pgrepl's exception hierarchy: what went wrong, and whose move it is to fix it.

This module imports nothing of pgrepl, so every other module can import it.

``PgreplError``
    ``ConfigError``           the user must change something (settings, schema, publication)
    ``ReplicationError``      the stream holds a change pgrepl refuses to pass on
        ``SlotLostError``     the slot pgrepl streamed from is gone or invalidated
    ``DecodeError``           a pgoutput message is malformed
    ``DeliveryError``         Kafka refused or lost a record; nothing past it is confirmed
    ``MalformedRecordError``  a Kafka record is not a ReplicationOp
    ``ConsumerError``         the consumer stopped on an error it cannot get past
        ``HandlerError``      a record could not be handled and the policy said stop
    ``StreamError``           the replication connection failed (transient: the producer reconnects)
"""

from __future__ import annotations

from typing import Any, Optional, Tuple


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


class SlotLostError(ReplicationError):
    """The replication slot pgrepl streamed from is missing or invalidated: going on would skip changes.

    ``slot`` names it, ``confirmed_lsn`` is the last position pgrepl confirmed on it (when known).
    Recreating it is the user's explicit choice (``on_slot_loss``), never automatic.
    """

    def __init__(self, message: str, slot: str = "", confirmed_lsn: Optional[int] = None) -> None:
        super().__init__(message)
        self.slot = slot
        self.confirmed_lsn = confirmed_lsn

    def __reduce__(self) -> Tuple[Any, ...]:
        return (type(self), (str(self), self.slot, self.confirmed_lsn))


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
            text += f" (message LSN {self.lsn >> 32:X}/{self.lsn & 0xFFFFFFFF:X})"
        return text

    def __reduce__(self) -> Tuple[Any, ...]:  # keep attributes across pickling (multiprocessing, logging)
        return (type(self), (self.reason, self.msg_type, self.offset, self.index, self.lsn))


class DeliveryError(PgreplError):
    """Kafka refused or lost a record (or the producer hit a fatal error): nothing past it is confirmed."""


class MalformedRecordError(PgreplError):
    """A Kafka record is not a valid ReplicationOp (bad JSON, missing fields, wrong types)."""


class ConsumerError(PgreplError):
    """The consumer stopped on an error it cannot get past by itself (Kafka fatal error, policy stop)."""


class HandlerError(ConsumerError):
    """A record could not be handled and the error policy said stop (or the dead-letter send failed).

    ``topic``, ``partition`` and ``offset`` locate the record; ``lsn`` and ``seq_id`` are the
    op's position when the record parsed. The original exception is ``__cause__``.
    """

    def __init__(self, message: str, topic: str = "", partition: int = -1, offset: int = -1,
                 lsn: Optional[int] = None, seq_id: Optional[int] = None) -> None:
        super().__init__(message)
        self.topic = topic
        self.partition = partition
        self.offset = offset
        self.lsn = lsn
        self.seq_id = seq_id

    def __reduce__(self) -> Tuple[Any, ...]:  # keep attributes across pickling
        return (type(self), (str(self), self.topic, self.partition, self.offset, self.lsn, self.seq_id))


class StreamError(PgreplError):
    """The replication connection failed (network, server restart): transient, the producer reconnects."""
