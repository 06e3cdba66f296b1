"""A plain pure-Python pgoutput (protocol v1) decoder and JSON encoder.

This is what a user would write themselves with :mod:`struct` and :func:`json.dumps`. It is
kept in the package for two reasons: it is the speed baseline the Cython decoder
(``pgrepl._core``) is benchmarked against, and it is an independent reference
implementation for differential tests. It therefore favours clarity over speed (no tricks),
but it does not go out of its way to be slow either.

The API mirrors the Cython decoder: :class:`PyDecoder` turns pgoutput messages into
:class:`PyRecord` / :class:`PyBegin` / :class:`PyCommit` objects (``decode``) or into a
:class:`PyBatch` of parallel topic/key/value lists (``decode_batch``).
"""

from __future__ import annotations

import json
import logging
import re
import struct
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from pgrepl.errors import ConfigError, DecodeError, ReplicationError
from pgrepl.lsn import format_lsn
from pgrepl.topics import TopicInfo, TopicMapInput, normalize_topic_map

__all__ = ["PyRecord", "PyBegin", "PyCommit", "PyBatch", "PyDecoder"]

logger = logging.getLogger(__name__)

# Fixed-size parts of the messages (all big-endian).
_BEGIN = struct.Struct(">QqI")  # final_lsn, commit timestamp, xid
_COMMIT = struct.Struct(">BQQq")  # flags, commit_lsn, end_lsn, commit timestamp
_U8 = struct.Struct(">B")
_U16 = struct.Struct(">H")
_I32 = struct.Struct(">i")
_U32 = struct.Struct(">I")
_COLUMN_TAIL = struct.Struct(">Ii")  # type oid, typmod
_TRUNCATE_HEAD = struct.Struct(">IB")  # nrelations, options

# Placeholder for a 'u' (unchanged TOASTed value) column while a tuple is being decoded.
_UNCHANGED = object()

_PLAIN_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_$]*$")


@dataclass
class PyRecord:
    """One row change to produce: Kafka ``topic``, ``key``, JSON ``value``, and its position."""

    __slots__ = ("topic", "key", "value", "lsn", "seq_id")
    topic: str
    key: Optional[bytes]
    value: bytes
    lsn: int
    seq_id: int


@dataclass
class PyBegin:
    """A Begin message: a transaction whose commit record is at ``final_lsn`` starts."""

    __slots__ = ("final_lsn", "commit_time", "xid")
    final_lsn: int
    commit_time: int
    xid: int


@dataclass
class PyCommit:
    """A Commit message; ``record_end``: the batch's record count when seen (0 from ``decode``)."""

    __slots__ = ("commit_lsn", "end_lsn", "commit_time", "record_end")
    commit_lsn: int
    end_lsn: int
    commit_time: int
    record_end: int


@dataclass
class PyBatch:
    """The records of many messages as parallel lists, plus the commits seen among them."""

    topics: List[str] = field(default_factory=list)
    keys: List[Optional[bytes]] = field(default_factory=list)
    values: List[bytes] = field(default_factory=list)
    commits: List[PyCommit] = field(default_factory=list)

    def __len__(self) -> int:
        """Number of records (not messages) in the batch."""
        return len(self.values)


class _Relation:
    """A table as described by the latest Relation message, plus its resolved topic (lazily)."""

    __slots__ = ("schema", "name", "columns", "topic", "key_indexes")

    def __init__(self, schema: str, name: str, columns: List[str]) -> None:
        self.schema = schema
        self.name = name
        self.columns = columns
        self.topic: Optional[TopicInfo] = None  # resolved on the first row change
        self.key_indexes: Tuple[int, ...] = ()

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"


def _quote_ident(name: str) -> str:
    """Quote an SQL identifier when it would not survive unquoted (so the advice can be pasted)."""
    if _PLAIN_IDENTIFIER.match(name):
        return name
    return '"' + name.replace('"', '""') + '"'


def _replica_identity_advice(rel: _Relation) -> str:
    return (
        f"run ALTER TABLE {_quote_ident(rel.schema)}.{_quote_ident(rel.name)} "
        "REPLICA IDENTITY FULL so PostgreSQL logs the whole old row"
    )


