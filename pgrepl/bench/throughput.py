"""Throughput cases of ``pgrepl-bench``: one workload in one transaction shape, every reader.

The bench creates the table, loads the rows that updates and deletes will hit, creates one
slot per reader and repeat, *then* makes the changes, so every reader streams exactly the
same WAL. The readers of a repeat run one after another, in an order rotated per repeat.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List

from pgrepl.bench.readers import KAFKA_READERS, Readers
from pgrepl.bench.workloads import Workload
from pgrepl.errors import ConfigError

log = logging.getLogger("pgrepl.bench")


def _rounds(readers: Readers, per_round: int) -> List[List[int]]:
    """The repeats that share one generation of the changes (all of them, if the slots allow)."""
    repeat = readers.args.repeat
    free = readers.free_slots()
    if free >= per_round * repeat:
        return [list(range(repeat))]
    if free >= per_round:
        log.warning("only %d free replication slots: making the changes once per repeat instead of once", free)
        return [[r] for r in range(repeat)]
    raise ConfigError(f"the server has {free} free replication slots; pgrepl-bench needs {per_round} "
                      "(raise max_replication_slots)")


def run_case(readers: Readers, case_no: int, workload: Workload, tx_mode: str) -> Dict[str, Any]:
    """One workload in one transaction shape: rounds of (tables, slots, changes, readers)."""
    from pgrepl.bench.report import summarize_case
    from pgrepl.bench.workloads import create_table_sql, generate, preload

    args, ui, resources = readers.args, readers.ui, readers.resources
    names = args.readers
    changes_planned = workload.changes_for(args.rows)
    case: Dict[str, Any] = {"workload": workload.name, "description": workload.description, "tx_mode": tx_mode,
                            "tx_size": args.tx_size if tx_mode == "small" else None, "changes": changes_planned,
                            "runs": [], "generation": []}
    tag = f"{readers.prefix}c{case_no}"
    for round_no, repeats in enumerate(_rounds(readers, len(names))):
        table = f"{tag}r{round_no}_{workload.name}"
        publication = f"{tag}r{round_no}_pub"
        ui.step(f"{workload.name}/{tx_mode}: loading rows for updates and deletes", None)
        resources.create_table(table, create_table_sql(table, workload.columns, workload.external_columns))
        with resources.conn.cursor() as cur:
            preload(cur, workload, table, changes_planned)
        resources.create_publication(publication, [table])
        slots = {(rep, reader): f"{tag}r{rep}_{reader}" for rep in repeats for reader in names}
        for slot in slots.values():
            resources.create_slot(slot)
        ui.done_step()
        ui.step(f"{workload.name}/{tx_mode}: making {changes_planned:,} row changes", changes_planned)
        generated = generate(resources.conn, workload, table, changes_planned, tx_mode, args.tx_size,
                             progress=ui.add_rows)
        ui.done_step()
        case["changes"] = generated.changes
        case["transactions"] = generated.transactions
        case["generation"].append({"seconds": generated.seconds, "target_lsn": generated.target_lsn,
                                   "by_kind": generated.by_kind})
        for rep in repeats:
            order = names[rep % len(names):] + names[:rep % len(names)]
            for reader in order:
                slot = topic = slots[(rep, reader)]
                ui.step(f"{workload.name}/{tx_mode} run {rep + 1}/{args.repeat}: {reader}",
                        None if reader == "recvlogical" else generated.changes)
                result = readers.run_reader(reader, slot, publication, table, workload, generated.target_lsn,
                                            generated.changes, topic)
                result.update(reader=reader, repeat=rep)
                case["runs"].append(result)
                if not result.get("ok"):
                    readers.failed(f"[{workload.name}/{tx_mode}] {reader} run {rep + 1} failed: {result.get('error')}")
                resources.drop_slot(slot)
                keep = (args.consumer and reader == "pgrepl" and rep == args.repeat - 1 and result.get("ok"))
                if reader in KAFKA_READERS and not keep:
                    resources.delete_topic(topic)
                if keep:
                    case["consumer_topic"] = topic
                    case["consumer_table"] = table
                ui.done_step()
        resources.drop_publication(publication)
        resources.drop_table(table)
    for run in case["runs"]:
        run.pop("latencies_s", None)
    case["summary"] = summarize_case(case["runs"], names)
    return case
