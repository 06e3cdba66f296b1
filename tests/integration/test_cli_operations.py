"""The operator commands against a real PostgreSQL and broker: ``pgrepl check`` on bad configurations
(the right line, the right exit status, never a traceback or a password), ``status``, ``slot drop``
and ``slot forget``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import psycopg2.extensions
import pytest
from confluent_kafka import Producer as KafkaProducer

from pgrepl.producer.history import SlotHistory, SlotRecord
from tests.integration.helpers import PROJECT_ROOT, execute, make_source

PASSWORD = "S3cr3t-pw"  # the sandbox trusts local connections, so any password gets in: none may be printed


def pgrepl(*argv: str, stdin: str = "") -> Tuple[int, str]:
    """Run the ``pgrepl`` command in a new process: (exit status, stdout + stderr)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")])))
    env.pop("PGPASSWORD", None)
    proc = subprocess.run([sys.executable, "-m", "pgrepl.cli", *argv], input=stdin.encode(), capture_output=True,
                          env=env, timeout=120)
    return proc.returncode, (proc.stdout + proc.stderr).decode("utf-8", "replace")


def with_password(dsn: str) -> str:
    params = psycopg2.extensions.parse_dsn(dsn)
    params["password"] = PASSWORD
    return psycopg2.extensions.make_dsn(**params)


def toml_config(path: Path, values: Dict[str, str], extra: str = "") -> Path:
    """A producer config: ``values`` are TOML right-hand sides (already quoted), ``extra`` appended."""
    path.write_text("".join(f"{k} = {v}\n" for k, v in values.items()) + extra)
    return path


@pytest.fixture
def setup(pg_dsn: str, kafka_bootstrap: str, name_prefix: str, tmp_path: Path) -> Dict[str, object]:
    """A published table, its topic, and the values of a config that passes every check."""
    p = name_prefix
    make_source(pg_dsn, p)
    execute(pg_dsn, f"CREATE TABLE {p}nokey (id int PRIMARY KEY, grp text)",
            f"CREATE TABLE {p}plain (id int PRIMARY KEY, grp text NOT NULL)",
            f"CREATE PUBLICATION {p}pub2 FOR TABLE {p}nokey", f"CREATE PUBLICATION {p}pub3 FOR TABLE {p}plain")
    kafka = KafkaProducer({"bootstrap.servers": kafka_bootstrap})
    kafka.produce(f"{p}topic", b"x")  # the topic exists (auto-created)
    kafka.flush(30)
    dsn = with_password(pg_dsn)
    base = {"dsn": json.dumps(dsn), "brokers": json.dumps(kafka_bootstrap), "slot": json.dumps(f"{p}slot"),
            "publication": json.dumps(f"{p}pub"), "history_topic": json.dumps(f"{p}history")}
    table = f'[topic_map.{p}src]\nname = "{p}topic"\npartition_key = ["grp"]\n'
    return {"p": p, "dsn": dsn, "base": base, "table": table, "dir": tmp_path, "brokers": kafka_bootstrap}


def check(path: Path, *extra: str) -> Tuple[int, str]:
    return pgrepl("check", "--config", str(path), "--timeout", "3", *extra)


def assert_clean(out: str) -> None:
    assert "Traceback" not in out, out
    assert PASSWORD not in out and "S3cr3t" not in out, out


def test_check_passes_on_a_good_config_with_dotted_kafka_keys(setup: Dict) -> None:
    path = toml_config(setup["dir"] / "good.toml", setup["base"], setup["table"] + "[kafka]\nlinger.ms = 5\n"
                       "socket.keepalive.enable = true\n")
    code, out = check(path)
    assert_clean(out)
    assert code == 0, out
    assert "all checks passed" in out and "OK    slot " in out
    code, out = check(path, "--json")
    assert code == 0 and json.loads(out)["ok"] is True


