#!/usr/bin/env python3
"""Check pgrepl's release artifacts the way a user without a C compiler gets them.

Two commands (standard library only, runs on Python 3.9+):

``check [--dist DIR]`` (what ``make wheel-check`` and ``.ci/run`` run, after ``make wheel``)
    1. finds the sdist and the manylinux wheel for this interpreter in DIR (default ``dist``);
    2. checks the wheel holds every file of the source ``pgrepl/`` package (modules, the
       ``_core`` type stubs, ``py.typed``) plus the compiled ``_core.core`` extension, and that
       the sdist holds everything needed to rebuild it (``.pyx``/``.pxi``, ``setup.py``, tests);
    3. creates a fresh virtual environment and, with a PATH that holds only the venv's ``bin``
       and a few symlinked shell tools (no ``gcc``/``cc``/``c++``/``clang``; ``CC``/``CXX`` set to
       ``/bin/false``; pip restricted to binary wheels), installs the wheel, pytest and hypothesis;
    4. runs ``test-installed`` below with that venv's interpreter and the same PATH.

``test-installed PROJECT_DIR`` (cibuildwheel's ``test-command``; also step 4 above)
    Runs against whatever ``pgrepl`` the current interpreter has installed: checks that it is
    imported from site-packages and not from PROJECT_DIR, that ``_core/core.pyi`` and ``py.typed``
    were installed, that ``pgrepl --version``, ``pgrepl.__version__`` and the installed
    distribution's metadata agree, then copies PROJECT_DIR/tests to a temporary directory and
    runs the unit tests there (``pytest tests/unit``), so the source tree is never importable.

That the sdist builds a working wheel from scratch is shown by ``make wheel``: ``python -m
build`` (no --sdist/--wheel flags) builds the sdist first and then the wheel *from the sdist*,
so a file missing from the sdist fails the build or this check.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import textwrap
import venv
import zipfile
from pathlib import Path
from typing import Dict, List, NoReturn, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parent.parent

# Files of the source package that the wheel and the sdist must carry, by suffix / name.
PACKAGE_SUFFIXES = (".py", ".pyi", ".pyx", ".pxi", ".pxd")
PACKAGE_NAMES = ("py.typed",)
# Names that must not resolve on the compiler-free PATH.
COMPILERS = ("gcc", "cc", "c++", "g++", "clang", "clang++", "tcc", "x86_64-linux-gnu-gcc", "aarch64-linux-gnu-gcc")
# The only tools symlinked into the compiler-free PATH (none is needed by pip or pytest; they
# are there so that a subprocess shelling out finds a minimal POSIX userland).
SHELL_TOOLS = ("sh", "env", "cat", "ls", "uname", "true", "false")
TEST_REQUIREMENTS = ("pytest>=7", "hypothesis>=6", "mypy>=1.8", "types-psycopg2")


def fail(message: str) -> NoReturn:
    print(f"check_wheel: FAIL: {message}", file=sys.stderr, flush=True)
    sys.exit(1)


def say(message: str) -> None:
    print(f"check_wheel: {message}", flush=True)


def source_package_files(project: Path) -> List[str]:
    """Paths (relative to the project, posix) of the files the source ``pgrepl/`` ships."""
    pkg = project / "pgrepl"
    if not (pkg / "__init__.py").is_file():
        fail(f"no pgrepl/__init__.py under {project}")
    files = sorted(
        p.relative_to(project).as_posix()
        for p in pkg.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and (p.suffix in PACKAGE_SUFFIXES or p.name in PACKAGE_NAMES)
    )
    for required in ("pgrepl/_core/core.pyx", "pgrepl/_core/core.pxd", "pgrepl/_core/core.pyi", "pgrepl/py.typed",
                     "pgrepl/_version.py"):
        if required not in files:
            fail(f"source tree lacks {required}")
    return files


# --------------------------------------------------------------------------------------------
# check: artifacts in dist/ -> compiler-free venv -> test-installed
# --------------------------------------------------------------------------------------------


def find_artifacts(dist: Path) -> Tuple[Path, Path]:
    sdists = sorted(dist.glob("pgrepl-*.tar.gz"))
    if len(sdists) != 1:
        fail(f"expected exactly one pgrepl sdist in {dist}, found {[p.name for p in sdists]} (run `make wheel`)")
    tag = f"cp{sys.version_info[0]}{sys.version_info[1]}"
    wheels = sorted(dist.glob(f"pgrepl-*-{tag}-{tag}-*.whl"))
    if len(wheels) != 1:
        fail(f"expected exactly one {tag} pgrepl wheel in {dist}, found {[p.name for p in sorted(dist.glob('*.whl'))]}")
    wheel = wheels[0]
    platform_tag = wheel.name[:-4].split("-")[-1]
    if not all(t.startswith(("manylinux", "musllinux")) for t in platform_tag.split(".")):
        fail(f"{wheel.name} is not a repaired manylinux wheel (platform tag {platform_tag!r}); run auditwheel repair")
    return sdists[0], wheel


def check_wheel_contents(wheel: Path, expected: Sequence[str]) -> str:
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        dist_info = sorted({n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info")})
        if len(dist_info) != 1:
            fail(f"{wheel.name}: expected one .dist-info directory, found {dist_info}")
        metadata = zf.read(f"{dist_info[0]}/METADATA").decode("utf-8")
        wheel_meta = zf.read(f"{dist_info[0]}/WHEEL").decode("utf-8")
        entry_points = zf.read(f"{dist_info[0]}/entry_points.txt").decode("utf-8") if f"{dist_info[0]}/entry_points.txt" in names else ""
    missing = [f for f in expected if f not in names]
    if missing:
        fail(f"{wheel.name} is missing {missing}")
    ext = [n for n in names if re.fullmatch(r"pgrepl/_core/core\.(cpython-[^/]+\.so|abi3\.so|[^/]+\.pyd)", n)]
    if not ext:
        fail(f"{wheel.name} has no compiled pgrepl/_core/core extension")
    stray = [n for n in names if n.startswith(("tests/", "pgrepl/tests/")) or n.endswith(".c")]
    if stray:
        fail(f"{wheel.name} carries files it should not: {stray}")
    version = re.search(r"^Version: (\S+)$", metadata, re.M)
    if not version:
        fail(f"{wheel.name}: no Version in METADATA")
    if not re.search(r"^pgrepl\s*=\s*pgrepl\.cli:main\s*$", entry_points, re.M):
        fail(f"{wheel.name}: no `pgrepl = pgrepl.cli:main` console script")
    if "Root-Is-Purelib: false" not in wheel_meta:
        fail(f"{wheel.name}: WHEEL does not say Root-Is-Purelib: false")
    tags = re.findall(r"^Tag: (\S+)$", wheel_meta, re.M)
    if wheel.name.split("-")[1] != version.group(1):
        fail(f"{wheel.name}: file name version differs from METADATA Version {version.group(1)}")
    say(f"wheel {wheel.name}: {len(names)} files, extension {ext[0]}, tags {tags}, all {len(expected)} source package files present")
    return version.group(1)


def check_sdist_contents(sdist: Path, expected_pkg: Sequence[str], version: str) -> None:
    top = f"pgrepl-{version}"
    if sdist.name != f"{top}.tar.gz":
        fail(f"sdist {sdist.name} does not match the wheel's version {version}")
    with tarfile.open(sdist) as tf:
        names = {m.name for m in tf.getmembers()}
    wanted = list(expected_pkg) + [
        "pyproject.toml",
        "setup.py",
        "PKG-INFO",
        "tests/__init__.py",
        "tests/unit/__init__.py",
        "scripts/check_wheel.py",
    ]
    wanted += [p.relative_to(ROOT).as_posix() for p in sorted((ROOT / "tests" / "unit").glob("test_*.py"))]
    if (ROOT / "README.md").is_file():
        wanted.append("README.md")
    missing = [w for w in wanted if f"{top}/{w}" not in names]
    if missing:
        fail(f"sdist {sdist.name} is missing {missing}")
    stray = [n for n in names if n.endswith((".so", ".pyc")) or "/__pycache__" in n]
    if stray:
        fail(f"sdist {sdist.name} carries build leftovers: {stray[:5]}")
    say(f"sdist {sdist.name}: {len(names)} entries, has the .pyx/.pxi sources, stubs, setup.py and the unit tests")


def compiler_free_env(workdir: Path, venv_dir: Path) -> Dict[str, str]:
    """An environment whose PATH is the venv's bin plus a few symlinked tools, and no compiler."""
    tools = workdir / "tools"
    tools.mkdir()
    for name in SHELL_TOOLS:
        found = shutil.which(name)
        if found:
            (tools / name).symlink_to(found)
    path = os.pathsep.join([str(venv_dir / "bin"), str(tools)])
    found = {c: shutil.which(c, path=path) for c in COMPILERS}
    if any(found.values()):
        fail(f"a compiler is reachable on the test PATH: {found}")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "CONDA", "PIP_"))}
    env.update(
        PATH=path,
        VIRTUAL_ENV=str(venv_dir),
        CC="/bin/false",
        CXX="/bin/false",
        LDSHARED="/bin/false",
        PIP_ONLY_BINARY=":all:",  # any dependency that would need compiling fails the install
        PIP_DISABLE_PIP_VERSION_CHECK="1",
        PIP_NO_INPUT="1",
        PYTHONNOUSERSITE="1",
        PGREPL_CHECK_NO_COMPILER="1",
    )
    return env


