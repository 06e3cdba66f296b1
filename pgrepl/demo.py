"""A two-minute tour: sandbox PostgreSQL + broker, a producer, row changes, ReplicationOps read back.

Run ``make demo`` or ``python -m pgrepl.demo``. Everything it starts is throwaway and stopped
at the end (needs the ``test`` extra: the broker, and PostgreSQL 18 binaries when the machine has no server).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import List, Optional, Tuple

import psycopg2
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from pgrepl.errors import ConfigError
from pgrepl.model import ReplicationOp
from pgrepl.producer import Producer
from pgrepl.testing import LocalBroker, LocalPostgres

TOPIC = "inventory_topic"
STATEMENTS = [
    "CREATE TABLE inventory (id bigint PRIMARY KEY, organization_id text NOT NULL, name text, quantity int)",
    "ALTER TABLE inventory REPLICA IDENTITY FULL",
    "CREATE PUBLICATION publication_1 FOR TABLE inventory",
]
CHANGES = [
    "INSERT INTO inventory VALUES (1, 'org-a', 'widget', 10), (2, 'org-b', 'gadget \"pro\"', 3)",
    "UPDATE inventory SET quantity = quantity - 1 WHERE id = 1",
    "DELETE FROM inventory WHERE id = 2",
]


def read_ops(bootstrap: str, expected: int, timeout: float = 30.0) -> List[Tuple[Optional[int], Optional[bytes], ReplicationOp]]:
    """Read the topic from the beginning until ``expected`` records (or EOF everywhere after timeout)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "pgrepl-demo", "enable.auto.commit": False,
                         "enable.partition.eof": True})
    partitions = consumer.list_topics(TOPIC, timeout=10).topics[TOPIC].partitions
    consumer.assign([TopicPartition(TOPIC, p, OFFSET_BEGINNING) for p in partitions])
    found: List[Tuple[Optional[int], Optional[bytes], ReplicationOp]] = []
    deadline = time.monotonic() + timeout
    while len(found) < expected and time.monotonic() < deadline:
        msg = consumer.poll(0.5)
        if msg is None:
            continue
        error = msg.error()
        if error is not None:
            if error.code() == KafkaError._PARTITION_EOF:
                continue
            raise RuntimeError(str(error))
        found.append((msg.partition(), msg.key(), ReplicationOp.from_json(msg.value())))
    consumer.close()
    return sorted(found, key=lambda item: item[2].position)


def main() -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:  # which binaries: a system server, else the packaged one (pgrepl.testing.pg_binaries)
        pg = LocalPostgres()
    except ConfigError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 2
    print(f"starting a throwaway PostgreSQL {pg.version} ({pg.install.source}; wal_level=logical) "
          "and a Kafka-protocol broker (tansu) ...")
    with pg, LocalBroker() as broker:
        conn = psycopg2.connect(pg.dsn)
        conn.autocommit = True
        with conn.cursor() as cur:
            for statement in STATEMENTS:
                cur.execute(statement)
        topic_map = {"inventory": {"name": TOPIC, "partition_key": ["organization_id"]}}
        producer = Producer(pg.dsn, broker.bootstrap, "slot_1", "publication_1", topic_map, handle_signals=False)
        errors: List[BaseException] = []
        thread = threading.Thread(target=lambda: _run(producer, errors), daemon=True)
        thread.start()
        while not errors and producer.stats.sessions == 0:
            time.sleep(0.1)
        print(f"producer streaming slot_1 -> {broker.bootstrap}\n")
        with conn.cursor() as cur:
            for statement in CHANGES:
                print(f"  postgres> {statement}")
                cur.execute(statement)
        ops = read_ops(broker.bootstrap, expected=4)
        print(f"\nReplicationOps on topic {TOPIC!r} (partition, key, JSON value):")
        for partition, key, op in ops:
            print(f"  [{partition}] {key!r:10} {op.to_json().decode()}")
        producer.stop()
        thread.join(30)
        conn.close()
        if errors:
            raise errors[0]
        print(f"\nstopped cleanly; slot confirmed up to LSN {producer.stats.confirmed_lsn:#x}")
        return 0 if len(ops) == 4 else 1


def _run(producer: Producer, errors: List[BaseException]) -> None:
    try:
        producer.start()
    except BaseException as exc:  # noqa: BLE001 - shown by main
        errors.append(exc)


if __name__ == "__main__":
    sys.exit(main())
