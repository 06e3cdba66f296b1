"""Prometheus metrics and Kubernetes health endpoints for the producer and the consumer.

Optional: ``pip install 'pgrepl[metrics]'`` brings ``prometheus-client``; nothing here is
imported unless ``metrics_port`` is given. The parts:

* ``server``     the HTTP endpoint: ``/metrics``, ``/healthz`` (alive), ``/readyz`` (streaming)
* ``latency``    the delivery-latency histogram, counted in the stream thread without a lock
* ``watch``      the exporter's own thread: broker probe, and the slot query on its own connection
* ``exporter``   what both sides share: registry, server, thread, readiness
* ``producer`` / ``consumer``  what each side exports, and when it counts as ready
"""

from __future__ import annotations

from pgrepl.errors import ConfigError

#: The one line a user sees when metrics are asked for without the package.
MISSING = ("metrics_port needs the prometheus-client package, which is not installed: "
           "pip install 'pgrepl[metrics]' (or pip install prometheus-client)")


def require_prometheus() -> None:
    """``ConfigError`` with the install command unless ``prometheus_client`` can be imported."""
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        raise ConfigError(MISSING) from None


def check_port(port: object, host: object) -> None:
    """``metrics_port`` must be a TCP port (0: any free one) and ``metrics_host`` an address."""
    if type(port) is not int or not 0 <= port <= 65535:
        raise ConfigError(f"metrics_port must be a TCP port number (0-65535), got {port!r}")
    if not isinstance(host, str) or not host:
        raise ConfigError(f"metrics_host must be an address to listen on, such as 0.0.0.0, got {host!r}")
    require_prometheus()
