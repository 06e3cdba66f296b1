"""Builds pgoutput protocol-v1 messages by hand, byte for byte as PostgreSQL sends them.

For unit tests, fuzzing and the decoder benchmark: ``begin``, ``relation``, ``insert``,
``update``, ``delete``, ``commit``... each return one message's payload.
"""

from __future__ import annotations

import struct
from typing import Iterable, Optional, Sequence, Union

UNCHANGED = object()  # an unchanged TOASTed value ('u')
Value = Union[None, str, bytes, object]


def _cstr(text: str) -> bytes:
    return text.encode("utf-8") + b"\x00"


def begin(final_lsn: int, xid: int = 1000, commit_time: int = 0) -> bytes:
    return b"B" + struct.pack(">QqI", final_lsn, commit_time, xid)


def commit(commit_lsn: int, end_lsn: int, commit_time: int = 0) -> bytes:
    return b"C" + struct.pack(">BQQq", 0, commit_lsn, end_lsn, commit_time)


def relation(
    relid: int,
    schema: str,
    name: str,
    columns: Sequence[str],
    replica_identity: str = "f",
    key_columns: Iterable[str] = (),
    type_oid: Union[int, Sequence[int]] = 25,
) -> bytes:
    """A Relation message; ``type_oid`` is one OID for every column or one per column."""
    keys = set(key_columns)
    oids = [type_oid] * len(columns) if isinstance(type_oid, int) else list(type_oid)
    out = [b"R", struct.pack(">I", relid), _cstr(schema), _cstr(name),
           replica_identity.encode(), struct.pack(">H", len(columns))]
    for col, oid in zip(columns, oids):
        out += [struct.pack(">B", 1 if col in keys else 0), _cstr(col), struct.pack(">Ii", oid, -1)]
    return b"".join(out)


def tuple_data(values: Sequence[Value]) -> bytes:
    out = [struct.pack(">H", len(values))]
    for value in values:
        if value is None:
            out.append(b"n")
        elif value is UNCHANGED:
            out.append(b"u")
        else:
            raw = value.encode("utf-8") if isinstance(value, str) else bytes(value)  # type: ignore[call-overload]
            out.append(b"t" + struct.pack(">I", len(raw)) + raw)
    return b"".join(out)


def insert(relid: int, values: Sequence[Value]) -> bytes:
    return b"I" + struct.pack(">I", relid) + b"N" + tuple_data(values)


def update(relid: int, old: Optional[Sequence[Value]], new: Sequence[Value], old_tag: bytes = b"O") -> bytes:
    head = b"U" + struct.pack(">I", relid)
    if old is not None:
        head += old_tag + tuple_data(old)
    return head + b"N" + tuple_data(new)


def delete(relid: int, old: Sequence[Value], old_tag: bytes = b"O") -> bytes:
    return b"D" + struct.pack(">I", relid) + old_tag + tuple_data(old)


def truncate(relids: Sequence[int], options: int = 0) -> bytes:
    return b"T" + struct.pack(">IB", len(relids), options) + b"".join(struct.pack(">I", r) for r in relids)


def message(prefix: str, content: bytes, transactional: bool = True, lsn: int = 0) -> bytes:
    return b"M" + struct.pack(">BQ", 1 if transactional else 0, lsn) + _cstr(prefix) + struct.pack(">I", len(content)) + content


def origin(name: str, lsn: int = 0) -> bytes:
    return b"O" + struct.pack(">Q", lsn) + _cstr(name)


def type_message(oid: int, schema: str, name: str) -> bytes:
    return b"Y" + struct.pack(">I", oid) + _cstr(schema) + _cstr(name)
