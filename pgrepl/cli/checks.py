"""The checks behind ``pgrepl check``: each one a ``Result`` with the fix when it fails.

They follow what a producer does when it starts, in order, and each is run only when what
it needs answered (no publication check without a connection). Nothing is created: reads on
PostgreSQL, a metadata request for all topics on Kafka, a read of the slot history topic.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple, TypeVar

import psycopg2
from confluent_kafka import KafkaException

from pgrepl.errors import ConfigError, PgreplError, first_line
from pgrepl.kafka_settings import kafka_error_text
from pgrepl.lsn import format_lsn

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Checks about the publication and the topic map, as ``publication_problems`` names them.
PUBLICATION_CHECKS = ("topic map", "partition key", "replica identity")


@dataclass
class Result:
    """One check: ``status`` ok / fail / warn / skip; ``kind`` of a failure: config (change something) or runtime."""

    name: str
    status: str
    detail: str
    kind: str = ""

    def as_dict(self) -> Dict[str, str]:
        return asdict(self)


class Checkup:
    """Runs every check of a producer config file; ``run()`` returns the results in order."""

    def __init__(self, path: str, kafka_timeout: float = 10.0) -> None:
        self.path = path
        self.kafka_timeout = kafka_timeout
        self.results: List[Result] = []
        self.producer: Any = None
        self.conn: Any = None
        self.client: Any = None
        self.identity: Optional[Tuple[str, str]] = None
        self.slot: Any = None
        self.topics: Optional[Dict[str, int]] = None

    def add(self, name: str, status: str, detail: str, kind: str = "") -> None:
        self.results.append(Result(name, status, detail, kind))

    def attempt(self, name: str, step: Callable[[], T]) -> Optional[T]:
        """Run one check step; its failure becomes a ``fail`` result (None returned)."""
        from pgrepl.producer.output import Retry

        try:
            return step()
        except PgreplError as exc:  # ConfigError, SlotLostError: the user must act
            self.add(name, "fail", str(exc), "config")
        except KafkaException as exc:
            self.add(name, "fail", f"Kafka: {kafka_error_text(exc)}", "runtime")
        except (psycopg2.OperationalError, Retry) as exc:
            self.add(name, "fail", first_line(exc), "runtime")
        except psycopg2.Error as exc:
            self.add(name, "fail", f"PostgreSQL: {first_line(exc)}", "runtime")
        return None

    def run(self) -> List[Result]:
        try:
            if self.attempt("config file", self._config) is None:
                return self.results
            self.attempt("kafka settings", self._kafka_settings)
            if self.attempt("postgres connection", self._connect) is not None:
                self._postgres_checks()
            if self.client is None:
                self.add("kafka", "skip", "not tried: the kafka settings must be fixed first")
            elif self.attempt("kafka", self._kafka) is not None:
                self.attempt("topics", self._topics)
                if self.identity is not None:
                    self.attempt("slot history", self._history)
            self._metrics_port()
        finally:
            if self.conn is not None:
                self.conn.close()
        return self.results

    # -- configuration --------------------------------------------------------------------------

    def _config(self) -> bool:
        from pgrepl.cli.produce import producer_config
        from pgrepl.producer import Producer

        kwargs = producer_config(self.path)
        self.producer = Producer(**kwargs, handle_signals=False)
        p = self.producer
        self.add("config file", "ok", f"slot {p.slot}, publication {p.publication}, {len(p.topic_map)} tables "
                 f"in the topic map, brokers {p.brokers}")
        return True

    def _kafka_settings(self) -> bool:
        from confluent_kafka import Producer as KafkaProducer

        settings = dict(self.producer.kafka_config)
        settings["error_cb"] = lambda err: log.debug("kafka: %s", err)  # reported by the kafka check instead
        settings["log_level"] = 0  # librdkafka's own log lines would interleave with the results
        try:
            self.client = KafkaProducer(settings)
        except KafkaException as exc:
            raise ConfigError(f"librdkafka refuses the kafka settings: {kafka_error_text(exc)}") from None
        self.add("kafka settings", "ok", "librdkafka accepts them")
        return True

    # -- PostgreSQL -------------------------------------------------------------------------------

    def _connect(self) -> bool:
        from pgrepl.postgres.connect import connect, redact_dsn

        self.conn = connect(self.producer.pg_dsn, application_name="pgrepl/check")
        info = self.conn.info
        self.add("postgres connection", "ok", f"{redact_dsn(self.producer.pg_dsn)}: PostgreSQL "
                 f"{info.server_version // 10000}.{info.server_version % 100}, user {info.user}, database {info.dbname}")
        return True

    def _postgres_checks(self) -> None:
        from pgrepl.cli.common import identify
        from pgrepl.postgres import preflight

        self.attempt("server settings", self._server)
        self.attempt("privileges", self._privileges)
        self.identity = self.attempt("replication connection", lambda: self._identify(identify))
        publication = self.attempt("publication", lambda: preflight.load_publication(self.conn, self.producer.publication))
        if publication is not None:
            self.add("publication", "ok", f"{publication.name}: {len(publication.tables)} tables, publishes "
                     f"{', '.join(publication.publishes) or 'nothing'}")
            problems = list(preflight.publication_problems(publication, self.producer.topic_map))
            for name in PUBLICATION_CHECKS:
                found = [text for check, text in problems if check == name]
                for text in found:
                    self.add(name, "fail", text, "config")
                if not found:
                    self.add(name, "ok", "as the producer needs")
        if self.identity is not None:
            self.attempt("slot", self._slot)

    def _server(self) -> None:
        from pgrepl.postgres import preflight
        from pgrepl.postgres.connect import query_one
        from pgrepl.postgres.slot import get_slot

        preflight.check_server(self.conn)
        max_slots, used, max_senders, senders = query_one(
            self.conn, "SELECT current_setting('max_replication_slots')::int, (SELECT count(*) FROM "
            "pg_replication_slots), current_setting('max_wal_senders')::int, (SELECT count(*) FROM pg_stat_replication)")
        if get_slot(self.conn, self.producer.slot) is None and used >= max_slots:
            raise ConfigError(f"all {max_slots} replication slots are in use (max_replication_slots): raise it "
                              "(restart needed) or drop an unused slot (pgrepl status lists them)")
        if senders >= max_senders:
            raise ConfigError(f"all {max_senders} WAL senders are busy (max_wal_senders): raise it (restart needed)")
        self.add("server settings", "ok", f"wal_level logical, UTF8, {used}/{max_slots} slots, "
                 f"{senders}/{max_senders} WAL senders in use")

    def _privileges(self) -> None:
        from pgrepl.postgres.connect import query_one, quote_ident

        user, superuser, replication = query_one(
            self.conn, "SELECT rolname, rolsuper, rolreplication FROM pg_roles WHERE rolname = current_user")
        if not (superuser or replication):
            raise ConfigError(f"role {user} may not stream logical replication; run: ALTER ROLE {quote_ident(user)} "
                              "REPLICATION (as a superuser)")
        self.add("privileges", "ok", f"role {user} has {'SUPERUSER' if superuser else 'REPLICATION'}")

    def _identify(self, identify: Callable[[str], Tuple[str, str]]) -> Tuple[str, str]:
        identity = identify(self.producer.pg_dsn)
        self.add("replication connection", "ok", f"system identifier {identity[0]}, database {identity[1]}")
        return identity

    def _slot(self) -> None:
        from pgrepl.postgres.slot import check_slot, get_slot, slot_usage, wal_position

        assert self.identity is not None
        name = self.producer.slot
        self.slot = info = get_slot(self.conn, name)
        if info is None:
            self.add("slot", "ok", f"{name} does not exist yet: the producer creates it on its first start")
            return
        check_slot(info, self.identity[1])
        position, _ = wal_position(self.conn)
        retained, lag = slot_usage(info, position)
        detail = (f"{name}: confirmed {format_lsn(info.confirmed_flush_lsn or 0)}, retains {retained} bytes of WAL, "
                  f"lag {lag} bytes, wal_status {info.wal_status}, "
                  + (f"streaming to pid {info.active_pid}" if info.active_pid else "idle"))
        risky = info.wal_status == "unreserved" or (retained or 0) > self.producer.wal_warning_bytes
        self.add("slot", "warn" if risky else "ok", detail + ("; the slot is close to losing WAL: start the "
                                                             "producer or raise max_slot_wal_keep_size" if risky else ""))

    # -- Kafka --------------------------------------------------------------------------------------

    def _kafka(self) -> bool:
        metadata = self.client.list_topics(timeout=self.kafka_timeout)  # all topics: never auto-creates one
        self.topics = {name: len(t.partitions) for name, t in metadata.topics.items() if t.error is None}
        self.add("kafka", "ok", f"{self.producer.brokers}: {len(metadata.brokers)} broker(s) answer")
        return True

    def _topics(self) -> None:
        assert self.topics is not None
        for name in sorted({info.name for info in self.producer.topic_map.values()}):
            if name in self.topics:
                self.add("topics", "ok", f"{name}: {self.topics[name]} partitions")
            else:
                self.add("topics", "warn", f"{name} does not exist: the producer's first metadata request creates it "
                         "only where the brokers auto-create topics (auto.create.topics.enable); otherwise create it")

    def _history(self) -> None:
        from pgrepl.postgres.slot import slot_lost_message
        from pgrepl.producer.history import SlotHistory, history_key

        assert self.identity is not None and self.topics is not None
        p = self.producer
        system_identifier, database = self.identity
        history = SlotHistory(None, p.brokers, p.user_kafka_config, p.history_topic)
        record = history.load(history_key(system_identifier, database, p.slot), timeout=self.kafka_timeout * 3)
        if record is None:
            self.add("slot history", "ok", f"no record of {p.slot} on {p.history_topic} yet (written at first start)")
            return
        if self.slot is None and record.confirmed_lsn == 0:
            self.add("slot history", "ok", f"{p.slot} was being created when its producer stopped; "
                     "the next start creates it and runs its snapshot")
            return
        if self.slot is None:
            raise ConfigError(slot_lost_message(p.slot, f"missing on database {database}", record.confirmed_lsn))
        changed = {t: (n, self.topics[t]) for t, n in record.partition_counts.items()
                   if t in self.topics and self.topics[t] != n}
        if changed and not p.allow_repartition:
            what = ", ".join(f"{t}: {old} -> {new}" for t, (old, new) in sorted(changed.items()))
            raise ConfigError(f"partition counts changed since the last run ({what}): records of a key would move; "
                              "start once with allow_repartition=True if that is acceptable")
        self.add("slot history", "ok", f"{p.slot} last confirmed {format_lsn(record.confirmed_lsn)} by producer "
                 f"{record.instance or '?'}; partition counts unchanged")

    def _metrics_port(self) -> None:
        port, host = self.producer.metrics_port, self.producer.metrics_host
        if port is None:
            return
        probe = socket.socket()
        try:
            probe.bind((host, port))
            self.add("metrics port", "ok", f"{host}:{port} is free (prometheus-client installed)")
        except OSError as exc:
            self.add("metrics port", "fail", f"cannot listen on {host}:{port}: {exc.strerror}; choose another "
                     "metrics_port", "config")
        finally:
            probe.close()
