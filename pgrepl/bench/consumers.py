"""Consumer throughput of ``pgrepl-bench --consumer`` over the topic the pgrepl producer filled.

Per repeat, in one process each: the reference consumer (confluent-kafka + ``from_json``),
pgrepl's basic consumer (a handler that only counts), pgrepl's idempotent batch consumer
writing every op's row into a sink table with ``COPY ... FROM STDIN`` inside its sink
transactions, and -- the sink's ceiling -- ``COPY ... FROM STDIN`` of the same rows into the
same table without a consumer: once in one statement, once in transactions of the consumer's
batch size. "% of COPY" is per repeat against the one-statement COPY of that repeat.
"""

from __future__ import annotations

import contextlib
from typing import Any, Dict, List, Optional

from pgrepl.bench.readers import Readers, per_row
from pgrepl.consumer.consumer import DEFAULT_BATCH_SIZE
from pgrepl.postgres.connect import quote_ident

#: (kind, label, writes the sink table)
KINDS = (
    ("raw", "reference: confluent-kafka + ReplicationOp.from_json", False),
    ("basic", "pgrepl basic (start_basic)", False),
    ("idempotent-batch", "pgrepl idempotent batch (start_idempotent_batch) + COPY per batch", True),
    ("copy", "COPY FROM STDIN, one statement (the sink's ceiling)", True),
)
COPY_BATCHED = ("copy-batched", "COPY FROM STDIN, one transaction per {batch:,} rows")
#: Ops per pgrepl consumer batch (handler call and sink transaction), the Consumer's default.
BATCH_SIZE = DEFAULT_BATCH_SIZE
CEILING = "copy"


def _batched(result: Dict[str, Any]) -> Dict[str, Any]:
    """The copy worker's second figure (COPY in batch-size transactions) as a result of its own."""
    out = {key[len("batched_"):]: value for key, value in result.items() if key.startswith("batched_")}
    out.update(ok=True, peak_rss_kb=result["peak_rss_kb"], records=result.get("records"))
    out["cpu_s"] = out.get("cpu_user_s", 0.0) + out.get("cpu_sys_s", 0.0)
    return out


def run_consumers(readers: Readers, case: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Consumer throughput over the topic the last pgrepl producer run filled, and the COPY ceiling."""
    from pgrepl.bench.report import figure_dict
    from pgrepl.bench.workloads import WORKLOADS, sink_table_sql

    args, ui, resources = readers.args, readers.ui, readers.resources
    topic = case.get("consumer_topic")
    base = {"workload": case["workload"], "tx_mode": case["tx_mode"]}
    if not topic:
        return [dict(base, consumer="all", error="the pgrepl producer run failed: no topic to read")]
    rows = case["changes"]
    workload = WORKLOADS[case["workload"]]
    sink = f"{topic}_sink"
    resources.create_table(sink, sink_table_sql(sink, workload))
    state_table = f"{readers.prefix}consumer_state"
    if state_table not in resources.tables:
        resources.tables.append(resources.owned(state_table))
    names = [kind for kind, _, _ in KINDS] + [COPY_BATCHED[0]]
    samples: Dict[str, Dict[str, List[float]]] = {
        k: {"rows_per_s": [], "pct_of_copy": [], "cpu_us_per_row": [], "peak_rss_mb": []} for k in names}
    errors: Dict[str, str] = {}
    runs: Dict[str, List[Dict[str, Any]]] = {k: [] for k in names}
    for rep in range(args.repeat):
        results: Dict[str, Dict[str, Any]] = {}
        for kind, _, writes in KINDS:
            name = f"{topic}_{kind.replace('-', '_')}{rep}"
            extra: Dict[str, Any] = {"topic": topic, "group": name, "state_table": state_table,
                                     "batch_size": BATCH_SIZE}
            if writes:
                extra.update(sink_table=sink, sink_columns=[c for c, _ in workload.columns])
                with resources.conn.cursor() as cur:
                    cur.execute(f"TRUNCATE {quote_ident(resources.owned(sink))}")
            ui.step(f"{case['workload']}/{case['tx_mode']}: consumer {kind}, run {rep + 1}/{args.repeat}", rows)
            proc, events = readers.start_worker(f"consume-{kind}", name, "", {}, None, rows, extra=extra)
            result = readers.finish_worker(proc, events, name)
            ui.done_step()
            if not result.get("ok"):
                errors[kind] = str(result.get("error"))
                readers.failures += 1
                continue
            if kind == "copy":
                results[COPY_BATCHED[0]] = per_row(_batched(result), rows)
            results[kind] = per_row(result, rows)
        ceiling: Optional[float] = (results.get(CEILING) or {}).get("rows_per_s")
        writers = {kind for kind, _, writes in KINDS if writes} | {COPY_BATCHED[0]}
        for kind, result in results.items():
            result["pct_of_copy"] = 100.0 * result["rows_per_s"] / ceiling if ceiling and kind in writers else None
            runs[kind].append({k: v for k, v in result.items() if k != "event" and not k.startswith("batched_")})
            for key, values in samples[kind].items():
                if result.get(key) is not None:
                    values.append(result[key])
    labels = {kind: label for kind, label, _ in KINDS}
    labels[COPY_BATCHED[0]] = COPY_BATCHED[1].format(batch=BATCH_SIZE)
    out: List[Dict[str, Any]] = []
    for kind in names:
        entry: Dict[str, Any] = dict(base, consumer=labels[kind], kind=kind, runs=runs[kind])
        if samples[kind]["rows_per_s"]:
            entry.update({key: figure_dict(values) for key, values in samples[kind].items()})
        else:
            entry["error"] = errors.get(kind if kind != COPY_BATCHED[0] else "copy", "no runs")
        out.append(entry)
    resources.drop_table(sink)
    with contextlib.suppress(Exception):
        resources.delete_topic(topic)
    return out
