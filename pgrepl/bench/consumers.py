"""Consumer throughput of ``pgrepl-bench --consumer`` over the topic the pgrepl producer filled."""

from __future__ import annotations

import contextlib
import importlib.util
from typing import Any, Dict, List

from pgrepl.bench.readers import Readers, per_row


def run_consumers(readers: Readers, case: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Consumer throughput over the topic the last pgrepl producer run filled."""
    from pgrepl.bench.report import figure_dict

    args, ui, resources = readers.args, readers.ui, readers.resources
    topic = case.get("consumer_topic")
    base = {"workload": case["workload"], "tx_mode": case["tx_mode"]}
    if not topic:
        return [dict(base, consumer="all", error="the pgrepl producer run failed: no topic to read")]
    rows = case["changes"]
    kinds = [("raw", "reference: confluent-kafka + ReplicationOp.from_json")]
    out: List[Dict[str, Any]] = []
    if importlib.util.find_spec("pgrepl.consumer") is not None:
        kinds += [("basic", "pgrepl basic (start_basic)"),
                  ("idempotent-batch", "pgrepl idempotent batch (start_idempotent_batch)")]
    else:
        out += [dict(base, consumer=f"pgrepl {k}", error="pgrepl.consumer is not part of this installation")
                for k in ("basic", "idempotent batch")]
    state_table = f"{readers.prefix}consumer_state"
    for kind, label in kinds:
        samples: Dict[str, List[float]] = {"rows_per_s": [], "cpu_us_per_row": [], "peak_rss_mb": []}
        error = None
        for rep in range(args.repeat):
            name = f"{topic}_{kind.replace('-', '_')}{rep}"
            extra: Dict[str, Any] = {"topic": topic, "group": name}
            if kind == "idempotent-batch":
                extra["state_table"] = state_table
                if state_table not in resources.tables:
                    resources.tables.append(resources.owned(state_table))
            ui.step(f"{case['workload']}/{case['tx_mode']}: consumer {kind}, run {rep + 1}/{args.repeat}", rows)
            proc, events = readers.start_worker(f"consume-{kind}", name, "", {}, None, rows, extra=extra)
            result = per_row(readers.finish_worker(proc, events, name), rows)
            ui.done_step()
            if not result.get("ok"):
                error = str(result.get("error"))
                readers.failures += 1
                continue
            for key, values in samples.items():
                values.append(result[key])
        entry: Dict[str, Any] = dict(base, consumer=label)
        if samples["rows_per_s"]:
            entry.update({key: figure_dict(values) for key, values in samples.items()})
        else:
            entry["error"] = error or "no runs"
        out.append(entry)
    with contextlib.suppress(Exception):
        resources.delete_topic(topic)
    return out
