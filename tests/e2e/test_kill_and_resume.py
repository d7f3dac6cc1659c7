"""Fault: `llmcycle train pretrain` and `llmcycle train sft` are SIGKILLed after a checkpoint, then rerun with
--resume. The resumed run continues from the checkpoint's step in the same MLflow run, ends FINISHED, and its
final loss equals an uninterrupted run's (batches are a function of the step; optimizer and schedule restored)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from components import config as cfg
from components import tracking
from components.data import layout
from tests.unit.training.helpers import write_tiny_data
from tests.unit.training.test_finetune_stages import make_project

pytestmark = pytest.mark.slow

STEPS, EVERY = 300, 50
SETS = {"pretrain": [f"pretrain.max_steps={STEPS}", f"pretrain.ckpt_every={EVERY}", "pretrain.val_every=100"],
        "sft": [f"sft.max_steps={STEPS}", f"sft.ckpt_every={EVERY}", "sft.val_every=100"]}


def _cmd(root: Path, stage: str, *extra: str) -> list[str]:
    sets = [arg for item in SETS[stage] for arg in ("--set", item)]
    return [sys.executable, "-m", "flows.cli", "train", stage, "--config", str(root / "params.yaml"), *sets, *extra]


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}


def _final_loss(settings: cfg.Settings, run_id: str) -> tuple[float, list[int], str]:
    import mlflow

    tracking.configure(settings)
    client = mlflow.MlflowClient()
    history = client.get_metric_history(run_id, "train_loss")
    last = max(history, key=lambda m: (m.step, m.timestamp))
    return last.value, sorted(m.step for m in history), client.get_run(run_id).info.status


def _kill_after_first_checkpoint(root: Path, stage: str) -> int:
    """Start the stage, SIGKILL it once its first periodic checkpoint is written whole; the step it holds."""
    from components.training.trainer import checkpoint_step

    folder = layout.checkpoints_dir(cfg.load(root / "params.yaml"), stage)
    proc = subprocess.Popen(_cmd(root, stage), cwd=root, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    first = folder / f"step-{EVERY:06d}.ckpt"
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if first.is_file() and first.stat().st_size > 0:
                time.sleep(0.05)                # let the write finish: the next one is EVERY steps away
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.01)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL, f"not killed mid-run: {proc.stderr.read()[-2000:]}"
    assert not (folder / "hf").exists()           # killed before the end: no final model
    return checkpoint_step(folder / "last.ckpt")


@pytest.mark.parametrize("stage", ["pretrain", "sft"])
def test_a_killed_stage_resumes_from_its_checkpoint_to_the_uninterrupted_loss(tiny_root, tmp_path_factory, stage):
    roots = {"whole": tiny_root, "killed": tmp_path_factory.mktemp("killed")}
    roots["killed"].joinpath("params.yaml").write_text(tiny_root.joinpath("params.yaml").read_text())
    for root in roots.values():
        settings = make_project(root)             # tokenizer, pairs and the pretrain stage's HF folder
        write_tiny_data(settings)                 # token arrays for pretraining
    whole = subprocess.run(_cmd(roots["whole"], stage), cwd=roots["whole"], env=_env(), capture_output=True,
                           text=True, timeout=600)
    assert whole.returncode == 0, whole.stderr[-3000:]

    killed_at = _kill_after_first_checkpoint(roots["killed"], stage)
    assert EVERY <= killed_at < STEPS
    resumed = subprocess.run(_cmd(roots["killed"], stage, "--resume"), cwd=roots["killed"], env=_env(),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    ids = {k: (layout.checkpoints_dir(cfg.load(r / "params.yaml"), stage) / "run_id.txt").read_text().strip()
           for k, r in roots.items()}
    want, whole_steps, _ = _final_loss(cfg.load(roots["whole"] / "params.yaml"), ids["whole"])
    got, steps, status = _final_loss(cfg.load(roots["killed"] / "params.yaml"), ids["killed"])
    import mlflow

    runs = mlflow.search_runs(experiment_names=[tracking.EXPERIMENT], output_format="list",
                              filter_string=f"tags.stage = '{stage}'")
    assert [r.info.run_id for r in runs] == [ids["killed"]] and status == "FINISHED"   # one run, finished
    # The resumed run logged on from the checkpoint: every step of the uninterrupted run is there, and the steps
    # between the checkpoint and the kill twice (trained again from the checkpoint's weights), none from 0 again.
    assert set(steps) == set(whole_steps) and steps.count(whole_steps[0]) == 1
    assert got == pytest.approx(want, abs=1e-5)
