"""The CLI's error mapping: one line, exit 2 for configuration and 1 for runtime, no secret, no traceback."""

from __future__ import annotations

import logging
from pathlib import Path

import psycopg2
import psycopg2.errors
import pytest
from confluent_kafka import KafkaError, KafkaException

from pgrepl import ConfigError, DeliveryError, SlotLostError
from pgrepl.cli import main
from pgrepl.cli.errors import SECRETS, ScrubSecrets, Secrets, describe
from pgrepl.config import consumer_settings, flatten_dotted, load_file, producer_kwargs
from pgrepl.postgres.connect import dsn_params, dsn_secrets, redact_dsn
from pgrepl.producer.output import Retry


@pytest.mark.parametrize("exc, code, start", [
    (ConfigError("slot name"), 2, "configuration error: slot name"),
    (KafkaException(KafkaError(KafkaError._INVALID_ARG, "No such configuration property")), 2,
     "configuration error: Kafka: No such configuration property"),
    (KafkaException(KafkaError(KafkaError._TRANSPORT, "Broker transport failure")), 1, "Kafka: Broker transport failure"),
    (psycopg2.OperationalError("connection refused\nDETAIL: more"), 1, "PostgreSQL: connection refused"),
    (psycopg2.ProgrammingError("invalid dsn: missing \"=\""), 2, "configuration error: invalid PostgreSQL DSN"),
    (psycopg2.errors.InsufficientPrivilege("permission denied for table t"), 2,
     "configuration error: PostgreSQL: permission denied"),
    (psycopg2.DatabaseError("server closed the connection"), 1, "PostgreSQL: server closed"),
    (SlotLostError("slot s is missing"), 1, "SlotLostError: slot s is missing"),
    (DeliveryError("refused"), 1, "DeliveryError: refused"),
    (Retry("cannot reach Kafka"), 1, "cannot reach Kafka"),
    (FileNotFoundError(2, "No such file or directory", "x.toml"), 1, "No such file or directory: x.toml"),
    (KeyboardInterrupt(), 130, "interrupted"),
    (ValueError("boom"), 1, "internal error: ValueError: boom"),
])
def test_describe_maps_every_failure_to_one_line(exc: BaseException, code: int, start: str) -> None:
    got_code, line = describe(exc)
    assert (got_code, line[:len(start)]) == (code, start)
    assert "\n" not in line


def test_secrets_are_scrubbed_from_lines_and_log_records(caplog: pytest.LogCaptureFixture) -> None:
    secrets = Secrets()
    secrets.add_dsn("host=h password=top secret words dbname=d")
    secrets.add_kafka({"sasl.password": "kafka-pw", "linger.ms": 5, "ssl.key.password": "keypw1"})
    text = 'missing "=" after "secret" with top secret words, kafka-pw and keypw1; linger.ms 5'
    assert secrets.scrub(text) == 'missing "=" after "***" with ***, *** and ***; linger.ms 5'
    SECRETS.add_kafka({"sasl.password": "hunter22"})
    logger = logging.getLogger("pgrepl.test.scrub")
    handler = logging.Handler()
    seen = []
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    handler.addFilter(ScrubSecrets())
    logger.addHandler(handler)
    try:
        logger.warning("auth failed with %s", "hunter22")
    finally:
        logger.removeHandler(handler)
    assert seen == ["auth failed with ***"]


@pytest.mark.parametrize("dsn, shown, hidden", [
    ("host=h password=my secret words dbname=d", "host=h password=*** dbname=d", ["secret", "words"]),
    ("host=h password=my secret", "host=h password=***", ["secret"]),
    ("postgresql://u:p@ss@h:5/db", "postgresql://u:***@h:5/db", ["ss@h"]),
    ("postgresql://h/db?password=abc&sslmode=require", "postgresql://h/db?password=***&sslmode=require", ["abc"]),
])
def test_redact_dsn_hides_every_part_of_the_password(dsn: str, shown: str, hidden: list) -> None:
    assert redact_dsn(dsn) == shown
    assert set(hidden) & set(dsn_secrets(dsn)) or hidden == ["ss@h"]


def test_unquoted_password_with_spaces_does_not_leak_through_libpq() -> None:
    with pytest.raises(ConfigError) as info:
        dsn_params("host=h password=correct horse battery dbname=d")
    message = str(info.value)
    assert "invalid PostgreSQL DSN" in message
    for word in ("correct", "horse", "battery"):
        assert word not in message


def test_dotted_toml_keys_are_flattened(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text('dsn = "dbname=x"\nbrokers = "k:9092"\nslot = "s"\npublication = "p"\n'
                    '[topic_map.public.orders]\nname = "orders"\n'
                    '[topic_map."public.items"]\nname = "items"\n'
                    '[kafka]\nsecurity.protocol = "SSL"\nssl.ca.location = "/ca.pem"\n"linger.ms" = 5\n')
    kwargs = producer_kwargs(load_file(path))
    assert kwargs["kafka_config"] == {"security.protocol": "SSL", "ssl.ca.location": "/ca.pem", "linger.ms": 5}
    assert kwargs["topic_map"] == {"public.orders": {"name": "orders"}, "public.items": {"name": "items"}}


def test_a_key_given_dotted_and_quoted_is_an_error() -> None:
    with pytest.raises(ConfigError, match="sets 'security.protocol' twice"):
        flatten_dotted({"security": {"protocol": "SSL"}, "security.protocol": "PLAINTEXT"}, "the kafka table")


def test_consume_config_with_environment_secrets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KPW", "pw")
    path = tmp_path / "c.toml"
    path.write_text('brokers = "k:9092"\ntopics = ["a", "b"]\ngroup = "g"\n[kafka]\nsasl.password = "${KPW}"\n')
    assert consumer_settings(load_file(path)) == {"brokers": "k:9092", "topics": "a,b", "group": "g",
                                                  "kafka": {"sasl.password": "pw"}}


@pytest.mark.parametrize("argv, code, fragment", [
    (["consume", "--group", "g"], 2, "pgrepl consume needs --topics"),
    (["consume", "--topics", "t", "--group", "g", "--kafka", "linger.mss=5"], 2,
     'No such configuration property: "linger.mss"'),
    (["consume", "--topics", "t", "--group", "g", "--kafka", "oops"], 2, "--kafka expects KEY=VALUE"),
    (["status"], 2, "no PostgreSQL DSN"),
    (["status", "--dsn", "host=h password=my secret pw"], 2, "invalid PostgreSQL DSN"),
    (["slot", "drop", "Bad-Name", "--dsn", "dbname=x"], 2, "invalid replication slot name"),
    (["check", "--config", "/nonexistent/p.toml"], 2, "cannot read config file"),
])
def test_commands_fail_with_one_line(argv: list, code: int, fragment: str, capsys: pytest.CaptureFixture) -> None:
    assert main(argv) == code
    captured = capsys.readouterr()
    assert fragment in captured.err + captured.out
    assert "Traceback" not in captured.err and "secret" not in captured.err
    assert len(captured.err.strip().splitlines()) == 1 or argv[0] == "check"


def test_metrics_port_without_prometheus_client(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from pgrepl.producer import Producer

    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    with pytest.raises(ConfigError, match=r"pip install 'pgrepl\[metrics\]'"):
        Producer("dbname=x", "k:9092", "slot_1", "pub", {"t": {"name": "t"}}, metrics_port=9187)
