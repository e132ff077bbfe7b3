# The commands README promises. `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3

.PHONY: demo test test-slow lint bench

demo:            ## set up and serve a demo volume on the local-directory backend
	$(PYTHON) -m pip install -q -e .
	bash contrib/demo.sh

test:            ## install every test dependency, then run the default suite
	bash tests/install-deps.sh
	$(PYTHON) -m ruff check .
	$(PYTHON) -m pytest -q -m "not slow"

test-slow:       ## the long tiers: crash campaigns, big workloads
	bash tests/install-deps.sh
	$(PYTHON) -m pytest -q -m slow -s

lint:
	$(PYTHON) -m ruff check .

bench:           ## cloudnbd against the alternatives, costs, slow links: bench/run writes
	bash tests/install-deps.sh    # its tables into docs/performance.md
	PYTHON=$(PYTHON) bench/run
