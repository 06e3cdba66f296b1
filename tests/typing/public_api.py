"""Type-checked, never run: the public API as a user writes it (``mypy --strict`` must pass).

``make typecheck`` checks it against the source tree and ``scripts/check_wheel.py`` against the
installed wheel's stubs and ``py.typed``; ``assert_type`` fails the check if a public name
degrades to ``Any``.
"""

from __future__ import annotations

import asyncio
from typing import Any, Dict, List, Optional, Tuple

from typing_extensions import assert_type

import pgrepl
from pgrepl import (
    ConfigError,
    Consumer,
    ConsumerError,
    ConsumerStats,
    DecodeError,
    DeliveryError,
    HandlerError,
    MalformedRecordError,
    Op,
    PgreplError,
    Producer,
    ProducerStats,
    ReplicationError,
    ReplicationOp,
    TopicInfo,
)


def produce() -> None:
    topic_map = {"inventory": TopicInfo(name="inventory_topic", partition_key=("organization_id",))}
    producer = Producer("postgresql://u@localhost/db", "localhost:9092", "slot_1", "publication_1", topic_map,
                        kafka_config={"linger.ms": 5}, metrics_port=0, metrics_host="127.0.0.1",
                        wal_warning_bytes=1 << 30, safe_wal_warning_bytes=512 << 20)
    assert_type(producer.stats, ProducerStats)
    assert_type(producer.stats.reconnects, int)
    if producer.metrics is not None:
        assert_type(producer.metrics.port, int)
    assert_type(producer.stats.confirmed_lsn, int)
    try:
        producer.start()
    except DeliveryError as exc:
        assert_type(str(exc), str)
    except (ConfigError, ReplicationError, DecodeError) as exc:
        assert isinstance(exc, PgreplError)
    producer.stop()
    asyncio.run(producer.run())


def handle(op: ReplicationOp) -> None:
    assert_type(op.lsn, int)
    assert_type(op.position, Tuple[int, int])
    assert_type(op.op, Op)
    assert_type(op.op.new, Optional[Tuple[Optional[str], ...]])
    assert_type(op.row_dict(), dict[str, Optional[str]])
    assert_type(op.to_json(), bytes)


def apply(cursor: Any, ops: List[ReplicationOp]) -> None:
    for op in ops:
        cursor.execute("SELECT %s", (op.lsn,))


def consume() -> None:
    consumer = Consumer("group", ["inventory_topic"], "localhost:9092", on_error="dead_letter",
                        dead_letter_topic="dlq", metrics_port=9188)
    assert_type(consumer.stats, ConsumerStats)
    assert_type(consumer.stats.lag, Dict[Tuple[str, int], int])
    try:
        consumer.start_basic(handle)
    except HandlerError as exc:
        assert_type(exc.offset, int)
    except ConsumerError:
        pass
    consumer.start_idempotent_batch(apply, "postgresql://u@localhost/sink")


def records() -> None:
    op = ReplicationOp.from_json(b'{"table_name":"t","col_names":["a"],"lsn":1,"seq_id":0,"op":{"Insert":["x"]}}')
    assert_type(op, ReplicationOp)
    same = ReplicationOp("t", ["a"], 1, 0, Op.insert(["x"]))
    assert same == op
    try:
        ReplicationOp.from_json(None)
    except MalformedRecordError:
        pass
    assert_type(pgrepl.__version__, str)
