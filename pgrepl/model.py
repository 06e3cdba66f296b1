"""ReplicationOp and Op: the records on the topic, parsed back from (and written to) their JSON.

The JSON is the compatibility contract with the original Rust library: what
``serde_json::to_string`` prints for its ``ReplicationOp``. ``ReplicationOp.to_json()``
reproduces the producer's bytes exactly, so a parsed op can be re-published unchanged.

Parsing has one entry point, ``ReplicationOp.from_json`` (the consumer's hot path): records in
the canonical layout the producer writes are parsed in C; anything else takes the general
orjson path, which accepts or rejects with the precise error. Both build the op through one
constructor, ``_parsed_op``.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import orjson

from pgrepl._core import parse_canonical
from pgrepl.errors import MalformedRecordError

Row = Tuple[Optional[str], ...]
"""One row: each column's PostgreSQL text output, or ``None`` for NULL."""

_KINDS = ("Insert", "Update", "Delete")
_FIELDS = ("table_name", "col_names", "lsn", "seq_id", "op")


class Op:
    """A row change: ``Insert(new)``, ``Update(old, new)`` or ``Delete(old)``.

    ``kind`` is ``"Insert"``, ``"Update"`` or ``"Delete"`` (the JSON tag); ``old`` is set for
    Update and Delete, ``new`` for Insert and Update.
    """

    __slots__ = ("kind", "old", "new")

    def __init__(self, kind: str, old: Optional[Row], new: Optional[Row]) -> None:
        if kind not in _KINDS:
            raise ValueError(f"Op kind must be one of {_KINDS}, got {kind!r}")
        if (old is None) != (kind == "Insert") or (new is None) != (kind == "Delete"):
            raise ValueError(f"{kind} needs {'old and new' if kind == 'Update' else 'one'} row(s)")
        self.kind = kind
        self.old = old
        self.new = new

    @classmethod
    def insert(cls, row: Sequence[Optional[str]]) -> "Op":
        """An Insert of ``row``."""
        return cls("Insert", None, tuple(row))

    @classmethod
    def update(cls, old: Sequence[Optional[str]], new: Sequence[Optional[str]]) -> "Op":
        """An Update from ``old`` to ``new``."""
        return cls("Update", tuple(old), tuple(new))

    @classmethod
    def delete(cls, row: Sequence[Optional[str]]) -> "Op":
        """A Delete of ``row``."""
        return cls("Delete", tuple(row), None)

    @property
    def row(self) -> Row:
        """The row as it is after the change (Insert/Update), or as it was (Delete)."""
        return self.new if self.new is not None else self.old  # type: ignore[return-value]

    def _json_payload(self) -> Any:
        if self.kind == "Insert":
            return {"Insert": list(self.new)}  # type: ignore[arg-type]
        if self.kind == "Update":
            return {"Update": [list(self.old), list(self.new)]}  # type: ignore[arg-type]
        return {"Delete": list(self.old)}  # type: ignore[arg-type]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Op):
            return NotImplemented
        return (self.kind, self.old, self.new) == (other.kind, other.old, other.new)

    def __hash__(self) -> int:
        return hash((self.kind, self.old, self.new))

    def __repr__(self) -> str:
        if self.kind == "Insert":
            return f"Op.insert({list(self.new)!r})"  # type: ignore[arg-type]
        if self.kind == "Update":
            return f"Op.update({list(self.old)!r}, {list(self.new)!r})"  # type: ignore[arg-type]
        return f"Op.delete({list(self.old)!r})"  # type: ignore[arg-type]


