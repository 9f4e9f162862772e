# twin-pipeline: `make demo` and `make test` are all a fresh machine needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TWIN := $(VENV)/bin/twin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)
export TWIN_HOME ?= $(CURDIR)/var
DEMO_DIR := $(TWIN_HOME)/landing-demo
PATIENTS ?= 100
SEED ?= 7

.PHONY: demo test lint typecheck ui bench bench-quick install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	@rm -rf $(DEMO_DIR)
	$(TWIN) keys init --if-missing
	$(TWIN) generate --patients $(PATIENTS) --seed $(SEED) --out $(DEMO_DIR)
	$(TWIN) run --landing $(DEMO_DIR) --summary

lint: $(STAMP)
	$(VENV)/bin/ruff check twin_pipeline tests benchmarks
	$(VENV)/bin/ruff format --check twin_pipeline tests benchmarks

typecheck: $(STAMP)
	$(VENV)/bin/mypy twin_pipeline

# two xdist workers, one test file each at a time (module fixtures are built once); TEST_WORKERS=0
# runs the suite in one process
TEST_WORKERS ?= 2
test: $(STAMP) lint typecheck
	$(PY) -m pytest -q $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder)

ui: $(STAMP)
	DAGSTER_HOME=$(TWIN_HOME)/dagster $(VENV)/bin/dagster dev -w workspace.yaml -h 127.0.0.1 -p 3000

# `make bench` = 1k and 10k patients; `make bench QUICK=1` or `make bench-quick` = 1k only.
bench: $(STAMP)
	$(PY) -m benchmarks $(if $(QUICK),--quick) $(BENCH_ARGS)

bench-quick: $(STAMP)
	$(PY) -m benchmarks --quick $(BENCH_ARGS)

clean:
	rm -rf var .pytest_cache .mypy_cache .ruff_cache
