"""ReplicationOp / Op: parsing the wire format back and writing the identical bytes."""

from __future__ import annotations

import pytest

from pgrepl import MalformedRecordError, Op, ReplicationOp

SAMPLES = [
    b'{"table_name":"inventory","col_names":["id","organization_id"],"lsn":23456789,"seq_id":0,"op":{"Insert":["1","8f14e45f"]}}',
    b'{"table_name":"t","col_names":["a"],"lsn":23456790,"seq_id":1,"op":{"Update":[["old"],["new"]]}}',
    b'{"table_name":"t","col_names":["a"],"lsn":23456790,"seq_id":2,"op":{"Delete":[null]}}',
    b'{"table_name":"t","col_names":["a"],"lsn":18446744073709551615,"seq_id":2,"op":{"Delete":["\\u0001\\"\\\\\xc3\xa9"]}}',
]


@pytest.mark.parametrize("raw", SAMPLES)
def test_round_trip_is_byte_identical(raw: bytes) -> None:
    assert ReplicationOp.from_json(raw).to_json() == raw


def test_fields_and_helpers() -> None:
    ins, upd, dele = (ReplicationOp.from_json(s) for s in SAMPLES[:3])
    assert ins.op == Op.insert(["1", "8f14e45f"]) and ins.position == (23456789, 0)
    assert ins.row_dict() == {"id": "1", "organization_id": "8f14e45f"} and ins.old_dict() is None
    assert upd.op.kind == "Update" and upd.op.old == ("old",) and upd.op.new == ("new",)
    assert upd.row_dict() == {"a": "new"} and upd.old_dict() == {"a": "old"}
    assert dele.op == Op.delete([None]) and dele.row_dict() == {"a": None}
    assert ReplicationOp("t", ["a"], 1, 2, Op.update(["x"], ["y"])) == ReplicationOp("t", ("a",), 1, 2, Op.update(("x",), ("y",)))


@pytest.mark.parametrize(
    "raw, fragment",
    [
        (b"not json", "not JSON"),
        (b"[1]", "JSON object"),
        (b'{"table_name":"t"}', "has fields"),
        (b'{"table_name":1,"col_names":[],"lsn":1,"seq_id":0,"op":{"Insert":[]}}', "table_name must be a string"),
        (b'{"table_name":"t","col_names":[1],"lsn":1,"seq_id":0,"op":{"Insert":[]}}', "col_names"),
        (b'{"table_name":"t","col_names":[],"lsn":-1,"seq_id":0,"op":{"Insert":[]}}', "lsn must be a non-negative integer"),
        (b'{"table_name":"t","col_names":[],"lsn":true,"seq_id":0,"op":{"Insert":[]}}', "lsn must be"),
        (b'{"table_name":"t","col_names":[],"lsn":1,"seq_id":1.5,"op":{"Insert":[]}}', "seq_id must be"),
        (b'{"table_name":"t","col_names":["a"],"lsn":1,"seq_id":0,"op":{"Upsert":["x"]}}', "unknown op 'Upsert'"),
        (b'{"table_name":"t","col_names":["a"],"lsn":1,"seq_id":0,"op":{"Insert":["x"],"Delete":["x"]}}', "one key"),
        (b'{"table_name":"t","col_names":["a"],"lsn":1,"seq_id":0,"op":{"Insert":["x","y"]}}', "2 values but col_names has 1"),
        (b'{"table_name":"t","col_names":["a"],"lsn":1,"seq_id":0,"op":{"Insert":[1]}}', "strings and nulls"),
        (b'{"table_name":"t","col_names":["a"],"lsn":1,"seq_id":0,"op":{"Update":[["x"]]}}', "[old_row, new_row]"),
    ],
)
def test_malformed_records_say_what_is_wrong(raw: bytes, fragment: str) -> None:
    with pytest.raises(MalformedRecordError) as info:
        ReplicationOp.from_json(raw)
    assert fragment in str(info.value)


def test_a_tombstone_is_not_an_op() -> None:
    with pytest.raises(MalformedRecordError, match="tombstone"):
        ReplicationOp.from_json(None)
    assert [ReplicationOp.from_json(s).seq_id for s in SAMPLES] == [0, 1, 2, 2]


def test_op_validates_its_rows() -> None:
    with pytest.raises(ValueError):
        Op("Insert", ("x",), ("y",))
    with pytest.raises(ValueError):
        Op("Merge", None, ("y",))