class ReplicationOp:
    """One row change as published: table, column names, position ``(lsn, seq_id)`` and the op.

    ``lsn`` is the transaction's commit LSN and ``seq_id`` the op's 0-based index within the
    transaction; ``(lsn, seq_id)`` is unique and increases in WAL order, so consumers use it
    to drop replays.
    """

    __slots__ = ("table_name", "col_names", "lsn", "seq_id", "op")

    def __init__(self, table_name: str, col_names: Sequence[str], lsn: int, seq_id: int, op: Op) -> None:
        self.table_name = table_name
        self.col_names: Tuple[str, ...] = tuple(col_names)
        self.lsn = lsn
        self.seq_id = seq_id
        self.op = op

    @property
    def position(self) -> Tuple[int, int]:
        """``(lsn, seq_id)``: the op's place in WAL order."""
        return (self.lsn, self.seq_id)

    def row_dict(self) -> Dict[str, Optional[str]]:
        """The op's row (new for Insert/Update, old for Delete) as ``{column: value}``."""
        return dict(zip(self.col_names, self.op.row))

    def old_dict(self) -> Optional[Dict[str, Optional[str]]]:
        """The old row as ``{column: value}`` (Update and Delete), else ``None``."""
        return None if self.op.old is None else dict(zip(self.col_names, self.op.old))

    def to_json(self) -> bytes:
        """The record's JSON, byte for byte what the producer (and the Rust library) writes."""
        return orjson.dumps(
            {
                "table_name": self.table_name,
                "col_names": list(self.col_names),
                "lsn": self.lsn,
                "seq_id": self.seq_id,
                "op": self.op._json_payload(),
            }
        )

    @classmethod
    def from_json(cls, data: Optional[bytes]) -> "ReplicationOp":
        """Parse a record's value; ``MalformedRecordError`` says what is wrong when it is not a ReplicationOp."""
        if data is None:
            raise MalformedRecordError("the record has no value (a tombstone), not a ReplicationOp")
        fast = parse_canonical(data, _parsed_op)
        if fast is not None:
            return fast
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise MalformedRecordError(f"not JSON: {exc}") from None
        return cls.from_dict(obj)

    @classmethod
    def from_dict(cls, obj: Any) -> "ReplicationOp":
        """Build from the parsed JSON object, checking every field's type."""
        if not isinstance(obj, dict):
            raise MalformedRecordError(f"a ReplicationOp is a JSON object, got {type(obj).__name__}")
        if tuple(obj) != _FIELDS and set(obj) != set(_FIELDS):
            raise MalformedRecordError(f"a ReplicationOp has fields {list(_FIELDS)}, got {list(obj)}")
        table_name, col_names, lsn, seq_id, op = (obj[f] for f in _FIELDS)
        if not isinstance(table_name, str):
            raise MalformedRecordError("table_name must be a string")
        if not isinstance(col_names, list) or not all(isinstance(c, str) for c in col_names):
            raise MalformedRecordError("col_names must be a list of strings")
        for name, value in (("lsn", lsn), ("seq_id", seq_id)):
            if type(value) is not int or value < 0:
                raise MalformedRecordError(f"{name} must be a non-negative integer, got {value!r}")
        if not isinstance(op, dict) or len(op) != 1:
            raise MalformedRecordError('op must be an object with one key: "Insert", "Update" or "Delete"')
        ((kind, payload),) = op.items()
        width = len(col_names)
        old: Optional[Row] = None
        new: Optional[Row] = None
        if kind == "Update":
            if not isinstance(payload, list) or len(payload) != 2:
                raise MalformedRecordError("Update must hold [old_row, new_row]")
            old, new = _row(payload[0], width), _row(payload[1], width)
        elif kind == "Insert":
            new = _row(payload, width)
        elif kind == "Delete":
            old = _row(payload, width)
        else:
            raise MalformedRecordError(f'unknown op {kind!r}; expected "Insert", "Update" or "Delete"')
        return _parsed_op(table_name, tuple(col_names), lsn, seq_id, kind, old, new)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ReplicationOp):
            return NotImplemented
        return (self.table_name, self.col_names, self.lsn, self.seq_id, self.op) == (
            other.table_name, other.col_names, other.lsn, other.seq_id, other.op)

    def __hash__(self) -> int:
        return hash((self.table_name, self.col_names, self.lsn, self.seq_id, self.op))

    def __repr__(self) -> str:
        return (f"ReplicationOp(table_name={self.table_name!r}, col_names={list(self.col_names)!r}, "
                f"lsn={self.lsn}, seq_id={self.seq_id}, op={self.op!r})")


def _row(value: Any, width: int) -> Row:
    if not isinstance(value, list) or not all(v is None or isinstance(v, str) for v in value):
        raise MalformedRecordError("a row must be a list of strings and nulls")
    if len(value) != width:
        raise MalformedRecordError(f"a row has {len(value)} values but col_names has {width}")
    return tuple(value)


_new = object.__new__


def _parsed_op(table_name: str, col_names: Tuple[str, ...], lsn: int, seq_id: int, kind: str,
               old: Optional[Row], new: Optional[Row]) -> ReplicationOp:
    """The one constructor of parsed records, C fast path and general path alike.

    Its callers have checked every field already (kind, row widths, types), so it fills the
    slots without ``__init__``'s checks: this runs once per consumed record. A slot added to
    ``Op`` or ``ReplicationOp`` must be set here (a unit test compares the slots).
    """
    op = _new(Op)
    op.kind = kind
    op.old = old
    op.new = new
    record = _new(ReplicationOp)
    record.table_name = table_name
    record.col_names = col_names
    record.lsn = lsn
    record.seq_id = seq_id
    record.op = op
    return record
