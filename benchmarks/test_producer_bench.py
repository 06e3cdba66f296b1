"""Producer end to end: pgrepl vs pg_recvlogical (the reference client) and the pure-Python baseline.

A thin pytest-benchmark wrapper around ``pgrepl-bench`` (one workload, each reader in its own
process on its own slot over the same changes; see pgrepl/bench.py). Size with
PGREPL_BENCH_ROWS (default 200,000 row changes of the inventory row, transactions of 100).
Figures are reported, not asserted: this machine is shared.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, List

import pytest

from pgrepl.bench.cli import main as bench_main

ROWS = int(os.environ.get("PGREPL_BENCH_ROWS", "200000"))


def run_bench(tmp_path: Path) -> Dict[str, Any]:
    out = tmp_path / "bench.json"
    status = bench_main(["--workload", "inventory", "--tx", "small", "--rows", str(ROWS), "--repeat", "1",
                         "--no-decoder", "--latency-seconds", "0", "--no-progress", "--json", str(out)])
    assert status == 0
    return json.loads(out.read_text())


@pytest.mark.benchmark(group="producer")
def test_producer_against_pg_recvlogical(benchmark: Any, tmp_path: Path, capsys: Any) -> None:
    report = benchmark.pedantic(lambda: run_bench(tmp_path), rounds=1, iterations=1)
    runs: List[Dict[str, Any]] = [r for r in report["cases"][0]["runs"] if r.get("ok")]
    by_reader = {r["reader"]: r for r in runs}
    assert set(by_reader) == {"recvlogical", "pgrepl", "baseline"}
    for reader, run in by_reader.items():
        benchmark.extra_info[f"{reader}_rows_per_s"] = round(run["rows_per_s"])
        benchmark.extra_info[f"{reader}_cpu_us_per_row"] = round(run["cpu_us_per_row"], 2)
        benchmark.extra_info[f"{reader}_peak_rss_mb"] = round(run["peak_rss_mb"], 1)
    with capsys.disabled():
        print(f"\nproducer, {ROWS:,} row changes (inventory, tx of 100): " + "; ".join(
            f"{reader} {run['rows_per_s']:,.0f} rows/s ({run['pct_of_ceiling']:.0f} % of pg_recvlogical), "
            f"{run['cpu_us_per_row']:.1f} us CPU/row, {run['peak_rss_mb']:.0f} MB"
            for reader, run in by_reader.items()))
