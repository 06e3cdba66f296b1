"""Session header: which PostgreSQL the integration tests run against (the CI log shows it per run)."""

from __future__ import annotations

import os
from typing import List

import pytest


def pytest_report_header(config: pytest.Config) -> List[str]:
    """One line naming the PostgreSQL server binaries ``LocalPostgres`` will use, or the external DSN."""
    if os.environ.get("PGREPL_TEST_PG_DSN"):
        return ["postgresql: external server (PGREPL_TEST_PG_DSN)"]
    from pgrepl.errors import ConfigError
    from pgrepl.testing.pg_binaries import find_pg_install

    try:
        found = find_pg_install()
    except ConfigError as exc:
        return [f"postgresql: none usable ({exc})"]
    return [f"postgresql: {found.version} from {found.source} ({found.bindir})"]
