"""Snapshot throughput of ``pgrepl-bench --snapshot``: pgrepl's snapshot against the server's own export.

Per workload the bench loads ``--rows`` rows into a table of its own (before any slot exists),
then, per repeat and in one process each:

* ``psql -c "COPY (SELECT ...) TO STDOUT"`` to /dev/null: how fast the server exports the table
  (the ceiling; its CPU figure is psql's own);
* a ``confluent-kafka`` produce loop of the same records (pgrepl's encoding of the table's first
  rows, cycled, with the snapshot header) until every one is delivered: what the broker path
  alone takes on this machine;
* pgrepl's producer with ``snapshot="initial_only"`` on a new slot, once per
  ``--snapshot-connections`` value: from ``Producer.start()`` to its return, which is once every
  snapshot record is delivered and the slot confirmed past it.

"% of COPY" is per repeat against that repeat's COPY run.
"""

from __future__ import annotations

import time
from typing import Any, Dict, List, Optional, Tuple, Union

from pgrepl.bench.readers import Readers, per_row, split_password
from pgrepl.bench.workloads import Workload, create_table_sql, insert_sql
from pgrepl.postgres.connect import quote_ident

#: Rows per INSERT while loading the table.
LOAD_CHUNK = 200_000
#: ``--snapshot-connections`` without a value.
DEFAULT_CONNECTIONS = (1, 4)
#: Distinct records the produce-loop reference encodes (then cycles through).
KAFKA_SAMPLE_ROWS = 100_000


def reader_label(kind: str, connections: Optional[int] = None) -> str:
    """The table's name for a run kind."""
    if kind == "copy":
        return "COPY TO STDOUT via psql (ceiling)"
    if kind == "kafka":
        return "confluent-kafka produce loop, same records"
    return f"pgrepl snapshot, {connections} connection{'s' if connections != 1 else ''}"


def load_table(readers: Readers, table: str, workload: Workload, rows: int) -> None:
    """Create and fill the table (VACUUM ANALYZE: row estimate for the key ranges, visibility map)."""
    resources = readers.resources
    resources.create_table(table, create_table_sql(table, workload.columns, workload.external_columns))
    with resources.conn.cursor() as cur:
        for start in range(1, rows + 1, LOAD_CHUNK):
            cur.execute(insert_sql(workload, table), (start, min(rows, start + LOAD_CHUNK - 1)))
            readers.ui.add_rows(min(LOAD_CHUNK, rows - start + 1))
        cur.execute(f"VACUUM ANALYZE {quote_ident(table)}")


def run_copy(readers: Readers, table: str, workload: Workload, rows: int, log_name: str) -> Dict[str, Any]:
    """``COPY (SELECT cols FROM table) TO STDOUT`` through psql into /dev/null: wall clock, psql's rusage."""
    assert readers.psql is not None
    dsn, _ = split_password(readers.dsn)
    columns = ", ".join(quote_ident(name) for name, _ in workload.columns)
    result = readers.run_program("copy", [readers.psql, "-X", "-q", "-d", dsn, "-v", "ON_ERROR_STOP=1", "-c",
                                          f"COPY (SELECT {columns} FROM {quote_ident(table)}) TO STDOUT"], log_name)
    result["records"] = rows if result["ok"] else None
    return per_row(result, rows)


