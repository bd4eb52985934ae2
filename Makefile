# fashionkp — run `make help` for the list of targets.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export PYTHONUNBUFFERED := 1
export WANDB_MODE ?= offline
export WANDB_SILENT ?= true

.DEFAULT_GOAL := help
.PHONY: help install test test-slow test-all lint demo bench clean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) ## create .venv and install fashionkp (editable, with dev extras); quick when done
	@echo "fashionkp installed in $(VENV)"

test: $(STAMP) ## the test suite, under 5 minutes on 2 cores (slow tests: make test-all)
	$(PY) -m pytest -q --durations=12

test-slow: $(STAMP) ## only the slow tests: real-data training, the README's training commands
	$(PY) -m pytest -q -m slow --durations=12

test-all: $(STAMP) ## every test, fast and slow
	$(PY) -m pytest -q -m "" --durations=12

lint: $(STAMP) ## ruff check and format check
	$(VENV)/bin/ruff check fashionkp tests benchmarks train.py evaluate.py predict.py
	$(VENV)/bin/ruff format --check fashionkp tests benchmarks train.py evaluate.py predict.py

demo: $(STAMP) ## the whole job on synthetic garments: data, training, NE, submission, drawings (~6 min CPU)
	$(PY) -m fashionkp.demo

bench: $(STAMP) ## all benchmarks, briefly (prints medians and ratios)
	$(PY) benchmarks/bench_decoding.py --quick
	$(PY) benchmarks/bench_data.py --quick
	$(PY) benchmarks/bench_inference.py --quick
	$(PY) benchmarks/bench_two_pass.py --quick
	$(PY) benchmarks/bench_train_step.py --quick

clean: ## remove outputs and caches (keeps .venv)
	rm -rf outputs multirun .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -not -path './$(VENV)/*' -exec rm -rf {} +
