"""The exporter's periodic work, on its own thread and connections (never in the stream loop).

``BrokerProbe`` asks the brokers for metadata; ``SlotWatch`` reads the slot's facts from
``pg_replication_slots`` on its own PostgreSQL connection and warns when the slot retains too
much WAL or is close to losing it; ``Ticker`` runs a function every few seconds until stopped.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional

import psycopg2
import psycopg2.extensions

from pgrepl import kafka_settings
from pgrepl.errors import PgreplError, first_line
from pgrepl.postgres.connect import close_quietly, connect
from pgrepl.postgres.slot import SlotInfo, get_slot, slot_usage, wal_position

log = logging.getLogger("pgrepl.metrics")

#: Seconds between repeats of a WAL retention warning that persists.
WARN_EVERY = 300.0


class Ticker:
    """Calls ``tick()`` now and then every ``interval`` seconds on a daemon thread until ``stop()``."""

    def __init__(self, tick: Callable[[], None], interval: float, name: str) -> None:
        self._tick = tick
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._tick()
            except Exception:  # the exporter must never take the producer or consumer down
                log.exception("metrics exporter tick failed")
            self._stop.wait(self._interval)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(15)


class BrokerProbe:
    """Whether the brokers answer a metadata request within ``timeout`` (a stopped broker does not)."""

    def __init__(self, brokers: str, kafka_config: Mapping[str, Any], timeout: float = 5.0) -> None:
        self.settings: Dict[str, Any] = {**kafka_settings.connection_settings(kafka_config),
                                         "bootstrap.servers": brokers,
                                         "logger": logging.getLogger("pgrepl.kafka.probe")}
        self.timeout = timeout
        self._admin: Any = None
        self.reachable: Optional[bool] = None  # None: not probed yet
        self.reason = "not probed yet"

    def probe(self) -> bool:
        from confluent_kafka import KafkaException
        from confluent_kafka.admin import AdminClient

        try:
            if self._admin is None:
                self._admin = AdminClient(self.settings)
            self._admin.list_topics(timeout=self.timeout)
        except KafkaException as exc:
            self.reachable, self.reason = False, f"Kafka not answering: {kafka_settings.kafka_error_text(exc)}"
            return False
        self.reachable, self.reason = True, "Kafka answers"
        return True


@dataclass
class SlotFacts:
    """One reading of the slot: ``slot`` None when it does not exist (or could not be read: ``error``)."""

    slot: Optional[SlotInfo] = None
    position: int = 0             # the server's WAL position (replayed position on a standby)
    standby: bool = False
    retained_bytes: Optional[int] = None
    lag_bytes: Optional[int] = None
    error: Optional[str] = None
    at: float = 0.0               # time.monotonic() of the reading


class SlotWatch:
    """Reads one slot's facts on its own connection; logs a warning when WAL retention crosses a threshold.

    ``wal_warning_bytes``: retained WAL (from the slot's ``restart_lsn``) above this warns;
    ``safe_wal_warning_bytes``: ``safe_wal_size`` (what may still be written before the slot is
    lost, with ``max_slot_wal_keep_size`` set) below this warns. ``warning`` holds the current verdict.
    """

    def __init__(self, dsn: str, slot: str, *, wal_warning_bytes: int, safe_wal_warning_bytes: int,
                 application_name: str = "pgrepl/metrics") -> None:
        self.dsn = dsn
        self.slot = slot
        self.wal_warning_bytes = wal_warning_bytes
        self.safe_wal_warning_bytes = safe_wal_warning_bytes
        self.application_name = application_name
        self.facts = SlotFacts()
        self.errors = 0
        self.warning: Optional[str] = None
        self._kind: Optional[str] = None
        self._warned_at = 0.0
        self._conn: Optional[psycopg2.extensions.connection] = None

    def read(self) -> SlotFacts:
        """Query the slot now (reconnecting if needed); keeps and returns the reading."""
        try:
            if self._conn is None or self._conn.closed:
                self._conn = connect(self.dsn, application_name=self.application_name)
            position, standby = wal_position(self._conn)
            info = get_slot(self._conn, self.slot)
            retained, lag = slot_usage(info, position) if info is not None else (None, None)
            facts = SlotFacts(info, position, standby, retained, lag, None, time.monotonic())
        except (psycopg2.Error, PgreplError, LookupError) as exc:
            self.errors += 1
            self.close()
            facts = SlotFacts(error=f"PostgreSQL not answering: {first_line(exc)}", at=time.monotonic())
        self.facts = facts
        self._judge(facts)
        return facts

    def _judge(self, facts: SlotFacts) -> None:
        """Set ``warning``; log it when it appears or changes kind, every ``WARN_EVERY`` s while it lasts,
        and when it clears."""
        warning, kind = None, None
        info = facts.slot
        if facts.retained_bytes is not None and facts.retained_bytes > self.wal_warning_bytes:
            kind = "retained"
            warning = (f"replication slot {self.slot} retains {facts.retained_bytes} bytes of WAL "
                       f"(over wal_warning_bytes {self.wal_warning_bytes}); is the producer streaming?")
        elif info is not None and info.safe_wal_size is not None and info.safe_wal_size < self.safe_wal_warning_bytes:
            kind = "safe_wal_size"
            warning = (f"replication slot {self.slot} is {info.safe_wal_size} bytes of WAL away from being "
                       f"invalidated (safe_wal_size, under safe_wal_warning_bytes {self.safe_wal_warning_bytes}; "
                       f"wal_status {info.wal_status}); raise max_slot_wal_keep_size or let the producer catch up")
        now = time.monotonic()
        if warning is not None and (kind != self._kind or now - self._warned_at >= WARN_EVERY):
            log.warning("%s", warning)
            self._warned_at = now
        elif warning is None and self.warning is not None:
            log.info("replication slot %s: WAL retention back under the warning thresholds", self.slot)
        self.warning, self._kind = warning, kind

    def close(self) -> None:
        """Close the watch's connection (the next ``read`` opens a new one)."""
        conn, self._conn = self._conn, None
        close_quietly(conn)