def run_snapshots(readers: Readers, case_no: int, workload: Workload) -> Dict[str, Any]:
    """One workload: load the table, then per repeat COPY, the produce loop and pgrepl per connection count."""
    args, ui, resources = readers.args, readers.ui, readers.resources
    rows = args.rows
    tag = f"{readers.prefix}s{case_no}"
    table, publication = f"{tag}_{workload.name}", f"{tag}_pub"
    ui.step(f"{workload.name}: loading {rows:,} rows for the snapshot", rows)
    load_table(readers, table, workload, rows)
    resources.create_publication(publication, [table])
    ui.done_step()
    kinds: List[Any] = [("copy", None), ("kafka", None)] + [("pgrepl", n) for n in args.snapshot_connections]
    runs: List[Dict[str, Any]] = []
    for rep in range(args.repeat):
        for kind, connections in kinds:
            name = f"{tag}r{rep}_{kind}{connections or ''}"
            ui.step(f"{workload.name} snapshot run {rep + 1}/{args.repeat}: {reader_label(kind, connections)}",
                    None if kind == "copy" else rows)
            if kind == "copy":
                result = run_copy(readers, table, workload, rows, name)
            else:
                resources.create_topic(name, args.partitions)
                topic_map = {table: {"name": name, "partition_key": list(workload.partition_key)}}
                extra: Dict[str, Any] = {"snapshot_connections": connections, "sample_rows": KAFKA_SAMPLE_ROWS}
                if args.snapshot_chunk_size:
                    extra["snapshot_chunk_size"] = args.snapshot_chunk_size
                resources.slots.append(resources.owned(name))  # pgrepl creates it (the initial snapshot needs that)
                proc, events = readers.start_worker(f"snapshot-{kind}", name, publication, topic_map, None, rows,
                                                    extra=extra)
                result = per_row(readers.finish_worker(proc, events, name), rows)
                resources.drop_slot(name)
                resources.delete_topic(name)
            result.update(kind=kind, connections=connections, repeat=rep, reader=reader_label(kind, connections))
            if not result.get("ok"):
                readers.failed(f"[{workload.name} snapshot] {result['reader']} run {rep + 1} failed: "
                               f"{result.get('error')}")
            runs.append(result)
            ui.done_step()
    resources.drop_publication(publication)
    resources.drop_table(table)
    return {"workload": workload.name, "description": workload.description, "rows": rows,
            "chunk_size": args.snapshot_chunk_size, "runs": runs, "summary": summarize(runs)}


