"""Pretraining on a tiny temp project: data windows, trainer helpers, a real 4-step run logged to MLflow,
resume into the same run (after a short run and after Ctrl-C) matching an uninterrupted run, NaN guard."""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from components import config as cfg
from components import tracking
from components.data import layout
from components.errors import TrainingError
from components.training.data import TokenData, TrainWindows
from components.training.trainer import configure_adamw, cosine_with_warmup, last_checkpoint
from tests.conftest import write_params
from tests.unit.training.helpers import write_tiny_data


def project(root, overrides=()):
    """Tiny params + tokenizer + token arrays at root; returns its Settings."""
    write_params(root)
    settings = cfg.load(root / "params.yaml", list(overrides))
    write_tiny_data(settings)
    return settings


def stage_runs(settings, name="pretrain"):
    import mlflow
    tracking.configure(settings)
    return mlflow.search_runs(experiment_names=[tracking.EXPERIMENT], filter_string=f"tags.stage = '{name}'",
                              output_format="list")


def history(settings, run_id, key):
    import mlflow
    tracking.configure(settings)
    return sorted((m.step, m.value) for m in mlflow.MlflowClient().get_metric_history(run_id, key))


# ----------------------------------------------------------------------------- data
def test_train_batches_are_a_function_of_the_step(tmp_path):
    s = project(tmp_path)
    data = TokenData(s, block_size=64, batch_size=4, seed=7)
    loader = iter(data.train_loader(start_step=0))
    first = [next(loader) for _ in range(3)]
    assert first[0].shape == (4, 65) and first[0].dtype == torch.int64
    resumed = next(iter(data.train_loader(start_step=2)))
    assert torch.equal(resumed, first[2])                  # resume continues exactly
    assert not torch.equal(first[0], first[1])
    other_rank = TrainWindows(layout.tokens_dir(s) / "train.bin", "uint16", 64, 4, seed=7, rank=1).batch_at(0)
    assert not torch.equal(other_rank, first[0])          # each DDP rank draws its own windows
    tokens = np.fromfile(layout.tokens_dir(s) / "train.bin", dtype=np.uint16)
    row = first[0][0].numpy()
    starts = [i for i in range(len(tokens) - 64) if tokens[i] == row[0] and np.array_equal(tokens[i:i + 65], row)]
    assert starts                                           # a real contiguous window of the split


def test_val_windows_are_fixed(tmp_path):
    s = project(tmp_path)
    data = TokenData(s, block_size=64, batch_size=4, seed=7)
    a = [b for b in data.val_loader(2)]
    b = [b for b in data.val_loader(2)]
    assert len(a) == 2 and all(torch.equal(x, y) for x, y in zip(a, b))


def test_too_short_split_names_split_and_sizes(tmp_path):
    s = project(tmp_path)
    np.arange(10, dtype=np.uint16).tofile(layout.tokens_dir(s) / "val.bin")
    with pytest.raises(TrainingError) as err:
        TokenData(s, block_size=64, batch_size=4, seed=0).check()
    msg = str(err.value)
    assert "val" in msg and "10 tokens" in msg and "64" in msg
    (layout.tokens_dir(s) / "train.bin").write_bytes(b"")
    with pytest.raises(TrainingError, match="train split .* 0 tokens"):
        TokenData(s, block_size=64, batch_size=4, seed=0).check()


def test_missing_token_arrays(tmp_path):
    write_params(tmp_path)
    with pytest.raises(TrainingError, match="data datasets"):
        TokenData(cfg.load(tmp_path / "params.yaml"), block_size=64, batch_size=4, seed=0)


# ----------------------------------------------------------------------------- trainer helpers
def test_cosine_with_warmup_values():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = cosine_with_warmup(opt, warmup_steps=2, max_steps=10, min_lr_ratio=0.1)
    factor = sched.lr_lambdas[0]
    assert [factor(0), factor(1), factor(2)] == [0.5, 1.0, 1.0]
    assert math.isclose(factor(6), 0.1 + 0.9 * 0.5)         # half way: cos(pi/2) = 0
    assert math.isclose(factor(10), 0.1) and math.isclose(factor(50), 0.1)


def test_configure_adamw_decays_matrices_only():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 3))
    c = cfg.PretrainConfig(weight_decay=0.1)
    decay, no_decay = configure_adamw(model, c).param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert sorted(p.dim() for p in decay["params"]) == [2, 2]
    assert sorted(p.dim() for p in no_decay["params"]) == [1, 1, 1]   # norm weight, norm bias, linear bias


def test_last_checkpoint_is_the_newest(tmp_path):
    s = project(tmp_path)
    assert last_checkpoint(s, "pretrain") is None
    d = layout.checkpoints_dir(s, "pretrain")
    d.mkdir(parents=True)
    (d / "step-000002.ckpt").write_bytes(b"a")
    (d / "interrupted.ckpt").write_bytes(b"b")
    os.utime(d / "step-000002.ckpt", ns=(1, 1))
    assert last_checkpoint(s, "pretrain").name == "interrupted.ckpt"


