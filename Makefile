# The commands README promises. `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3

.PHONY: demo test test-slow lint bench

demo:            ## set up and serve a demo volume on the local-directory backend
	$(PYTHON) -m pip install -q .
	bash contrib/demo.sh

test:            ## install every test dependency, then run the default suite
	bash tests/install-deps.sh
	$(PYTHON) -m ruff check .
	$(PYTHON) -m pytest -n 2 -q

test-slow:       ## the long tiers: crash campaigns, big workloads
	bash tests/install-deps.sh
	$(PYTHON) -m pytest -q -m slow

lint:
	$(PYTHON) -m ruff check .