BAD_CASES: List[Tuple[str, int, str]] = [
    # (name, exit status, fragment of the printed line)
    ("toml syntax", 2, "is not valid TOML"),
    ("missing keys", 2, "config lacks slot"),
    ("unknown key", 2, "unknown config keys ['slott']"),
    ("bad slot name", 2, "invalid replication slot name 'Bad-Slot'"),
    ("unset variable", 2, "refers to environment variable PGREPL_TEST_NOT_SET, which is not set"),
    ("unknown kafka property", 2, 'No such configuration property: "linger.mss"'),
    ("bad kafka value", 2, 'Invalid value for configuration property'),
    ("weakened guarantee", 2, "kafka_config may not set acks=1"),
    ("password with spaces", 2, "invalid PostgreSQL DSN"),
    ("missing database", 2, "does not exist"),
    ("postgres down", 1, "postgres connection"),
    ("missing publication", 2, "does not exist; create it: CREATE PUBLICATION"),
    ("table not in topic map", 2, "but not in the topic map"),
    ("partition key missing", 2, "partition-key column 'nope' does not exist"),
    ("nullable partition key", 2, "is nullable; make it NOT NULL"),
    ("replica identity", 2, "REPLICA IDENTITY FULL"),
    ("kafka down", 1, "FAIL  kafka"),
    ("role without replication", 2, "REPLICATION (as a superuser)"),
    ("physical slot", 2, "pgrepl needs a logical pgoutput slot"),
    ("metrics port", 2, "metrics_port must be a TCP port number"),
]


def bad_config(case: str, setup: Dict, pg_dsn: str) -> Path:
    """The config of one bad case (and whatever it needs on the server)."""
    p, base, table = setup["p"], dict(setup["base"]), setup["table"]
    kafka = ""
    if case == "toml syntax":
        return toml_config(setup["dir"] / "c.toml", base, table + "[kafka\n")
    if case == "missing keys":
        base.pop("slot")
    elif case == "unknown key":
        base["slott"] = '"x"'
    elif case == "bad slot name":
        base["slot"] = '"Bad-Slot"'
    elif case == "unset variable":
        base["dsn"] = '"${PGREPL_TEST_NOT_SET}"'
    elif case == "unknown kafka property":
        kafka = "[kafka]\nlinger.mss = 5\n"
    elif case == "bad kafka value":
        kafka = '[kafka]\n"linger.ms" = "soon"\n'
    elif case == "weakened guarantee":
        kafka = "[kafka]\nacks = 1\n"
    elif case == "password with spaces":
        params = psycopg2.extensions.parse_dsn(pg_dsn)
        base["dsn"] = json.dumps(f"host={params['host']} port={params['port']} password={PASSWORD} and more words")
    elif case == "missing database":
        params = psycopg2.extensions.parse_dsn(setup["dsn"])
        params["dbname"] = f"{p}nodb"
        base["dsn"] = json.dumps(psycopg2.extensions.make_dsn(**params))
    elif case == "postgres down":
        base["dsn"] = json.dumps(f"postgresql://u:{PASSWORD}@127.0.0.1:1/db?connect_timeout=3")
    elif case == "missing publication":
        base["publication"] = f'"{p}nopub"'
    elif case == "table not in topic map":
        base["publication"] = f'"{p}pub3"'
    elif case == "partition key missing":
        table = table.replace('["grp"]', '["nope"]')
    elif case in ("nullable partition key", "replica identity"):
        base["publication"] = f'"{p}pub2"'
        key = '["grp"]' if case == "nullable partition key" else "[]"
        table = f'[topic_map.{p}nokey]\nname = "{p}topic"\npartition_key = {key}\n'
    elif case == "kafka down":
        base["brokers"] = '"127.0.0.1:1"'
    elif case == "role without replication":
        execute(pg_dsn, f"CREATE ROLE {p}norepl LOGIN")
        params = psycopg2.extensions.parse_dsn(setup["dsn"])
        params["user"] = f"{p}norepl"
        base["dsn"] = json.dumps(psycopg2.extensions.make_dsn(**params))
    elif case == "physical slot":
        execute(pg_dsn, f"SELECT pg_create_physical_replication_slot('{p}slot')")
    elif case == "metrics port":
        base["metrics_port"] = '"9187"'
    return toml_config(setup["dir"] / "c.toml", base, table + kafka)