def _to_json(obj: Any) -> bytes:
    """Encode like Rust's ``serde_json::to_string``: no spaces, non-ASCII kept, UTF-8."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


class PyDecoder:
    """Stateful pgoutput v1 decoder: caches relations and tracks the current transaction.

    ``topic_map`` maps ``schema.table`` or bare ``table`` names to a :class:`TopicInfo` (or
    dict); ``truncate`` is ``"error"`` (refuse TRUNCATE) or ``"skip"`` (log and drop it).
    """

    def __init__(self, topic_map: TopicMapInput, truncate: str = "error") -> None:
        if truncate not in ("error", "skip"):
            raise ConfigError(f"truncate must be 'error' or 'skip', got {truncate!r}")
        self._topics: Dict[str, TopicInfo] = normalize_topic_map(topic_map)
        self._truncate = truncate
        self._relations: Dict[int, _Relation] = {}
        self._in_transaction = False
        self._lsn = 0  # final_lsn of the current transaction
        self._seq_id = 0  # index of the next record within the current transaction

    # ------------------------------------------------------------------ public API

    def decode(self, payload: bytes) -> Union[PyRecord, PyBegin, PyCommit, None]:
        """Decode one message: a record for Insert/Update/Delete, Begin/Commit, else ``None``."""
        buf = payload if isinstance(payload, bytes) else bytes(payload)
        if not buf:
            raise DecodeError("empty message", None, 0)
        kind = chr(buf[0])
        if kind == "B":
            return self._begin(buf)
        if kind == "C":
            return self._commit(buf)
        if kind == "I":
            return self._insert(buf)
        if kind == "U":
            return self._update(buf)
        if kind == "D":
            return self._delete(buf)
        if kind == "R":
            self._relation_message(buf)
            return None
        if kind == "T":
            self._truncate_message(buf)
            return None
        if kind in ("O", "Y", "M"):  # Origin, Type, logical decoding message: nothing to produce
            return None
        raise DecodeError(f"unknown message type byte 0x{buf[0]:02x}", kind, 0)

    def decode_batch(self, payloads: Sequence[bytes]) -> PyBatch:
        """Decode messages in order; a DecodeError's ``index`` is the failing message's position."""
        batch = PyBatch()
        for index, payload in enumerate(payloads):
            try:
                result = self.decode(payload)
            except DecodeError as exc:
                exc.index = index
                raise
            if isinstance(result, PyRecord):
                batch.topics.append(result.topic)
                batch.keys.append(result.key)
                batch.values.append(result.value)
            elif isinstance(result, PyCommit):
                result.record_end = len(batch.values)
                batch.commits.append(result)
        return batch

    # ------------------------------------------------------------------ transaction boundaries

    def _begin(self, buf: bytes) -> PyBegin:
        final_lsn, commit_time, xid = self._unpack(_BEGIN, buf, 1, "B", "Begin fields")
        self._expect_end(buf, 1 + _BEGIN.size, "B")
        self._in_transaction = True
        self._lsn = final_lsn
        self._seq_id = 0
        return PyBegin(final_lsn, commit_time, xid)

    def _commit(self, buf: bytes) -> PyCommit:
        fields = self._unpack(_COMMIT, buf, 1, "C", "Commit fields")
        _flags, commit_lsn, end_lsn, commit_time = fields
        self._expect_end(buf, 1 + _COMMIT.size, "C")
        self._in_transaction = False
        return PyCommit(commit_lsn, end_lsn, commit_time, 0)

    # ------------------------------------------------------------------ schema

    def _relation_message(self, buf: bytes) -> None:
        (relid,) = self._unpack(_U32, buf, 1, "R", "relation id")
        schema, pos = self._string(buf, 5, "R", "namespace")
        name, pos = self._string(buf, pos, "R", "relation name")
        self._unpack(_U8, buf, pos, "R", "replica identity setting")
        (ncols,) = self._unpack(_U16, buf, pos + 1, "R", "column count")
        pos += 3
        columns: List[str] = []
        for _ in range(ncols):
            self._unpack(_U8, buf, pos, "R", "column flags")
            column, pos = self._string(buf, pos + 1, "R", "column name")
            self._unpack(_COLUMN_TAIL, buf, pos, "R", "column type")
            pos += _COLUMN_TAIL.size
            columns.append(column)
        self._expect_end(buf, pos, "R")
        # A Relation message replaces the cached one: the schema may have changed mid-stream.
        self._relations[relid] = _Relation(schema, name, columns)

    # ------------------------------------------------------------------ row changes

    def _insert(self, buf: bytes) -> PyRecord:
        rel = self._change_target(buf, "I")
        self._expect_byte(buf, 5, b"N", "I", "new-tuple marker 'N'")
        new, has_unchanged, pos = self._tuple(buf, 6, rel, "I")
        self._expect_end(buf, pos, "I")
        if has_unchanged:
            raise DecodeError("an Insert cannot carry an unchanged-TOAST ('u') column", "I", 6)
        return self._record(rel, {"Insert": new}, new)

    def _update(self, buf: bytes) -> PyRecord:
        rel = self._change_target(buf, "U")
        pos = 5
        old: Optional[List[Any]] = None
        old_kind = None
        old_unchanged = False
        marker = self._byte(buf, pos, "U", "tuple marker")
        if marker in (b"K", b"O"):
            old_kind = marker
            old, old_unchanged, pos = self._tuple(buf, pos + 1, rel, "U")
        self._expect_byte(buf, pos, b"N", "U", "new-tuple marker 'N'")
        new, new_unchanged, pos = self._tuple(buf, pos + 1, rel, "U")
        self._expect_end(buf, pos, "U")

        if old is None or old_kind != b"O":
            what = "no old row" if old is None else "only the key of the old row"
            raise ReplicationError(
                f"UPDATE of table {rel.qualified} carries {what}; pgrepl needs the full old row: "
                + _replica_identity_advice(rel)
            )
        if old_unchanged:
            self._unchanged_old_error(rel, "UPDATE")
        if new_unchanged:
            # An unchanged TOASTed column keeps the old row's value (REPLICA IDENTITY FULL)
            new = [old[i] if value is _UNCHANGED else value for i, value in enumerate(new)]
        return self._record(rel, {"Update": [old, new]}, new)

    def _delete(self, buf: bytes) -> PyRecord:
        rel = self._change_target(buf, "D")
        marker = self._byte(buf, 5, "D", "old-tuple marker")
        if marker not in (b"K", b"O"):
            raise DecodeError(f"expected old-tuple marker 'K' or 'O', got {marker!r}", "D", 5)
        old, old_unchanged, pos = self._tuple(buf, 6, rel, "D")
        self._expect_end(buf, pos, "D")
        if marker != b"O":
            raise ReplicationError(
                f"DELETE from table {rel.qualified} carries only the key of the old row; pgrepl "
                "needs the full old row: " + _replica_identity_advice(rel)
            )
        if old_unchanged:
            self._unchanged_old_error(rel, "DELETE")
        return self._record(rel, {"Delete": old}, old)

    def _truncate_message(self, buf: bytes) -> None:
        nrelations, _options = self._unpack(_TRUNCATE_HEAD, buf, 1, "T", "Truncate header")
        pos = 1 + _TRUNCATE_HEAD.size
        tables: List[str] = []
        for _ in range(nrelations):
            (relid,) = self._unpack(_U32, buf, pos, "T", "relation id")
            rel = self._relations.get(relid)
            if rel is None:
                raise DecodeError(
                    f"unknown relation id {relid} (no Relation message seen)", "T", pos
                )
            tables.append(rel.qualified)
            pos += 4
        self._expect_end(buf, pos, "T")
        listed = ", ".join(tables)
        if self._truncate == "error":
            raise ReplicationError(
                f"TRUNCATE of {listed} cannot be streamed as row changes; set truncate=\"skip\" "
                "to log and skip truncations instead"
            )
        logger.warning(
            "skipping TRUNCATE of %s in transaction %s (truncate=\"skip\")",
            listed,
            format_lsn(self._lsn) if self._in_transaction else "(none)",
        )

    # ------------------------------------------------------------------ helpers

    def _change_target(self, buf: bytes, kind: str) -> _Relation:
        """Check a row change is inside a transaction and return its (cached) relation."""
        if not self._in_transaction:
            raise DecodeError("row change outside a transaction (no Begin seen)", kind, 0)
        (relid,) = self._unpack(_U32, buf, 1, kind, "relation id")
        rel = self._relations.get(relid)
        if rel is None:
            raise DecodeError(f"unknown relation id {relid} (no Relation message seen)", kind, 1)
        return rel

    def _tuple(
        self, buf: bytes, pos: int, rel: _Relation, kind: str
    ) -> Tuple[List[Any], bool, int]:
        """Decode TupleData at ``pos``: (values, whether any column is 'u', position after it)."""
        (ncols,) = self._unpack(_U16, buf, pos, kind, "tuple column count")
        if ncols != len(rel.columns):
            raise DecodeError(
                f"tuple has {ncols} columns but relation {rel.qualified} has {len(rel.columns)}",
                kind,
                pos,
            )
        pos += 2
        size = len(buf)
        values: List[Any] = []
        has_unchanged = False
        for _ in range(ncols):
            if pos >= size:
                raise DecodeError("truncated tuple column", kind, pos)
            col_kind = buf[pos]
            if col_kind == 0x74:  # 't': text
                if pos + 5 > size:
                    raise DecodeError("truncated text column length", kind, pos + 1)
                (length,) = _I32.unpack_from(buf, pos + 1)
                start = pos + 5
                if length < 0:
                    raise DecodeError(f"bad text column length {length}", kind, pos + 1)
                if start + length > size:
                    raise DecodeError(
                        f"text column of {length} bytes runs past the end of the message",
                        kind,
                        start,
                    )
                try:
                    values.append(buf[start : start + length].decode("utf-8"))
                except UnicodeDecodeError as exc:
                    raise DecodeError(
                        f"invalid UTF-8 in a text column: {exc.reason}", kind, start + exc.start
                    ) from None
                pos = start + length
            elif col_kind == 0x6E:  # 'n': NULL
                values.append(None)
                pos += 1
            elif col_kind == 0x75:  # 'u': unchanged TOASTed value, no data
                values.append(_UNCHANGED)
                has_unchanged = True
                pos += 1
            elif col_kind == 0x62:  # 'b': binary
                raise ReplicationError(
                    f"binary tuple data is not supported (table {rel.qualified}); start "
                    "replication without the pgoutput 'binary' option"
                )
            else:
                raise DecodeError(f"unknown tuple column kind byte 0x{col_kind:02x}", kind, pos)
        return values, has_unchanged, pos

    def _record(self, rel: _Relation, op: Dict[str, Any], key_row: List[Any]) -> PyRecord:
        """Build the JSON value and Kafka key of one row change and advance seq_id."""
        topic = rel.topic if rel.topic is not None else self._resolve_topic(rel)
        key: Optional[bytes] = None
        if rel.key_indexes:
            parts = []
            for index in rel.key_indexes:
                value = key_row[index]
                if value is None:
                    raise ReplicationError(
                        f"partition-key column {rel.columns[index]!r} of table {rel.qualified} is "
                        "NULL; a record's key cannot be built from a NULL value"
                    )
                parts.append(value)
            key = "".join(parts).encode("utf-8")
        seq_id = self._seq_id
        value = _to_json(
            {
                "table_name": rel.name,
                "col_names": rel.columns,
                "lsn": self._lsn,
                "seq_id": seq_id,
                "op": op,
            }
        )
        self._seq_id = seq_id + 1
        return PyRecord(topic.name, key, value, self._lsn, seq_id)

    def _resolve_topic(self, rel: _Relation) -> TopicInfo:
        """Find the relation's topic ("schema.table" first, then "table") and its key columns."""
        info = self._topics.get(rel.qualified)
        if info is None:
            info = self._topics.get(rel.name)
        if info is None:
            raise ConfigError(
                f"table {rel.qualified} is published but has no topic-map entry; add it to the "
                "topic map or remove it from the publication"
            )
        indexes = []
        for column in info.partition_key:
            if column not in rel.columns:
                raise ConfigError(
                    f"partition-key column {column!r} of topic {info.name!r} is not a column of "
                    f"table {rel.qualified} (columns: {', '.join(rel.columns)})"
                )
            indexes.append(rel.columns.index(column))
        rel.key_indexes = tuple(indexes)
        rel.topic = info
        return info

    @staticmethod
    def _unchanged_old_error(rel: _Relation, what: str) -> None:
        raise ReplicationError(
            f"{what} on table {rel.qualified} has an old row with an unchanged-TOAST value that "
            "PostgreSQL did not send; " + _replica_identity_advice(rel)
        )

    @staticmethod
    def _unpack(st: struct.Struct, buf: bytes, pos: int, kind: str, what: str) -> Tuple[Any, ...]:
        if pos + st.size > len(buf):
            raise DecodeError(f"truncated {what}", kind, pos)
        return st.unpack_from(buf, pos)

    @staticmethod
    def _byte(buf: bytes, pos: int, kind: str, what: str) -> bytes:
        if pos >= len(buf):
            raise DecodeError(f"truncated {what}", kind, pos)
        return buf[pos : pos + 1]

    def _expect_byte(self, buf: bytes, pos: int, expected: bytes, kind: str, what: str) -> None:
        got = self._byte(buf, pos, kind, what)
        if got != expected:
            raise DecodeError(f"expected {what}, got {got!r}", kind, pos)

    @staticmethod
    def _string(buf: bytes, pos: int, kind: str, what: str) -> Tuple[str, int]:
        """Read a NUL-terminated UTF-8 string: (text, position after the NUL)."""
        end = buf.find(b"\0", pos)
        if end < 0:
            raise DecodeError(f"truncated {what} (no NUL terminator)", kind, pos)
        try:
            return buf[pos:end].decode("utf-8"), end + 1
        except UnicodeDecodeError as exc:
            reason = f"invalid UTF-8 in {what}: {exc.reason}"
            raise DecodeError(reason, kind, pos + exc.start) from None

    @staticmethod
    def _expect_end(buf: bytes, pos: int, kind: str) -> None:
        if pos != len(buf):
            raise DecodeError(f"{len(buf) - pos} unexpected trailing bytes", kind, pos)
