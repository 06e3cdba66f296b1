"""The pgrepl command line and its config files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import pgrepl
from pgrepl import ConfigError
from pgrepl.cli import main
from pgrepl.config import load_file, producer_kwargs
from pgrepl.postgres.connect import redact_dsn


def test_version(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"pgrepl {pgrepl.__version__}"


def test_toml_config_with_environment_secrets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PG_DSN", "postgresql://u:pw@db/x")
    monkeypatch.setenv("KAFKA_PASSWORD", "hunter2")
    path = tmp_path / "p.toml"
    path.write_text(
        'dsn_env = "PG_DSN"\nbrokers = "k:9092"\nslot = "slot_1"\npublication = "pub"\ntruncate = "skip"\n'
        '[topic_map.inventory]\nname = "inv"\npartition_key = ["org"]\n'
        '[kafka]\n"sasl.password" = "${KAFKA_PASSWORD}"\n')
    kwargs = producer_kwargs(load_file(path))
    assert kwargs["pg_dsn"] == "postgresql://u:pw@db/x"
    assert kwargs["kafka_config"] == {"sasl.password": "hunter2"}
    assert kwargs["topic_map"] == {"inventory": {"name": "inv", "partition_key": ["org"]}}
    assert kwargs["truncate"] == "skip"


@pytest.mark.parametrize("content, suffix, fragment", [
    ("{", ".json", "is not valid JSON"),
    ("a = ", ".toml", "is not valid TOML"),
    ('{"brokers": "k"}', ".json", "config lacks dsn, slot, publication, topic_map"),
    ('{"dsn": "x", "brokers": "k", "slot": "s", "publication": "p", "topic_map": {}, "typo": 1}', ".json",
     "unknown config keys ['typo']"),
    ('{"dsn": "${NOPE_NOT_SET}"}', ".json", "refers to environment variable NOPE_NOT_SET, which is not set"),
])
def test_config_errors(tmp_path: Path, content: str, suffix: str, fragment: str) -> None:
    path = tmp_path / f"c{suffix}"
    path.write_text(content)
    with pytest.raises(ConfigError) as info:
        producer_kwargs(load_file(path))
    assert fragment in str(info.value)


def test_produce_with_bad_config_exits_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"dsn": "x", "brokers": "k", "slot": "Bad-Slot", "publication": "p",
                                "topic_map": {"t": {"name": "t"}}}))
    assert main(["produce", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pgrepl: configuration error: invalid replication slot name 'Bad-Slot'")
    assert len(err.splitlines()) == 1


def test_missing_config_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["produce", "--config", str(tmp_path / "nope.toml")]) == 2
    assert "cannot read config file" in capsys.readouterr().err


@pytest.mark.parametrize("dsn, shown", [
    ("postgresql://user:secret@host:5432/db", "postgresql://user:***@host:5432/db"),
    ("host=h user=u password=secret dbname=d", "host=h user=u password=*** dbname=d"),
    ("host=h password='se cret' dbname=d", "host=h password=*** dbname=d"),
    ("postgresql://host/db", "postgresql://host/db"),
])
def test_redact_dsn(dsn: str, shown: str) -> None:
    assert redact_dsn(dsn) == shown


def test_message_larger_than_the_queue_is_rejected_up_front() -> None:
    from pgrepl.producer import Producer

    with pytest.raises(ConfigError, match="message.max.bytes is larger than the producer queue"):
        Producer("dbname=x", "k:9092", "slot_1", "pub", {"t": {"name": "t"}},
                 kafka_config={"message.max.bytes": 100_000_000, "queue.buffering.max.kbytes": 1024})
