"""Commit-to-broker-ack latency of ``pgrepl-bench``: each Kafka reader under a controlled load.

For each rate of ``--latency-rates`` (default: ``--latency-rate``, 200 rows/s), rows are
inserted at that rate for ``--latency-seconds``, in autocommitted transactions due every
``max(1/rate, 5 ms)`` (one row per transaction up to 200 rows/s, ``rate/200`` rows above).
Each row carries the client's clock at its INSERT; the reader records, for every record's
delivery report (the broker's ack), how long ago that was. The achieved rate is reported.
"""

from __future__ import annotations

from typing import Any, Dict, List

from pgrepl.bench.readers import KAFKA_READERS, Readers, lsn_int

_METRICS = ("p50", "p99", "max", "rows", "achieved_rate", "rows_per_tx")


def _figures(readers: Readers, reader: str, rate: float, run: str, table: str, publication: str,
             first_id: int) -> Dict[str, Any]:
    """One reader, one rate, one repeat: the latency samples' figures (or an error) and the rows made."""
    from pgrepl.bench.report import percentile
    from pgrepl.bench.workloads import generate_latency_rows

    args, resources = readers.args, readers.resources
    slot = f"{readers.prefix}lat{run}_{reader}"
    resources.create_slot(slot)
    resources.create_topic(slot, args.partitions)
    topic_map = {table: {"name": slot, "partition_key": ["id"]}}
    proc, events = readers.start_worker(reader, slot, publication, topic_map, None, None, latency=True)
    readers.wait_streaming(proc, slot)
    generated = generate_latency_rows(resources.conn, table, rate, args.latency_seconds, first_id=first_id)
    readers.tell_worker(proc, {"target_lsn": lsn_int(generated.target_lsn), "expected": generated.changes})
    result = readers.finish_worker(proc, events, slot)
    resources.drop_slot(slot)
    resources.delete_topic(slot)
    samples = [s * 1000.0 for s in result.get("latencies_s") or []]
    out: Dict[str, Any] = {"made": generated.changes}
    if not result.get("ok") or not samples:
        out["error"] = str(result.get("error") or "no delivery reports")
        return out
    achieved = generated.changes / generated.seconds if generated.seconds else None
    out.update(p50=percentile(samples, 0.50) or 0.0, p99=percentile(samples, 0.99) or 0.0, max=max(samples),
               rows=float(len(samples)), achieved_rate=achieved,
               rows_per_tx=generated.changes / max(1, generated.transactions))
    return out


def run_latency(readers: Readers) -> List[Dict[str, Any]]:
    """Per rate: commit-to-ack latency figures of each Kafka reader, median of the repeats."""
    from pgrepl.bench.report import figure_dict
    from pgrepl.bench.workloads import LATENCY_COLUMNS, LATENCY_TICK_S, create_table_sql

    args, ui, resources = readers.args, readers.ui, readers.resources
    table = f"{readers.prefix}latency"
    publication = f"{readers.prefix}latency_pub"
    resources.create_table(table, create_table_sql(table, LATENCY_COLUMNS))
    resources.create_publication(publication, [table])
    names = [r for r in args.readers if r in KAFKA_READERS]
    out: List[Dict[str, Any]] = []
    next_id = 1
    for rate_no, rate in enumerate(args.latency_rates):
        per_reader: Dict[str, Dict[str, List[float]]] = {r: {m: [] for m in _METRICS} for r in names}
        errors: Dict[str, str] = {}
        for rep in range(args.repeat):
            for reader in names:
                ui.step(f"latency at {rate:,} rows/s, run {rep + 1}/{args.repeat}: {reader}, "
                        f"{args.latency_seconds:g} s", int(rate * args.latency_seconds))
                figures = _figures(readers, reader, rate, f"{rate_no}r{rep}", table, publication, next_id)
                next_id += figures.pop("made")
                ui.done_step()
                if "error" in figures:
                    errors[reader] = figures["error"]
                    readers.failed(f"[latency {rate:,} rows/s] {reader} run {rep + 1} failed: {figures['error']}")
                    continue
                for metric in _METRICS:
                    if figures.get(metric) is not None:
                        per_reader[reader][metric].append(figures[metric])
        entry: Dict[str, Any] = {"rate": float(rate), "seconds": args.latency_seconds,
                                 "tx_interval_ms": 1000.0 * max(1.0 / rate, LATENCY_TICK_S), "readers": {}}
        for reader in names:
            values = per_reader[reader]
            if not values["p50"]:
                entry["readers"][reader] = {"error": errors.get(reader, "no runs")}
                continue
            entry["readers"][reader] = {"rows": int(sum(values["rows"]) / len(values["rows"])),
                                        "achieved_rate": figure_dict(values["achieved_rate"]),
                                        "rows_per_tx": figure_dict(values["rows_per_tx"]),
                                        **{f"{m}_ms": figure_dict(values[m]) for m in ("p50", "p99", "max")}}
        out.append(entry)
    resources.drop_publication(publication)
    resources.drop_table(table)
    return out
