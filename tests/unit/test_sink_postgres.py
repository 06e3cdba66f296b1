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
