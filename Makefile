# The commands README promises. `make demo` and `make test` work on a fresh machine, with
# any python3 (PYTHON=/usr/bin/python3 for Debian's own): both install into the project's
# virtual environment .venv (contrib/venv.sh), never into the interpreter itself.
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
# Parallel tests: one pytest-xdist worker per core (this machine and CI have 2).
JOBS ?= $(shell nproc)

.PHONY: demo venv test test-unit test-slow lint bench

venv:
	PYTHON=$(PYTHON) bash contrib/venv.sh $(VENV)

demo: venv       ## set up and serve a demo volume on the local-directory backend
	$(VPY) -m pip install -q .
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash contrib/demo.sh

test:            ## install every test dependency, then run the default suite
	PYTHON=$(PYTHON) bash tests/install-deps.sh
	$(VPY) -m ruff check .
	$(VPY) -m pytest -q -m "not slow" -n $(JOBS)

test-unit:       ## the tests that need no servers or subprocesses (under a minute)
	PYTHON=$(PYTHON) bash tests/install-deps.sh --python-only
	$(VPY) -m pytest -q -m unit -n $(JOBS)

test-slow:       ## the long tiers: crash campaigns, big workloads
	PYTHON=$(PYTHON) bash tests/install-deps.sh
	$(VPY) -m pytest -q -m slow -s

lint: venv
	$(VPY) -m pip install -q ruff
	$(VPY) -m ruff check .

bench:           ## cloudnbd against the alternatives, costs, slow links: bench/run writes
	PYTHON=$(PYTHON) bash tests/install-deps.sh    # its tables into docs/performance.md
	PYTHON=$(CURDIR)/$(VPY) bench/run
