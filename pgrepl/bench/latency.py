"""Commit-to-delivery latency of ``pgrepl-bench``: each Kafka reader on a low-rate workload.

One row per transaction at ``--latency-rate`` rows/s for ``--latency-seconds``; each row
carries the client's clock at commit, and the reader records, per delivery report, how long
ago that was.
"""

from __future__ import annotations

from typing import Any, Dict, List

from pgrepl.bench.readers import KAFKA_READERS, Readers, lsn_int


def run_latency(readers: Readers) -> Dict[str, Any]:
    """Commit-to-delivery latency of each Kafka reader on a low-rate workload."""
    from pgrepl.bench.report import figure_dict, percentile
    from pgrepl.bench.workloads import LATENCY_COLUMNS, create_table_sql, generate_latency_rows

    args, ui, resources = readers.args, readers.ui, readers.resources
    table = f"{readers.prefix}latency"
    publication = f"{readers.prefix}latency_pub"
    resources.create_table(table, create_table_sql(table, LATENCY_COLUMNS))
    resources.create_publication(publication, [table])
    names = [r for r in args.readers if r in KAFKA_READERS]
    per_reader: Dict[str, Dict[str, List[float]]] = {r: {"p50": [], "p99": [], "max": [], "rows": []} for r in names}
    errors: Dict[str, str] = {}
    next_id = 1
    for rep in range(args.repeat):
        for reader in names:
            slot = f"{readers.prefix}lat{rep}_{reader}"
            ui.step(f"latency run {rep + 1}/{args.repeat}: {reader}, {args.latency_rate} rows/s for "
                    f"{args.latency_seconds:g} s", int(args.latency_rate * args.latency_seconds))
            resources.create_slot(slot)
            resources.create_topic(slot, args.partitions)
            topic_map = {table: {"name": slot, "partition_key": ["id"]}}
            proc, events = readers.start_worker(reader, slot, publication, topic_map, None, None, latency=True)
            readers.wait_streaming(proc, slot)
            generated = generate_latency_rows(resources.conn, table, args.latency_rate, args.latency_seconds,
                                              first_id=next_id)
            next_id += generated.changes
            readers.tell_worker(proc, {"target_lsn": lsn_int(generated.target_lsn), "expected": generated.changes})
            result = readers.finish_worker(proc, events, slot)
            resources.drop_slot(slot)
            resources.delete_topic(slot)
            ui.done_step()
            samples = [s * 1000.0 for s in result.get("latencies_s") or []]
            if not result.get("ok") or not samples:
                readers.failures += 1
                errors[reader] = str(result.get("error") or "no delivery reports")
                continue
            entry = per_reader[reader]
            entry["p50"].append(percentile(samples, 0.50) or 0.0)
            entry["p99"].append(percentile(samples, 0.99) or 0.0)
            entry["max"].append(max(samples))
            entry["rows"].append(float(len(samples)))
    resources.drop_publication(publication)
    resources.drop_table(table)
    out: Dict[str, Any] = {"rate": float(args.latency_rate), "seconds": args.latency_seconds, "readers": {}}
    for reader in names:
        entry = per_reader[reader]
        if not entry["p50"]:
            out["readers"][reader] = {"error": errors.get(reader, "no runs")}
            continue
        out["readers"][reader] = {"rows": int(sum(entry["rows"]) / len(entry["rows"])),
                                  "p50_ms": figure_dict(entry["p50"]), "p99_ms": figure_dict(entry["p99"]),
                                  "max_ms": figure_dict(entry["max"])}
    return out