def summarize(runs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Per run kind (in table order): figures over the repeats, % of that repeat's COPY."""
    from pgrepl.bench.report import figure_dict

    ceiling = {r["repeat"]: r["rows_per_s"] for r in runs if r["kind"] == "copy" and r.get("ok")}
    for run in runs:
        base = ceiling.get(run["repeat"])
        run["pct_of_copy"] = 100.0 * run["rows_per_s"] / base if base and run.get("ok") else None
    out: List[Dict[str, Any]] = []
    for label in dict.fromkeys(r["reader"] for r in runs):
        mine = [r for r in runs if r["reader"] == label]
        ok = [r for r in mine if r.get("ok")]
        entry: Dict[str, Any] = {"reader": label, "kind": mine[0]["kind"], "connections": mine[0]["connections"],
                                 "runs": len(ok), "failed": len(mine) - len(ok)}
        for metric in ("rows_per_s", "pct_of_copy", "cpu_us_per_row", "peak_rss_mb", "wall_s", "startup_s"):
            entry[metric] = figure_dict([r[metric] for r in ok if r.get(metric) is not None])
        if len(ok) < len(mine):
            entry["errors"] = sorted({str(r.get("error")) for r in mine if not r.get("ok")})
        out.append(entry)
    return out


# -- the workers' side (python -m pgrepl.bench.worker) -------------------------------------------


def worker_pgrepl(spec: Dict[str, Any], emit: Any, cpu: Any) -> Dict[str, Any]:
    """pgrepl's producer with ``snapshot="initial_only"``: timed from ``start()`` to its return."""
    import threading

    from pgrepl.producer import Producer

    options: Dict[str, Any] = {"snapshot_connections": int(spec["snapshot_connections"])}
    if spec.get("snapshot_chunk_size"):
        options["snapshot_chunk_size"] = int(spec["snapshot_chunk_size"])
    producer = Producer(spec["dsn"], spec["brokers"], spec["slot"], spec["publication"], spec["topic_map"],
                        snapshot="initial_only", status_interval=3600.0, handle_signals=True, **options)
    marks: Dict[str, Any] = {}
    done = threading.Event()

    def progress() -> None:
        deadline = time.perf_counter() + float(spec.get("timeout", 3600.0))
        while not done.wait(0.25):
            if "first" not in marks and producer.snapshots.rows:
                marks["first"] = time.perf_counter()
            emit(event="progress", records=producer.stats.records)
            if time.perf_counter() > deadline:
                marks["timed_out"] = True
                producer.stop()

    threading.Thread(target=progress, name="bench-progress", daemon=True).start()
    started, cpu0 = time.perf_counter(), cpu()
    try:
        producer.start()
    finally:
        done.set()
    wall, cpu1 = time.perf_counter() - started, cpu()
    expected = int(spec["expected"])
    result: Dict[str, Any] = {"wall_s": wall, "cpu_user_s": cpu1["user"] - cpu0["user"],
                              "cpu_sys_s": cpu1["sys"] - cpu0["sys"], "records": producer.stats.records,
                              "snapshot_rows": producer.snapshots.rows}
    if "first" in marks:
        result["startup_s"] = marks["first"] - started  # about: sampled every 0.25 s
    if marks.get("timed_out") or producer.snapshots.rows != expected or producer.snapshots.active:
        result.update(ok=False, error=f"snapshot delivered {producer.snapshots.rows} of {expected} rows")
    else:
        result["ok"] = True
    return result


def worker_kafka(spec: Dict[str, Any], emit: Any, cpu: Any) -> Dict[str, Any]:
    """The broker path alone: ``expected`` records (pgrepl's encoding of the table's first rows, cycled,
    the snapshot header on each) produced with confluent-kafka under pgrepl's producer settings,
    markers as pgrepl does them, until every one is delivered (``flush``)."""
    from confluent_kafka import Producer as KafkaProducer

    from pgrepl._core import Decoder, copy_out, encode_copy_rows
    from pgrepl.postgres.connect import connect
    from pgrepl.producer.output import producer_settings
    from pgrepl.producer.snapshot.coordinator import HEADER

    (table, info), = spec["topic_map"].items()
    expected, sample = int(spec["expected"]), int(spec.get("sample_rows", KAFKA_SAMPLE_ROWS))
    conn = connect(spec["dsn"], application_name="pgrepl-bench-kafka")
    blocks: List[bytes] = []
    with conn.cursor() as cur:
        cur.execute("SELECT a.attname FROM pg_attribute a WHERE a.attrelid = %s::regclass AND a.attnum > 0 "
                    "AND NOT a.attisdropped ORDER BY a.attnum", (table,))
        columns = [r[0] for r in cur.fetchall()]
        cur.execute("SELECT current_schema()")
        schema = str((cur.fetchone() or ("public",))[0])
    copy_out(conn, f"COPY (SELECT * FROM {quote_ident(table)} ORDER BY 1 LIMIT {min(sample, expected)}) "
                   "TO STDOUT".encode(), lambda block, _rows: blocks.append(block))
    conn.close()
    client = KafkaProducer(producer_settings({}, spec["brokers"]))
    metadata = client.list_topics(info["name"], timeout=30)
    encoder = Decoder(spec["topic_map"])
    encoder.set_partition_count(info["name"], len(metadata.topics[info["name"]].partitions))
    encoder.define_relation(1, schema, table, columns)
    batches = [encode_copy_rows(encoder, 1, block, 1 << 32, 0) for block in blocks]
    headers: List[Tuple[str, Union[str, bytes, None]]] = [(HEADER, b"bench")]
    delivered = {"count": 0}

    def on_delivery(err: Any, msg: Any) -> None:
        if err is None:
            delivered["count"] += 1

    started, cpu0 = time.perf_counter(), cpu()
    produced = 0
    next_progress = started
    while produced < expected:
        for batch in batches:
            markers = set(batch.markers)
            for i in range(min(len(batch), expected - produced)):
                while True:
                    try:
                        if i in markers:
                            client.produce(batch.topics[i], batch.values[i], batch.keys[i], batch.partitions[i],
                                           headers=headers, on_delivery=on_delivery)
                        else:
                            client.produce(batch.topics[i], batch.values[i], batch.keys[i], batch.partitions[i],
                                           headers=headers)
                        break
                    except BufferError:
                        client.poll(0.05)
                produced += 1
            client.poll(0)
            if time.perf_counter() >= next_progress:
                emit(event="progress", records=produced)
                next_progress = time.perf_counter() + 0.25
            if produced >= expected:
                break
    remaining = client.flush(float(spec.get("timeout", 3600.0)))
    wall, cpu1 = time.perf_counter() - started, cpu()
    result = {"wall_s": wall, "cpu_user_s": cpu1["user"] - cpu0["user"], "cpu_sys_s": cpu1["sys"] - cpu0["sys"],
              "records": produced - remaining, "ok": remaining == 0}
    if remaining:
        result["error"] = f"{remaining} records undelivered"
    return result
