"""What the producer's and the consumer's exporters share: registry, HTTP server, ticker, broker probe.

The registry is the exporter's own (not prometheus-client's global one), so several producers
or consumers in one process each serve their own port. Values are read from the running
totals at scrape time (``collect``): counting costs the hot loops nothing.
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, Mapping, Optional, Tuple

from pgrepl.metrics import require_prometheus
from pgrepl.metrics.server import MetricsServer
from pgrepl.metrics.watch import BrokerProbe, Ticker

#: Seconds between the exporter's probes (broker metadata, slot query).
DEFAULT_INTERVAL = 5.0


class Families:
    """Builds metric families with the exporter's constant labels (``slot`` or ``group``)."""

    def __init__(self, labels: Mapping[str, str]) -> None:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        self._counter, self._gauge, self._histogram = CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
        self.names = list(labels)
        self.values = [labels[name] for name in self.names]

    def counter(self, name: str, doc: str, value: float) -> Any:
        family = self._counter(name, doc, labels=self.names)
        family.add_metric(self.values, value)
        return family

    def gauge(self, name: str, doc: str, value: Optional[float]) -> Optional[Any]:
        """A gauge, or None when the value is unknown (no series rather than a made-up number)."""
        if value is None:
            return None
        family = self._gauge(name, doc, labels=self.names)
        family.add_metric(self.values, value)
        return family

    def labelled(self, name: str, doc: str, label: str, values: Mapping[Any, float], kind: str = "gauge") -> Any:
        """One series per entry of ``values``, its key as the value of ``label`` (a tuple: several labels)."""
        extra = label.split(",")
        family = (self._counter if kind == "counter" else self._gauge)(name, doc, labels=self.names + extra)
        for key, value in values.items():
            keys = [str(k) for k in key] if isinstance(key, tuple) else [str(key)]
            family.add_metric(self.values + keys, value)
        return family

    def histogram(self, name: str, doc: str, buckets: Any, total: float) -> Any:
        family = self._histogram(name, doc, labels=self.names)
        family.add_metric(self.values, list(buckets), total)
        return family


class Exporter:
    """Serves ``/metrics``, ``/healthz`` and ``/readyz`` for one producer or consumer.

    Subclasses give ``families()`` (their metrics) and ``readiness()``; ``tick()`` runs every
    ``interval`` seconds on the exporter's thread (the base probes the brokers).
    """

    def __init__(self, *, host: str, port: int, brokers: str, kafka_config: Mapping[str, Any],
                 labels: Dict[str, str], interval: float = DEFAULT_INTERVAL) -> None:
        require_prometheus()
        from prometheus_client import CollectorRegistry

        self.families_of = Families(labels)
        self.probe = BrokerProbe(brokers, kafka_config, timeout=min(interval, 5.0))
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)  # a collector: it has collect()
        self.server = MetricsServer(self.registry, self.ready, host, port)
        self.ticker = Ticker(self.tick, interval, "pgrepl-metrics")

    @property
    def port(self) -> int:
        """The port the endpoint listens on."""
        return self.server.port

    def start(self) -> None:
        self.server.start()
        self.ticker.start()

    def stop(self) -> None:
        self.ticker.stop()
        self.server.close()

    def tick(self) -> None:
        """Periodic work on the exporter's thread."""
        self.probe.probe()

    def ready(self) -> Tuple[bool, str]:
        """Whether the process is ready for traffic (Kubernetes readiness), and why."""
        if self.probe.reachable is False:
            return False, self.probe.reason
        return self.readiness()

    def readiness(self) -> Tuple[bool, str]:
        raise NotImplementedError

    def collect(self) -> Iterator[Any]:
        """prometheus-client's collector protocol: every family, read now."""
        f = self.families_of
        ok, _ = self.ready()
        common = [f.gauge("pgrepl_ready", "1 when /readyz answers 200", 1 if ok else 0)]
        if self.probe.reachable is not None:
            common.append(f.gauge("pgrepl_kafka_reachable", "1 when the brokers answered the last metadata probe",
                                  1 if self.probe.reachable else 0))
        for family in [*common, *self.families()]:
            if family is not None:
                yield family

    def families(self) -> Iterator[Any]:
        raise NotImplementedError
