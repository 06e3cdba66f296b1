"""A GET against the metrics endpoint, for the metrics tests (unit and integration)."""

from __future__ import annotations

import urllib.error
import urllib.request
from typing import Tuple


def http_get(port: int, path: str) -> Tuple[int, str]:
    """(status, body) of GET http://127.0.0.1:port/path, error statuses included."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
