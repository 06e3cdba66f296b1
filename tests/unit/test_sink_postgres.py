"""The PostgreSQL sink's pieces that need no database (the transaction is tested in tests/integration)."""

from __future__ import annotations

import pytest

from pgrepl import ConfigError
from pgrepl.sink.postgres import parse_table_name as parse_state_table


def test_state_table_names() -> None:
    assert parse_state_table("pgrepl_state") == ("pgrepl_state",)
    assert parse_state_table("sink.state") == ("sink", "state")
    assert parse_state_table('"My.Schema"."st""ate"') == ("My.Schema", 'st"ate')
    for bad in ("", "a.b.c", '"open', "a.", ".b"):
        with pytest.raises(ConfigError):
            parse_state_table(bad)


def test_copy_rows_escape_like_copy_text_format() -> None:
    """``copy_rows``: the row of each op (new, old for a Delete), \\ \t \n \r escaped, \\N for NULL,
    optionally led by the kind letter."""
    from pgrepl.model import Op, ReplicationOp
    from pgrepl.sink import copy_rows

    ops = [ReplicationOp("t", ("a", "b", "c"), 1, i, op) for i, op in enumerate([
        Op.insert(("1", "plain", "x")), Op.update(("1", "a", "b"), ("1", "a\tb", None)),
        Op.delete(("2", "c\\d", "e\nf\r é"))])]
    assert copy_rows(ops, with_kind=True) == ("I\t1\tplain\tx\nU\t1\ta\\tb\t\\N\n"
                                              "D\t2\tc\\\\d\te\\nf\\r é\n").encode()
    assert copy_rows(ops[:1]) == b"1\tplain\tx\n" and copy_rows([]) == b""
    with pytest.raises(TypeError, match="str or None"):
        copy_rows([ReplicationOp("t", ("a",), 1, 0, Op.insert((1,)))])  # type: ignore[arg-type]
