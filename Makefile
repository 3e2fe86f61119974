# One command sets up and runs each job; the venv is created on first use and reused after.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE=1
export TRANSFORMERS_OFFLINE=1
export RAY_USAGE_STATS_ENABLED=0
export MLFLOW_DISABLE_TELEMETRY=true

.PHONY: venv tune test lint bench clean-cache

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

tune: $(STAMP)
	$(BIN)/python -m cliptd.tune --task vcr $(ARGS)

test: $(STAMP)
	RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=0.2 $(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python -m cliptd.bench $(ARGS)