@pytest.mark.parametrize("case, status, fragment", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_check_says_what_is_wrong(setup: Dict, pg_dsn: str, drop_replication_slot, case: str, status: int,
                                  fragment: str) -> None:
    try:
        code, out = check(bad_config(case, setup, pg_dsn))
    finally:
        if case == "physical slot":
            drop_replication_slot(f"{setup['p']}slot")
        if case == "role without replication":
            execute(pg_dsn, f"DROP ROLE IF EXISTS {setup['p']}norepl")
    assert_clean(out)
    assert fragment in out, out
    assert code == status, out
    if case == "password with spaces":
        assert "more words" not in out and "words" not in out, out


def test_slot_history_forget_and_status(setup: Dict, pg_dsn: str, drop_replication_slot) -> None:
    p, brokers = setup["p"], setup["brokers"]
    path = toml_config(setup["dir"] / "p.toml", setup["base"], setup["table"])
    conn = psycopg2.connect(pg_dsn)
    with conn.cursor() as cur:
        cur.execute("SELECT system_identifier::text, current_database() FROM pg_control_system()")
        system_identifier, database = cur.fetchone()
    conn.close()
    # the history remembers a slot that is gone: the producer would stop with SlotLostError
    kafka = KafkaProducer({"bootstrap.servers": brokers})
    SlotHistory(kafka, brokers, {}, f"{p}history").save(
        SlotRecord(f"{p}slot", database, system_identifier, 0x1234567, instance="old"), wait=30)
    code, out = check(path)
    assert_clean(out)
    assert code == 2 and "FAIL  slot history" in out and f"pgrepl slot forget {p}slot --config FILE" in out, out

    code, out = pgrepl("slot", "forget", f"{p}slot", "--config", str(path))  # no terminal, no --yes
    assert code == 2 and "needs confirmation" in out, out
    code, out = pgrepl("slot", "forget", f"{p}slot", "--config", str(path), "--yes")
    assert_clean(out)
    assert code == 0 and f"forgot slot {p}slot (last confirmed 0/1234567)" in out, out
    code, out = check(path)
    assert code == 0 and "no record of" in out, out
    code, out = pgrepl("slot", "forget", f"{p}slot", "--config", str(path), "--yes")
    assert code == 0 and "nothing to forget" in out, out

    execute(pg_dsn, f"SELECT pg_create_logical_replication_slot('{p}slot', 'pgoutput')")
    try:
        code, out = pgrepl("status", "--dsn", setup["dsn"], "--brokers", brokers, "--history-topic", f"{p}history",
                           "--json")
        assert_clean(out)
        assert code == 0, out
        row = next(r for r in json.loads(out) if r["slot"] == f"{p}slot")
        assert row["plugin"] == "pgoutput" and row["wal_status"] == "reserved" and row["active_pid"] is None
        assert row["retained_wal"] >= 0 and row["lag"] >= 0 and row["history_lsn"] is None
        code, out = pgrepl("status", "--config", str(path))
        assert code == 0 and f"{p}slot" in out and "pgoutput" in out, out

        code, out = pgrepl("slot", "drop", f"{p}slot", "--dsn", setup["dsn"])
        assert code == 2 and "needs confirmation" in out, out
        code, out = pgrepl("slot", "drop", f"{p}slot", "--dsn", setup["dsn"], "--yes", "--json")
        assert_clean(out)
        assert code == 0 and json.loads(out) == {"slot": f"{p}slot", "dropped": True}, out
        code, out = pgrepl("slot", "drop", f"{p}slot", "--dsn", setup["dsn"], "--yes")
        assert code == 2 and "does not exist" in out, out
    finally:
        drop_replication_slot(f"{p}slot")
