"""A real 2-process DDP pretrain on CPU (gloo), through the CLI in a tiny temp project.

Lightning starts the second rank by re-running the command line, so the run has to be a subprocess.
Checks: exit 0, one FINISHED `pretrain` run with every step and a logged model in the project's own SQLite
store, and evidence that two ranks trained (Lightning's distributed init lines, one result table per rank).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from components import config as cfg
from components import tracking
from components.data import layout
from tests.conftest import write_params
from tests.unit.training.helpers import write_tiny_data

REPO = Path(__file__).resolve().parents[3]
# Variables that would send the child to another MLflow store or make it believe it is already a DDP rank.
INHERITED = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", tracking.PARENT_ENV, "RANK", "LOCAL_RANK",
             "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "PL_GLOBAL_SEED")


@pytest.mark.slow
# val_every=2: 4 steps end on a validation; 3 end between two, so every rank joins one final validate.
@pytest.mark.parametrize("max_steps", [4, 3])
def test_ddp_pretrain_on_two_cpu_processes(tmp_path, max_steps):
    config = write_params(tmp_path)
    settings = cfg.load(config)
    write_tiny_data(settings)
    env = {k: v for k, v in os.environ.items() if k not in INHERITED}
    # The checkout under test, not whatever the venv's editable install points at; cwd keeps strays out of it.
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    cmd = [sys.executable, "-m", "flows.cli", "train", "pretrain", "--config", str(config),
           "--set", "pretrain.strategy=ddp", "--set", "pretrain.devices=2", "--set", "pretrain.accelerator=cpu",
           "--set", f"pretrain.max_steps={max_steps}"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]

    # Two ranks joined one gloo group, and each process finished its own run() (rank 1 trains only).
    assert "MEMBER: 2/2" in output and "Starting with 2 processes" in output, output[-4000:]
    assert output.count("pretrain done in") == 2, output[-4000:]

    import mlflow
    tracking.configure(settings)
    runs = mlflow.search_runs(experiment_names=[tracking.EXPERIMENT], filter_string="tags.stage = 'pretrain'",
                              output_format="list")
    assert len(runs) == 1                                         # rank 1 opened no run of its own
    assert runs[0].data.tags["world_size"] == "2"
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "pretrain"
    client = mlflow.MlflowClient()
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "train_loss"))
    assert steps == list(range(max_steps))
    assert run.data.params["pretrain.strategy"] == "ddp" and run.data.params["pretrain.devices"] == "2"
    model_files = {Path(a.path).name for a in mlflow.artifacts.list_artifacts(f"runs:/{run.info.run_id}/model")}
    assert "MLmodel" in model_files, model_files

    last = layout.checkpoints_dir(settings, "pretrain") / "last.ckpt"
    # Checkpoints come every ckpt_every=2 steps: the newest is at the last multiple of 2.
    assert torch.load(last, weights_only=False, map_location="cpu")["global_step"] == max_steps - max_steps % 2
