# llmcycle: every target installs what it needs (idempotent), on a machine with only Python 3.11, pip and git.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)
export PREFECT_HOME ?= $(CURDIR)/.prefect
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120
export MLFLOW_DISABLE_TELEMETRY = true
export DO_NOT_TRACK = true
export HF_HUB_OFFLINE = 1
export TOKENIZERS_PARALLELISM = false
export GX_ANALYTICS_ENABLED = false

.PHONY: setup run test test-fast serve ui prefect-ui schedule bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# CPU torch first: an open range would pull a multi-GB CUDA build (TRAPS.md).
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

setup: $(STAMP)
	@test -d .dvc || $(BIN)/dvc init -q
	@$(BIN)/dvc config core.analytics false

# The closed loop: lifecycle -> server -> baseline + drifted traffic -> monitor -> drift-triggered retrain -> swap.
# RUN_SET passes extra options, e.g. make run RUN_SET="--set serving.torch_threads=1".
run: setup
	$(BIN)/llmcycle run --loop $(RUN_SET)

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

serve: setup
	$(BIN)/llmcycle serve --generate-key

ui: setup
	$(BIN)/llmcycle ui --host 127.0.0.1 --port 5000

# The Prefect UI on this project's run history (.prefect/), e.g. after `make run`.
prefect-ui: setup
	$(BIN)/prefect server start --host 127.0.0.1 --port 4200

# Monitor on its cron, retrain on drift events, lifecycle on demand (a local Prefect server unless PREFECT_API_URL).
schedule: setup
	$(BIN)/llmcycle schedule

bench: setup
	$(BIN)/python benchmarks/train_bench.py

clean:
	rm -rf data/raw data/processed data/validation data/reports data/scoping data/source data/evaluation \
		params.resolved.yaml checkpoints .prefect
