"""The README's examples run as written, against the test's PostgreSQL and broker.

Every fenced ``python``/``sh``/``toml``/``sql`` block of README.md carries a marker comment on the
line before it: ``<!-- test: KIND NAME -->`` names the part of the walk-through below that runs
it, ``<!-- test: skip (why) -->`` says why it does not run here. A block without a marker fails
``test_every_readme_example_is_covered``, so an example cannot be added untested by accident.

The only substitutions are the placeholders the examples use for where the services are:
the DSNs ``postgresql://user:password@localhost:5432/db`` (source) and
``postgresql://user:password@sink:5432/db`` (sink) become a fresh database on the test server,
``localhost:9092`` the test broker.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional

import psycopg2
import psycopg2.extensions
import pytest

from pgrepl import ReplicationOp
from pgrepl.postgres.slot import drop_slot
from tests.integration.conftest import kafka_admin
from tests.integration.helpers import execute, read_topic

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
SOURCE_DSN = "postgresql://user:password@localhost:5432/db"
SINK_DSN = "postgresql://user:password@sink:5432/db"
BROKERS = "localhost:9092"
TESTED_LANGUAGES = ("python", "sh", "bash", "toml", "sql", "json")
KINDS = ("python", "sh", "toml", "sql", "skip")

_FENCE = re.compile(r"^```(\S*)\s*$")
_MARKER = re.compile(r"^<!--\s*test:\s*(.*?)\s*-->$")


@dataclass
class Block:
    """One fenced block of the README."""

    language: str
    code: str
    line: int
    marker: Optional[str]


def readme_blocks(text: str) -> List[Block]:
    """The fenced blocks of ``text`` with the marker comment just before each (if any)."""
    blocks: List[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        start = i
        j = i + 1
        while j < len(lines) and lines[j].strip() != "```":
            j += 1
        before = next((lines[k].strip() for k in range(start - 1, -1, -1) if lines[k].strip()), "")
        marker = _MARKER.match(before)
        blocks.append(Block(match.group(1), "\n".join(lines[start + 1:j]) + "\n", start + 1,
                            marker.group(1) if marker else None))
        i = j + 1
    return blocks


def block(name: str) -> Block:
    """The README block marked ``<!-- test: NAME -->`` (exactly one)."""
    found = [b for b in readme_blocks(README.read_text()) if b.marker == name]
    assert len(found) == 1, f"README.md must have exactly one block marked <!-- test: {name} -->, has {len(found)}"
    return found[0]


def test_every_readme_example_is_covered() -> None:
    """Every code block is run by this module or skipped with a reason."""
    uncovered = []
    for b in readme_blocks(README.read_text()):
        if b.language not in TESTED_LANGUAGES:
            continue  # output, diagrams
        kind = (b.marker or "").split(" ", 1)[0]
        if kind not in KINDS or (kind == "skip" and "(" not in (b.marker or "")):
            uncovered.append(f"README.md:{b.line} ({b.language})")
    assert not uncovered, f"README code blocks without a <!-- test: ... --> marker: {uncovered}"


# ------------------------------------------------------------------------------------------
# Running examples
# ------------------------------------------------------------------------------------------


class Example:
    """A README example running in its own process; its stdout lines are collected as they come."""

    def __init__(self, argv: List[str], cwd: Path, env: Dict[str, str], name: str, logs: Optional[Path] = None) -> None:
        self.name = name
        self.stderr_path = (logs or cwd) / f"{name}.stderr"
        self.lines: List[str] = []
        with open(self.stderr_path, "wb") as stderr:
            self.proc = subprocess.Popen(argv, cwd=str(cwd), env=env, stdout=subprocess.PIPE, stderr=stderr,
                                         start_new_session=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))

    def log(self) -> str:
        return f"{self.name} stdout:\n" + "\n".join(self.lines[-20:]) + f"\n{self.name} stderr:\n" + \
            self.stderr_path.read_text(errors="replace")[-3000:]

    def wait_until(self, predicate: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert self.proc.poll() is None, f"{self.name} exited ({self.proc.returncode}) before {what}\n{self.log()}"
            assert time.monotonic() < deadline, f"{self.name}: no {what} within {timeout:.0f} s\n{self.log()}"
            time.sleep(0.2)

    def finish(self, terminate: bool = True, timeout: float = 60.0) -> None:
        """SIGTERM (the way an operator stops it) unless it ends by itself; it must exit 0."""
        if terminate and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._reader.join(10)
        assert code == 0, f"{self.name} exited with {code}\n{self.log()}"


@pytest.fixture
def readme_env(pg_dsn: str, kafka_bootstrap: str, tmp_path: Path) -> Iterator[Dict[str, str]]:
    """A fresh database for the examples, the placeholders' substitutes, and cleanup of what the
    examples create under their fixed names (slot_1, inventory_topic)."""
    admin = psycopg2.connect(pg_dsn)
    admin.autocommit = True
    dbname = f"pgrepl_readme_{uuid.uuid4().hex[:8]}"
    with admin.cursor() as cur:
        cur.execute("SELECT 1 FROM pg_replication_slots WHERE slot_name = 'slot_1'")
        if cur.fetchone() is not None:
            pytest.fail("a replication slot named slot_1 exists on the test server; the README examples use that name")
        cur.execute(f'CREATE DATABASE "{dbname}"')
    params = psycopg2.extensions.parse_dsn(pg_dsn)
    params["dbname"] = dbname
    dsn = psycopg2.extensions.make_dsn(**params)
    _delete_topic(kafka_bootstrap, "inventory_topic")
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = dict(os.environ, PATH=path, PYTHONUNBUFFERED="1")
    try:
        yield {"dsn": dsn, "brokers": kafka_bootstrap, "cwd": str(tmp_path), **env}
    finally:
        drop_slot(admin, "slot_1")
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{dbname}"')
        admin.close()
        _delete_topic(kafka_bootstrap, "inventory_topic")


def _delete_topic(bootstrap: str, topic: str) -> None:
    admin = kafka_admin(bootstrap)
    if topic in admin.list_topics(timeout=10).topics:
        for future in admin.delete_topics([topic], operation_timeout=10).values():
            future.result(15)


def substitute(code: str, env: Dict[str, str]) -> str:
    for placeholder in (SOURCE_DSN, SINK_DSN):
        code = code.replace(placeholder, env["dsn"])
    return code.replace(BROKERS, env["brokers"])


def run_python(name: str, env: Dict[str, str]) -> Example:
    code = substitute(block(f"python {name}").code, env)
    return Example([sys.executable, "-c", code], Path(env["cwd"]), _process_env(env), name)


def run_sh(name: str, env: Dict[str, str]) -> Example:
    bash = shutil.which("bash") or "/bin/sh"
    code = substitute(block(f"sh {name}").code, env)
    return Example([bash, "-c", code], Path(env["cwd"]), _process_env(env), name)


def _process_env(env: Dict[str, str]) -> Dict[str, str]:
    return {k: v for k, v in env.items() if k not in ("dsn", "brokers", "cwd")}


def run_sql(name: str, dsn: str) -> None:
    execute(dsn, block(f"sql {name}").code)


def topic_ops(bootstrap: str) -> List[ReplicationOp]:
    return [ReplicationOp.from_json(value) for _, _, _, value in read_topic(bootstrap, "inventory_topic")]


# ------------------------------------------------------------------------------------------
# The walk-through: producer (API, then CLI), then the consumers
# ------------------------------------------------------------------------------------------


def test_readme_walkthrough(readme_env: Dict[str, str]) -> None:
    dsn, brokers = readme_env["dsn"], readme_env["brokers"]
    run_sql("source", dsn)

    producer = run_python("producer", readme_env)
    try:
        producer.wait_until(lambda: _slot_active(dsn), "walsender on slot_1")
        execute(dsn, "INSERT INTO inventory_table VALUES (1, 'org-a', 'widget', 10), (2, 'org-b', 'gadget', 3)",
                "UPDATE inventory_table SET quantity = quantity - 1 WHERE id = 1",
                "DELETE FROM inventory_table WHERE id = 2")
        producer.wait_until(lambda: len(topic_ops(brokers)) >= 4, "4 records on inventory_topic")
    finally:
        producer.finish()
    assert [(op.op.kind, op.row_dict()["id"]) for op in sorted(topic_ops(brokers), key=lambda o: o.position)] == [
        ("Insert", "1"), ("Insert", "2"), ("Update", "1"), ("Delete", "2")]

    Path(readme_env["cwd"], "producer.toml").write_text(substitute(block("toml producer.toml").code, readme_env))
    cli = run_sh("produce-cli", readme_env)
    try:
        cli.wait_until(lambda: _slot_active(dsn), "walsender on slot_1")
        execute(dsn, "INSERT INTO inventory_table VALUES (3, 'org-c', 'gizmo', 7)")
        cli.wait_until(lambda: len(topic_ops(brokers)) >= 5, "5 records on inventory_topic")
        run_sql("snapshot-request", dsn)  # the table's two rows again, as snapshot Inserts
        cli.wait_until(lambda: len(topic_ops(brokers)) >= 7, "the snapshot's 2 records")
        request = run_sh("snapshot-cli", readme_env)  # and once more, asked for from the command line
        request.finish(terminate=False, timeout=90)
        assert request.lines[-1].startswith("snapshot request-"), request.log()
        cli.wait_until(lambda: len(topic_ops(brokers)) >= 9, "the second snapshot's 2 records")
    finally:
        cli.finish()

    check = run_sh("check-cli", readme_env)
    check.finish(terminate=False, timeout=90)  # exit 0: every check passed
    assert check.lines[-1] == "all checks passed", check.log()
    assert any(line.startswith("OK    slot history            slot_1 last confirmed") for line in check.lines), check.log()
    status = run_sh("status-cli", readme_env)
    status.finish(terminate=False, timeout=90)
    assert status.lines[0].split()[0] == "slot" and any(line.startswith("slot_1 ") for line in status.lines), status.log()

    consume = run_sh("consume-cli", readme_env)
    consume.finish(terminate=False, timeout=90)  # --until-eof: ends by itself
    printed = [ReplicationOp.from_json(line.encode()) for line in consume.lines if line.strip()]
    assert sorted(op.position for op in printed) == sorted(op.position for op in topic_ops(brokers))

    Path(readme_env["cwd"], "consumer.toml").write_text(substitute(block("toml consumer.toml").code, readme_env))
    from_file = run_sh("consume-config", readme_env)
    from_file.finish(terminate=False, timeout=90)
    assert sorted(line for line in from_file.lines if line.strip()) == sorted(line for line in consume.lines if line.strip())

    basic = run_python("consumer-basic", readme_env)
    try:
        basic.wait_until(lambda: len(basic.lines) >= 9, "9 printed ops")
    finally:
        basic.finish()
    assert sorted(basic.lines)[0].startswith("inventory_table Delete {'id': '2', 'organization_id': 'org-b'")

    run_sql("sink", dsn)
    sink = run_python("consumer-idempotent", readme_env)
    try:
        sink.wait_until(lambda: _rows(dsn, "SELECT id::text, organization_id FROM inventory ORDER BY id") ==
                        _rows(dsn, "SELECT id::text, organization_id FROM inventory_table ORDER BY id"),
                        "sink table equal to the source")
    finally:
        sink.finish()
    assert _rows(dsn, "SELECT id FROM inventory ORDER BY id") == [(1,), (3,)]

    slot = run_sh("slot-cli", readme_env)
    slot.finish(terminate=False, timeout=90)
    assert _rows(dsn, "SELECT slot_name FROM pg_replication_slots WHERE slot_name = 'slot_1'") == []
    assert any(line.startswith("forgot slot slot_1") for line in slot.lines), slot.log()


def _slot_active(dsn: str) -> bool:
    return _rows(dsn, "SELECT active FROM pg_replication_slots WHERE slot_name = 'slot_1'") == [(True,)]


def _rows(dsn: str, query: str) -> list:
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute(query)
            return cur.fetchall()
    finally:
        conn.close()


# ------------------------------------------------------------------------------------------
# make demo
# ------------------------------------------------------------------------------------------

_LSN = re.compile(rb'"lsn":\d+')


def _demo_ops(lines: List[str]) -> List[str]:
    """The demo's op lines without partition and LSN (they depend on the broker and the server)."""
    out = []
    for line in lines:
        match = re.match(r"^\s*\[\d+\]\s+(b'[^']*')\s+(\{.*\})\s*$", line)
        if match:
            out.append(match.group(1) + " " + _LSN.sub(b'"lsn":N', match.group(2).encode()).decode())
    return out


def test_make_demo_prints_what_the_readme_shows(tmp_path: Path) -> None:
    """``make demo`` (here: what it runs, in this interpreter) prints the README's ops."""
    demo = block("sh demo")
    assert demo.code.strip() == "make demo"
    text = README.read_text()
    shown = text[text.index("```", text.index("make demo\n```") + 12):]
    shown_ops = _demo_ops(shown[:shown.index("```", 3)].splitlines())
    assert len(shown_ops) == 4
    in_repo_venv = Path(sys.prefix).resolve() == (ROOT / ".venv").resolve() and shutil.which("make")
    argv = ["make", "-s", "demo"] if in_repo_venv else [sys.executable, "-m", "pgrepl.demo"]
    run = Example(argv, ROOT if in_repo_venv else tmp_path, dict(os.environ), "demo", logs=tmp_path)
    run.finish(terminate=False, timeout=180)
    assert _demo_ops(run.lines) == shown_ops, run.log()
    assert any(line.startswith("stopped cleanly; slot confirmed up to LSN") for line in run.lines), run.log()

