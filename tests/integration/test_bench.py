"""pgrepl-bench end to end: a tiny run gives every figure; nothing is left behind, even on Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Dict, List, Optional, Set

import psycopg2
import pytest
from confluent_kafka.admin import AdminClient

ROOT = Path(__file__).resolve().parents[2]
# Set in the environment of the benches these tests start (and so of their readers): other test runs
# on the same machine start readers too, which must not count as this run's.
_RUN_MARK = f"PGREPL_BENCH_TEST_RUN={uuid.uuid4().hex}".encode()


def bench_objects(dsn: str) -> Dict[str, Set[str]]:
    """Every pgrepl_bench_* slot, publication and table on the server."""
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(r"SELECT slot_name FROM pg_replication_slots WHERE slot_name LIKE 'pgrepl\_bench\_%'")
            slots = {r[0] for r in cur.fetchall()}
            cur.execute(r"SELECT pubname FROM pg_publication WHERE pubname LIKE 'pgrepl\_bench\_%'")
            pubs = {r[0] for r in cur.fetchall()}
            cur.execute(r"SELECT tablename FROM pg_tables WHERE tablename LIKE 'pgrepl\_bench\_%'")
            tables = {r[0] for r in cur.fetchall()}
    finally:
        conn.close()
    return {"slot": slots, "publication": pubs, "table": tables}


def bench_topics(bootstrap: str) -> Set[str]:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    return {t for t in admin.list_topics(timeout=10).topics if t.startswith("pgrepl_bench_")}


def reader_processes() -> Set[int]:
    """PIDs of live bench workers and pg_recvlogical processes of the benches these tests started."""
    found: Set[int] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmdline = fh.read().replace(b"\0", b" ")
            with open(f"/proc/{entry}/stat", "rb") as fh:
                state = fh.read().rsplit(b")", 1)[1].split()[0]
            if state == b"Z" or not (b"pgrepl.bench.worker" in cmdline or b"pg_recvlogical" in cmdline):
                continue
            with open(f"/proc/{entry}/environ", "rb") as fh:
                ours = _RUN_MARK in fh.read().split(b"\0")
        except OSError:
            continue
        if ours:
            found.add(int(entry))
    return found


def start_bench(args: List[str], log: Path) -> "subprocess.Popen[bytes]":
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    name, value = _RUN_MARK.decode().split("=", 1)
    env[name] = value
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "pgrepl.bench", "--no-progress", *args],
                                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))


def assert_nothing_left(pg_dsn: str, kafka_bootstrap: str, before: Dict[str, Set[str]], topics_before: Set[str],
                        procs_before: Set[int]) -> None:
    after = bench_objects(pg_dsn)
    for kind in after:
        assert after[kind] - before[kind] == set(), f"pgrepl-bench left {kind}s behind"
    assert bench_topics(kafka_bootstrap) - topics_before == set(), "pgrepl-bench left topics behind"
    deadline = time.monotonic() + 10
    while reader_processes() - procs_before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert reader_processes() - procs_before == set(), "pgrepl-bench left reader processes running"


def test_tiny_run_reports_every_figure_and_leaves_nothing(pg_dsn: str, kafka_bootstrap: str, tmp_path: Path) -> None:
    before, topics_before, procs_before = bench_objects(pg_dsn), bench_topics(kafka_bootstrap), reader_processes()
    out = tmp_path / "bench.json"
    log = tmp_path / "bench.log"
    proc = start_bench(["--dsn", pg_dsn, "--brokers", kafka_bootstrap, "--rows", "1000", "--repeat", "1",
                        "--workload", "narrow", "--latency-seconds", "1", "--no-decoder", "--consumer",
                        "--json", str(out)], log)
    try:
        status = proc.wait(120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    text = log.read_text()
    assert status == 0, text[-4000:]
    assert "pg_recvlogical (ceiling)" in text and "pure-Python baseline" in text
    report = json.loads(out.read_text())
    assert [(c["workload"], c["tx_mode"]) for c in report["cases"]] == [("narrow", "big"), ("narrow", "small")]
    for case in report["cases"]:
        assert case["changes"] == 1000
        assert {r["reader"] for r in case["runs"]} == {"recvlogical", "pgrepl", "baseline"}
        for run in case["runs"]:
            assert run["ok"], run
            assert run["rows_per_s"] > 0 and run["cpu_us_per_row"] > 0 and run["peak_rss_mb"] > 1
            if run["reader"] != "recvlogical":
                assert run["records"] == 1000
        assert case["summary"]["pgrepl"]["pct_of_ceiling"]["median"] > 0
    for reader in ("pgrepl", "baseline"):
        latency = report["latency"]["readers"][reader]
        assert latency["rows"] == 200 and 0 < latency["p50_ms"]["median"] <= latency["p99_ms"]["median"] < 10_000
    consumers = [c for c in report["consumer"] if not c.get("error")]
    assert consumers and all(c["rows_per_s"]["median"] > 0 for c in consumers)
    assert report["machine"]["postgresql"] and report["machine"]["librdkafka"]
    assert_nothing_left(pg_dsn, kafka_bootstrap, before, topics_before, procs_before)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_interrupted_run_drops_slots_and_stops_readers(pg_dsn: str, kafka_bootstrap: str, tmp_path: Path,
                                                       signum: int) -> None:
    """Interrupted while a reader streams from an active slot: exit 130, nothing left behind."""
    before, topics_before, procs_before = bench_objects(pg_dsn), bench_topics(kafka_bootstrap), reader_processes()
    log = tmp_path / "bench.log"
    # pgrepl first (--readers order; repeat 0 keeps it), so the interrupt hits a Kafka reader mid-stream
    proc = start_bench(["--dsn", pg_dsn, "--brokers", kafka_bootstrap, "--rows", "300000", "--repeat", "1",
                        "--workload", "narrow", "--tx", "small", "--readers", "pgrepl,baseline,recvlogical",
                        "--no-decoder"], log)
    try:
        deadline = time.monotonic() + 90
        active: Optional[str] = None
        # an active slot and a live reader seen together: a fast server can finish a reader in between
        while active is None or not reader_processes() - procs_before:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no bench slot became active with its reader running within 90 s"
            conn = psycopg2.connect(pg_dsn)
            try:
                with conn.cursor() as cur:
                    cur.execute(r"SELECT slot_name FROM pg_replication_slots WHERE slot_name LIKE 'pgrepl\_bench\_%' "
                                "AND active")
                    row = cur.fetchone()
            finally:
                conn.close()
            active = row[0] if row else None
            time.sleep(0.05)
        proc.send_signal(signum)
        status = proc.wait(90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    text = log.read_text()
    assert status == 130, text[-3000:]
    assert "interrupted; everything it created was removed" in text
    assert_nothing_left(pg_dsn, kafka_bootstrap, before, topics_before, procs_before)


def test_drop_leftovers_removes_only_inactive_bench_runs(pg_dsn: str, name_prefix: str, tmp_path: Path) -> None:
    """What a SIGKILLed bench leaves is dropped by --drop-leftovers; other objects are not touched."""
    dead = "pgrepl_bench_d0d0d0_"
    conn = psycopg2.connect(pg_dsn)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(f"CREATE TABLE {dead}c0r0_narrow (id bigint PRIMARY KEY)")
            cur.execute(f"CREATE PUBLICATION {dead}c0r0_pub FOR TABLE {dead}c0r0_narrow")
            cur.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (f"{dead}c0r0_pgrepl",))
            cur.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (f"{name_prefix}slot",))
        log = tmp_path / "drop.log"
        proc = start_bench(["--drop-leftovers", "--dsn", pg_dsn], log)
        assert proc.wait(60) == 0, log.read_text()
        assert f"slot {dead}c0r0_pgrepl" in log.read_text()
        left = bench_objects(pg_dsn)
        assert not any(name.startswith(dead) for names in left.values() for name in names)
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s", (f"{name_prefix}slot",))
            assert cur.fetchone()[0] == 1, "a slot that is not the bench's was dropped"
            cur.execute("SELECT pg_drop_replication_slot(%s)", (f"{name_prefix}slot",))
    finally:
        conn.close()
