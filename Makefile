# One command sets up and runs each job; the venv is created on first use and reused after.
#   make tune   — set up, then `python -m cliptd.tune --task vcr` on the embedded world
#   make test   — set up (venv + Debian chromium for the browser test), then the test suite
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE=1
export TRANSFORMERS_OFFLINE=1
export RAY_USAGE_STATS_ENABLED=0
export MLFLOW_DISABLE_TELEMETRY=true
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false

.PHONY: venv tune test lint bench browser lock

# pyproject.toml holds the dependency ranges, constraints.txt the exact set tested together.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

# The MLflow UI browser test drives Debian's chromium (no browser download from PyPI).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium >/dev/null; \
	  else sudo apt-get update -qq && sudo apt-get install -y -qq chromium >/dev/null; fi; }

tune: $(STAMP)
	$(BIN)/python -m cliptd.tune --task vcr $(ARGS)

test: $(STAMP) browser
	RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=0.2 $(BIN)/python -m pytest -q -p no:cacheprovider --durations=30 $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python -m cliptd.bench step $(ARGS)

# Re-pin constraints.txt to what this venv holds (after changing a range in pyproject.toml
# and installing and testing the new versions).
lock:
	$(BIN)/python .ci/lock.py > constraints.txt.tmp && mv constraints.txt.tmp constraints.txt