def cmd_check(args: argparse.Namespace) -> int:
    dist = Path(args.dist).resolve()
    expected_pkg = source_package_files(ROOT)
    sdist, wheel = find_artifacts(dist)
    version = check_wheel_contents(wheel, expected_pkg)
    check_sdist_contents(sdist, expected_pkg, version)

    with tempfile.TemporaryDirectory(prefix="pgrepl-wheel-check-") as tmp:
        work = Path(tmp)
        venv_dir = work / "venv"
        # The venv's base interpreter is the one running this script (a venv created from inside
        # a venv uses the same base Python); its ABI matches the wheel's cpXY tag checked above.
        venv.EnvBuilder(with_pip=True, clear=True, symlinks=(os.name != "nt")).create(venv_dir)
        vpy = venv_dir / "bin" / "python"
        env = compiler_free_env(work, venv_dir)
        say(f"fresh venv {venv_dir}; PATH={env['PATH']}; gcc/cc/c++/clang not resolvable; CC=CXX=/bin/false; pip --only-binary=:all:")
        install = [str(vpy), "-m", "pip", "install", "--quiet", "--only-binary=:all:", str(wheel), *TEST_REQUIREMENTS]
        say("$ " + " ".join(install))
        subprocess.run(install, env=env, cwd=str(work), check=True)
        say(f"installed {wheel.name} and its dependencies from binary wheels only")
        # Run the test-installed step from a copy of this script outside the project, with the
        # venv's interpreter, so nothing of the source tree can leak onto sys.path.
        runner = work / "check_wheel.py"
        shutil.copy2(__file__, runner)
        rc = subprocess.run(
            [str(vpy), str(runner), "test-installed", str(ROOT), "--expect-version", version, "--expect-venv", str(venv_dir)],
            env=env,
            cwd=str(work),
        ).returncode
        if rc != 0:
            fail(f"unit tests against the installed wheel failed (exit {rc})")
    say(f"OK: {wheel.name} installs without a compiler and passes the unit tests; sdist {sdist.name} is complete")
    return 0