# ----------------------------------------------------------------------------- real runs
@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted, seeded 4-step run (checkpoint every 2 steps) shared by the run and resume tests."""
    from components.training import pretrain
    s = project(tmp_path_factory.mktemp("reference"))
    return s, pretrain.run(s)


@pytest.mark.slow
def test_pretrain_run_logs_metrics_model_and_changes_weights(reference):
    from components.model.build import load_causal_lm
    s, out = reference
    assert out["model_uri"] == f"runs:/{out['run_id']}/model" and out["wall_s"] > 0
    m = out["metrics"]
    assert m["steps"] == 4 and math.isclose(m["val_perplexity"], math.exp(m["val_loss"]), rel_tol=1e-5)
    assert math.log(400) * 0.8 < m["val_loss"] < math.log(400) * 1.2 and m["tokens_per_sec"] > 0 and 0 < m["mfu"] < 1

    (run,) = stage_runs(s)
    assert run.info.run_id == out["run_id"] and run.info.status == "FINISHED" and run.info.run_name == "pretrain"
    for key in ("train_loss", "val_loss", "val_perplexity", "lr", "tokens_per_sec", "mfu"):
        assert key in run.data.metrics, key
    assert [step for step, _ in history(s, out["run_id"], "train_loss")] == [0, 1, 2, 3]
    assert run.data.params["pretrain.max_steps"] == "4" and int(run.data.params["n_params"]) == m["n_params"]
    import mlflow
    arts = {a.path for p in ("plots", "samples") for a in mlflow.MlflowClient().list_artifacts(out["run_id"], p)}
    assert {"plots/loss_curve.png", "samples/generations.json"} <= arts

    trained, tok = load_causal_lm(s, out["model_uri"])              # the logged model loads back
    local, _ = load_causal_lm(s, out["hf_dir"])
    torch.manual_seed(s.pretrain.seed)
    init, _ = load_causal_lm(s, "scratch")                          # the same seeded init run() started from
    w = "model.layers.0.mlp.down_proj.weight"
    assert torch.equal(trained.state_dict()[w], local.state_dict()[w])
    assert not torch.allclose(trained.state_dict()[w], init.state_dict()[w])
    assert len(tok) == 400


@pytest.mark.slow
def test_resume_continues_the_same_run_and_matches_uninterrupted(reference, tmp_path):
    from components.training import pretrain
    ref_settings, ref = reference
    first = pretrain.run(project(tmp_path, ["pretrain.max_steps=2"]))
    s = cfg.load(tmp_path / "params.yaml")                          # max_steps back to 4
    resumed = pretrain.run(s, resume=True)
    assert resumed["run_id"] == first["run_id"]
    assert [step for step, _ in history(s, first["run_id"], "train_loss")] == [0, 1, 2, 3]
    assert len(stage_runs(s)) == 1 and stage_runs(s)[0].info.status == "FINISHED"
    assert math.isclose(resumed["metrics"]["train_loss"], ref["metrics"]["train_loss"], rel_tol=1e-4)
    assert math.isclose(resumed["metrics"]["val_loss"], ref["metrics"]["val_loss"], rel_tol=1e-4)


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_resume_finishes_the_run(reference, tmp_path, monkeypatch):
    from components.training import pretrain
    _, ref = reference
    s = project(tmp_path)
    module_cls = pretrain.CausalLMModule
    original = module_cls.training_step

    def interrupt_at_step_3(self, batch, batch_idx):
        if self.trainer.global_step == 3:
            raise KeyboardInterrupt
        return original(self, batch, batch_idx)

    monkeypatch.setattr(module_cls, "training_step", interrupt_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        pretrain.run(s)
    monkeypatch.setattr(module_cls, "training_step", original)
    ckpt = last_checkpoint(s, "pretrain")
    assert ckpt.name == "interrupted.ckpt" and torch.load(ckpt, weights_only=False)["global_step"] == 3
    (run,) = stage_runs(s)
    assert run.info.status == "FAILED"

    resumed = pretrain.run(s, resume=True)
    assert resumed["run_id"] == run.info.run_id and stage_runs(s)[0].info.status == "FINISHED"
    assert [step for step, _ in history(s, run.info.run_id, "train_loss")] == [0, 1, 2, 3]
    ref_settings, _ = reference
    assert history(s, run.info.run_id, "val_loss") == history(ref_settings, ref["run_id"], "val_loss")
    assert math.isclose(resumed["metrics"]["train_loss"], ref["metrics"]["train_loss"], rel_tol=1e-4)


@pytest.mark.slow
def test_nan_loss_stops_with_training_error_and_failed_run(tmp_path):
    from components.training import pretrain
    s = project(tmp_path, ["pretrain.lr=1e30", "pretrain.ckpt_every=1"])
    with pytest.raises(TrainingError) as err:
        pretrain.run(s)
    assert "non-finite loss" in str(err.value) and "at step 2" in str(err.value)
    (run,) = stage_runs(s)
    assert run.info.status == "FAILED"
    last = last_checkpoint(s, "pretrain")                           # the last good state stays on disk
    assert torch.load(last, weights_only=False)["global_step"] == 2
