"""The HTTP endpoint: ``/metrics`` (Prometheus text format, by prometheus-client), ``/healthz`` and ``/readyz``."""

from __future__ import annotations

import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Optional, Tuple

from pgrepl.errors import ConfigError

log = logging.getLogger(__name__)

#: Tells whether the process is ready, and why (or why not).
Readiness = Callable[[], Tuple[bool, str]]


class MetricsServer:
    """Serves a registry and the health checks on ``host:port`` from a daemon thread (port 0: any free port)."""

    def __init__(self, registry: Any, ready: Readiness, host: str, port: int) -> None:
        from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

        def metrics() -> Tuple[int, str, bytes]:
            return 200, CONTENT_TYPE_LATEST, generate_latest(registry)

        def readyz() -> Tuple[int, str, bytes]:
            ok, reason = ready()
            return (200 if ok else 503), "text/plain; charset=utf-8", f"{'ready' if ok else 'not ready'}: {reason}\n".encode()

        routes = {
            "/metrics": metrics,
            "/healthz": lambda: (200, "text/plain; charset=utf-8", b"ok\n"),
            "/readyz": readyz,
        }

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                route = routes.get(self.path.split("?", 1)[0])
                status, content_type, body = route() if route else (404, "text/plain", b"not found\n")
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's name)
                log.debug("metrics endpoint: " + format, *args)

        try:
            self._httpd = ThreadingHTTPServer((host, port), Handler)
        except OSError as exc:
            raise ConfigError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}; "
                              "choose another metrics_port") from None
        self._httpd.daemon_threads = True
        self._thread: Optional[threading.Thread] = None

    @property
    def port(self) -> int:
        """The port it listens on (the one chosen when 0 was asked for)."""
        return int(self._httpd.server_address[1])

    def start(self) -> None:
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="pgrepl-metrics-http", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop serving and release the port."""
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(5)
        self._httpd.server_close()
