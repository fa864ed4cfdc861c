# Two commands for a fresh machine: `make demo` and `make test`. Each sets itself up.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck unit screenshot bench bench-workers bench-telemetry bench-hot bench-shadow judge-report clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/canary-proxy demo -c config/demo.yaml

lint: $(STAMP)
	$(BIN)/ruff check proxy tests
	$(BIN)/ruff format --check proxy tests

typecheck: $(STAMP)
	$(BIN)/mypy --strict proxy tests
	MYPYPATH=tests/bench $(BIN)/mypy --strict --explicit-package-bases tests/bench/*.py

# The request path: every branch of these is exercised by a test.
HOT_PATH := proxy/http/forwarding.py,proxy/http/relay.py,proxy/http/tunnel.py,proxy/http/body.py,proxy/http/headers.py,proxy/http/http1.py,proxy/http/pool.py,proxy/http/deadlines.py,proxy/http/inbound.py,proxy/routing/assignment.py,proxy/routing/keys.py

# Branch coverage of the package, its child processes included: at least 90% of it,
# and all of the hot path. Two workers, a test file each at a time: most tests wait on
# sockets and timers, and every test uses its own ports and files.
unit: $(STAMP)
	$(BIN)/pytest -q -n 2 --dist loadfile --cov --cov-report=term --cov-fail-under=90
	$(BIN)/coverage report --include='$(HOT_PATH)' --no-skip-covered --fail-under=100

test: lint typecheck unit

# The status page's picture in README.md, taken by its browser test.
screenshot: $(STAMP)
	UPDATE_SCREENSHOT=1 $(BIN)/pytest -q -p no:xdist --no-cov tests/test_status_page.py

bench: $(STAMP)
	$(BIN)/python tests/bench/run.py

# --workers 2 against --workers 1, and a decision's way to every worker and replica
# (its section of docs/benchmarks.md; `make bench` keeps it).
bench-workers: $(STAMP)
	$(BIN)/python tests/bench/workers.py

# Telemetry off, traces 1% and traces 100% side by side, measured in interleaved short
# runs (its section of docs/benchmarks.md; `make bench` keeps it).
bench-telemetry: $(STAMP)
	$(BIN)/python tests/bench/telemetry_cost.py

# What shadowing 5% of requests costs per request: shadow off, on, and on with pair
# checks, side by side in interleaved short runs (its section of docs/benchmarks.md;
# `make bench` keeps it). Needs wrk.
bench-shadow: $(STAMP)
	$(BIN)/python tests/bench/shadow_cost.py

# The judge against its targets in every simulated scenario, beside Flagger, Kayenta and
# an oracle; writes the tables into docs/rollouts.md. About 10 CPU-minutes per 20 runs
# per cell (RUNS=50 took an hour on 2 busy CPUs): RUNS=N for a quicker, wider look.
RUNS ?= 300
judge-report: $(STAMP)
	$(BIN)/python tests/bench/judge_report.py --runs $(RUNS) --write

# The hot path's four figures beside nginx and the naive aiohttp proxy (its section of
# docs/benchmarks.md; `make bench` keeps it). Needs nginx and wrk (apt-get install nginx wrk);
# BEFORE=<source tree> also measures the code before a change in the same run.
bench-hot: $(STAMP)
	$(BIN)/python tests/bench/hot_path.py $(if $(BEFORE),--before $(BEFORE))

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache *.egg-info
