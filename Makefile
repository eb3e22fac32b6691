# Every target bootstraps .venv itself on a fresh machine (Python 3.10-3.12 and pip are all it needs),
# and reinstalls only when pyproject.toml changes.
PYTHON ?= python3
ROOT := $(patsubst %/,%,$(dir $(abspath $(lastword $(MAKEFILE_LIST)))))
VENV := $(ROOT)/.venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: train test test-fast lint ui bench compare clean

$(STAMP): $(ROOT)/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e "$(ROOT)[dev]"
	touch $(STAMP)

train: $(STAMP)
	$(BIN)/python $(ROOT)/train.py $(ARGS)

test: $(STAMP)
	cd $(ROOT) && $(BIN)/ruff check .
	cd $(ROOT) && $(BIN)/python -m pytest -ra $(ARGS)

test-fast: $(STAMP)
	cd $(ROOT) && $(BIN)/python -m pytest -ra -m "not slow" $(ARGS)

lint: $(STAMP)
	cd $(ROOT) && $(BIN)/ruff check .

ui: $(STAMP)
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(ROOT)/mlflow.db --default-artifact-root $(ROOT)/mlruns $(ARGS)

bench: $(STAMP)
	$(BIN)/python $(ROOT)/benchmarks/bench.py $(ARGS)

compare: $(STAMP)
	$(BIN)/python $(ROOT)/compare.py $(ARGS)

clean:
	cd $(ROOT) && rm -rf outputs multirun reports .pytest_cache .ruff_cache