# --------------------------------------------------------------------------------------------
# test-installed: run the unit tests against the pgrepl installed in this interpreter
# --------------------------------------------------------------------------------------------

CONFTEST = '''\
"""Written by scripts/check_wheel.py: fails the session unless pgrepl comes from site-packages."""
import os

import pgrepl
import pgrepl._core.core

_EXPECTED = os.environ["PGREPL_CHECK_PKG_DIR"]


def pytest_report_header(config):
    return f"pgrepl under test: {pgrepl.__file__} (compiled core: {pgrepl._core.core.__file__})"


def pytest_sessionstart(session):
    got = os.path.dirname(os.path.realpath(pgrepl.__file__))
    core = os.path.dirname(os.path.dirname(os.path.realpath(pgrepl._core.core.__file__)))
    if got != _EXPECTED or core != _EXPECTED:
        raise RuntimeError(f"pgrepl imported from {got}, expected the installed copy in {_EXPECTED}")
'''


def _is_within(path: Path, parent: Path) -> bool:
    try:
        path.relative_to(parent)
        return True
    except ValueError:
        return False


def cmd_test_installed(args: argparse.Namespace) -> int:
    project = Path(args.project).resolve()
    if not (project / "tests" / "unit").is_dir():
        fail(f"{project}/tests/unit not found")
    if args.expect_venv:
        expect_venv = Path(args.expect_venv).resolve()
        if not _is_within(Path(sys.prefix).resolve(), expect_venv) and Path(sys.prefix).resolve() != expect_venv:
            fail(f"running under {sys.prefix}, expected the venv {expect_venv}")
    if os.environ.get("PGREPL_CHECK_NO_COMPILER") == "1":
        reachable = {c: shutil.which(c) for c in COMPILERS if shutil.which(c)}
        if reachable:
            fail(f"compiler reachable in the test environment: {reachable}")
        cc = (sysconfig.get_config_var("CC") or "").split()
        if cc and shutil.which(cc[0]) and os.environ.get("CC") != "/bin/false":
            fail(f"sysconfig CC {cc[0]} is reachable")
        say(f"no C compiler on PATH ({os.environ.get('PATH')}); CC={os.environ.get('CC')}")

    with tempfile.TemporaryDirectory(prefix="pgrepl-installed-tests-") as tmp:
        work = Path(tmp)
        os.chdir(work)  # neither the project nor this script's directory is on sys.path from here
        unwanted = {project, Path(__file__).resolve().parent}
        sys.path[:] = [p for p in sys.path if p and Path(p).resolve() not in unwanted]
        import importlib
        import importlib.metadata
        import importlib.util

        try:
            pgrepl = importlib.import_module("pgrepl")
            decode = importlib.import_module("pgrepl._core.core")
        except ImportError as exc:
            fail(f"cannot import the installed pgrepl / pgrepl._core.core with {sys.executable}: {exc!r}")
        pkg_dir = Path(pgrepl.__file__).resolve().parent
        site_dirs = {Path(sysconfig.get_paths()[k]).resolve() for k in ("purelib", "platlib")}
        if pkg_dir == project / "pgrepl":
            fail(f"pgrepl imported from the source tree {pkg_dir}")
        if pkg_dir.parent not in site_dirs:
            fail(f"pgrepl imported from {pkg_dir}, not from this interpreter's site-packages {sorted(map(str, site_dirs))}")
        if Path(decode.__file__).resolve().parent != pkg_dir / "_core" or Path(decode.__file__).suffix not in (".so", ".pyd"):
            fail(f"pgrepl._core.core is {decode.__file__}, not a compiled module in {pkg_dir / '_core'}")
        say(f"pgrepl.__file__ = {pgrepl.__file__}")
        say(f"pgrepl._core.core.__file__ = {decode.__file__}")
        for name in ("_core/core.pyi", "py.typed"):
            if not (pkg_dir / name).is_file():
                fail(f"installed package lacks {name}")
        installed = {p.relative_to(pkg_dir.parent).as_posix() for p in pkg_dir.rglob("*") if p.is_file()}
        missing = [f for f in source_package_files(project) if f not in installed]
        if missing:
            fail(f"installed package lacks source files {missing}")
        record = importlib.metadata.files("pgrepl") or []
        absent = [str(f) for f in record if not Path(f.locate()).exists()]
        if not record or absent:
            fail(f"installed distribution's RECORD is empty or lists missing files: {absent}")
        say(f"installed package has _core/core.pyi, py.typed and every module of the source package; {len(record)} RECORD entries present")

        meta_version = importlib.metadata.version("pgrepl")
        scripts_dir = Path(sysconfig.get_path("scripts"))
        exe = scripts_dir / ("pgrepl.exe" if os.name == "nt" else "pgrepl")
        if not exe.is_file():
            fail(f"console script {exe} not installed")
        out = subprocess.run([str(exe), "--version"], capture_output=True, text=True, check=True).stdout.strip()
        say(f"`pgrepl --version` -> {out!r}; pgrepl.__version__ = {pgrepl.__version__!r}; metadata version = {meta_version!r}")
        if out != f"pgrepl {meta_version}" or pgrepl.__version__ != meta_version:
            fail("pgrepl --version, pgrepl.__version__ and the wheel metadata disagree")
        if args.expect_version and meta_version != args.expect_version:
            fail(f"installed version {meta_version} is not the wheel's {args.expect_version}")

        # A copy of the tests outside the project: `from tests import pgoutput` resolves to the
        # copy, `import pgrepl` to site-packages (the conftest below asserts it again in pytest).
        shutil.copytree(project / "tests", work / "tests", ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "integration"))
        (work / "conftest.py").write_text(CONFTEST)
        (work / "pytest.ini").write_text("[pytest]\naddopts = -ra -p no:cacheprovider\n")
        env = dict(os.environ, PGREPL_CHECK_PKG_DIR=str(pkg_dir))
        env.pop("PYTHONPATH", None)
        cmd = [sys.executable, "-m", "pytest", "tests/unit", *args.pytest_args]
        say("$ " + " ".join(cmd) + f"   (cwd {work})")
        rc = subprocess.run(cmd, cwd=str(work), env=env).returncode
        if rc != 0:
            return rc
        # The public API as a user's code sees it: the installed stubs and py.typed, mypy --strict.
        typing_dir = project / "tests" / "typing"
        # required in `check`'s own venv; cibuildwheel's test environments may lack mypy
        if typing_dir.is_dir() and (importlib.util.find_spec("mypy") is not None
                                    or os.environ.get("PGREPL_CHECK_NO_COMPILER") == "1"):
            shutil.copy2(typing_dir / "public_api.py", work / "public_api.py")
            cmd = [sys.executable, "-m", "mypy", "--strict", "--no-incremental", "public_api.py"]
            say("$ " + " ".join(cmd) + f"   (cwd {work})")
            rc = subprocess.run(cmd, cwd=str(work), env=env).returncode
        return rc


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=textwrap.dedent(__doc__ or "").split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="check dist/ artifacts in a fresh compiler-free venv")
    check.add_argument("--dist", default=str(ROOT / "dist"), help="directory with the sdist and repaired wheel (default: dist)")
    check.set_defaults(func=cmd_check)
    inst = sub.add_parser("test-installed", help="run the unit tests against the installed pgrepl")
    inst.add_argument("project", help="project directory holding tests/unit")
    inst.add_argument("--expect-version", default=None)
    inst.add_argument("--expect-venv", default=None)
    inst.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    inst.set_defaults(func=cmd_test_installed)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
