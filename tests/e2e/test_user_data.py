"""A new user's first try, for real: `llmcycle run --set data.source=dir:<their code>` in a temp git +
DVC project with a tiny config. The run must train on that folder (its document count, its path in
dvc.lock, its data hash on the registered version), and editing one of its files must retrain."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from components import config as cfg
from components import tracking
from tests.corpus_factory import write_corpus_dir
from tests.flows.conftest import init_project

pytestmark = pytest.mark.slow


def _data_run(settings, lifecycle_run_id):
    return next(r for r in tracking.child_runs(settings, lifecycle_run_id) if r.info.run_name == "data")


def _lifecycle_runs(settings):
    import mlflow

    tracking.configure(settings)
    return mlflow.search_runs(filter_string="tags.stage = 'lifecycle'", output_format="list",
                              order_by=["attributes.start_time DESC"])


def _llmcycle_run(root, config: str, overrides: list[str]) -> subprocess.CompletedProcess:
    """The real command in its own process, on the session's Prefect test server and the project's store."""
    import prefect.settings

    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI" and not k.startswith("LLMCYCLE_")}
    env["PREFECT_API_URL"] = prefect.settings.PREFECT_API_URL.value()
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    args = ["llmcycle", "run", "--config", config, *(x for o in overrides for x in ("--set", o))]
    proc = subprocess.run(args, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return proc


def test_run_with_set_data_source_trains_on_that_folder(tiny_root, tmp_path_factory):
    users_code = write_corpus_dir(tmp_path_factory.mktemp("users_code"), n_modules=23, seed=11)
    (tiny_root / ".gitignore").write_text("data/\nmlflow/\ncheckpoints/\n.prefect/\ndvc-remote/\n")
    init_project(tiny_root)
    subprocess.run(["git", "add", "-A"], cwd=tiny_root, check=True)
    subprocess.run(["git", "commit", "-qm", "project"], cwd=tiny_root, check=True)
    config = str(tiny_root / "params.yaml")
    overrides = [f"data.source=dir:{users_code}", "pretrain.max_steps=4", "data.remote=dvc-remote"]

    _llmcycle_run(tiny_root, config, overrides)

    settings = cfg.load(config, overrides)
    data_run = _data_run(settings, _lifecycle_runs(settings)[0].info.run_id)
    assert data_run.data.metrics["ingest.documents"] == 23  # the user's folder, not the configured corpus
    assert data_run.data.params["source"] == f"dir:{users_code}"
    assert f"dir:{users_code}" in (tiny_root / "dvc.lock").read_text()
    assert json.loads((tiny_root / "data" / "source" / "corpus.json").read_text())["files"] == 23
    import mlflow
    client = mlflow.MlflowClient()
    (first,) = client.search_model_versions("name='llmcycle'")
    assert first.tags["data_hash"] == data_run.data.tags["data_hash"] == tracking.data_hash(tiny_root)

    # One edited source file is new data: the next run retrains instead of "up to date".
    mod = users_code / "mod_005.py"
    mod.write_text(mod.read_text() + '\n\ndef halve(x):\n    """Return half of x."""\n    return x / 2\n')
    again = _llmcycle_run(tiny_root, config, overrides)
    assert "up to date" not in again.stdout
    versions = client.search_model_versions("name='llmcycle'")
    assert len(versions) == 2
    newest = max(versions, key=lambda mv: int(mv.version))
    assert newest.tags["data_hash"] != first.tags["data_hash"]
