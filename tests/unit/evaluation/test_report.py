"""The completions table reaches MLflow's GenAI evaluation whole: one trace per row, on a SQLite store."""
from __future__ import annotations

import os

from components import config as cfg
from components import tracking
from components.evaluation.report import log_completions


def test_every_completion_gets_its_trace_on_a_sqlite_store(tmp_path):
    import mlflow

    (tmp_path / "params.yaml").write_text("")
    tracking.configure(cfg.load(tmp_path / "params.yaml"))   # the project's store: sqlite + mlflow/artifacts
    rows = [{"prompt": f"def f{i}(x):", "name": f"f{i}", "completion": f"def f{i}(x):\n    return x",
             "syntax_valid": 1, "defines_name": 1} for i in range(32)]
    with mlflow.start_run() as run:
        log_completions(rows)
    # With the harness's default thread pools the SQLite store's connection pool ran dry here:
    # traces were dropped after a 30 s wait ("QueuePool limit ... reached").
    traces = mlflow.search_traces(run_id=run.info.run_id, return_type="list")
    assert len(traces) == 32
    assert "MLFLOW_GENAI_EVAL_MAX_WORKERS" not in os.environ      # the setting is scoped to the call
