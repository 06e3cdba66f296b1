# pgrepl developer entry points. `make test` is the one CI runs (via .ci/run).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.pgrepl-installed

.PHONY: test unit integration bench build clean

# Create the virtual environment and install pgrepl (building the Cython extension) with its
# test extra. Re-runs only when the build inputs change.
$(STAMP): pyproject.toml setup.py $(wildcard pgrepl/*.pyx pgrepl/*.pxd pgrepl/*.pxi)
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

bench: $(STAMP)
	$(PY) -m pytest benchmarks --benchmark-only

clean:
	rm -rf build dist *.egg-info pgrepl/*.so pgrepl/_decode.c .pytest_cache .benchmarks

.PHONY: demo
# The README's first command: sandbox PostgreSQL + broker, a producer, changes, ops read back.
demo: $(STAMP)
	$(PY) -m pgrepl.demo
