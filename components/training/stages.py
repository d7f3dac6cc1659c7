"""Training-stage dispatch and the plumbing every fine-tuning stage shares.

run_stage(settings, stage) runs one stage by name; finetune(settings) runs sft -> dpo, or
sft -> reward -> ppo, handing each stage's HF folder (checkpoints/<stage>/hf) to the next. The rest
is what sft/reward/dpo/ppo would otherwise copy: default inputs, checkpoint/resume bookkeeping,
the MLflow run that a --resume reopens, the train/val loaders and the fit-validate-collect tail of
run() (fit_stage on rank zero, fit_extra_rank elsewhere). Stage modules are imported on use (they
pull in lightning), and so are lightning and torch here: the CLI imports this module.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

from components import tracking
from components.config import Settings, TrainConfig
from components.data import layout
from components.errors import ConfigError

STAGES = ("pretrain", "sft", "reward", "dpo", "ppo")
# The stage whose HF folder a stage starts from when no init_from is given.
PREVIOUS = {"sft": "pretrain", "reward": "sft", "dpo": "sft", "ppo": "sft"}
RUN_ID_FILE = "run_id.txt"  # same name pretrain uses: one convention for every stage


# ----------------------------------------------------------------------------- dispatch
def run_stage(settings: Settings, stage: str, resume: bool = False, init_from: str | None = None) -> dict:
    """Run one training stage by name; returns its dict(run_id, model_uri, metrics, wall_s, ...)."""
    if stage not in STAGES:
        raise ConfigError(f"unknown training stage {stage!r}; expected one of {', '.join(STAGES)}")
    module = importlib.import_module(f"components.training.{stage}")
    if stage == "pretrain":
        return module.run(settings, resume=resume)
    return module.run(settings, init_from=init_from, resume=resume)


def finetune_stages(method: str) -> list[str]:
    """The alignment path after SFT: DPO directly, or a reward model then PPO against it."""
    return ["sft", "dpo"] if method == "dpo" else ["sft", "reward", "ppo"]


def finetune(settings: Settings, init_from: str | None = None) -> dict:
    """SFT then DPO, or SFT -> reward -> PPO (settings.finetune.method); each stage starts from SFT's output.

    Returns {"stages": {stage: result}, "model_uri", "run_id"} of the last (policy) stage.
    """
    results: dict[str, dict] = {}
    sft = run_stage(settings, "sft", init_from=init_from)
    results["sft"] = sft
    for stage in finetune_stages(settings.finetune.method)[1:]:
        # reward and the policy stage both start from the SFT model; PPO finds the reward model
        # in checkpoints/reward/hf, where the reward stage just wrote it.
        results[stage] = run_stage(settings, stage, init_from=sft["hf_dir"])
    last = results[finetune_stages(settings.finetune.method)[-1]]
    return {"stages": results, "model_uri": last["model_uri"], "run_id": last["run_id"]}


# ----------------------------------------------------------------------------- shared stage plumbing
def hf_dir(settings: Settings, stage: str) -> Path:
    """checkpoints/<stage>/hf: the stage's final model as a plain save_pretrained folder."""
    return layout.checkpoints_dir(settings, stage) / "hf"


def default_init_from(settings: Settings, stage: str) -> str:
    """The previous stage's HF folder; ConfigError (naming the stage to run) when it is missing."""
    prev = PREVIOUS[stage]
    path = hf_dir(settings, prev)
    if stage == "sft" and not (path / "config.json").is_file() and settings.model.init_from != "scratch":
        # Fine-tune an existing model (model.init_from) without pretraining one here.
        return settings.model.init_from
    if not (path / "config.json").is_file():
        raise ConfigError(f"{stage}: no {prev} model at {path}; run `llmcycle train {prev}` first "
                          f"or pass init_from")
    return str(path)


def local_model_dir(settings: Settings, init_from: str) -> Path:
    """A folder with config.json for a local path or an MLflow model URI (downloaded)."""
    if init_from.startswith(("models:/", "runs:/")):
        return tracking.download_model_dir(settings, init_from)
    path = settings.path(init_from)
    if not (path / "config.json").is_file():
        raise ConfigError(f"{init_from}: not a save_pretrained folder (no config.json at {path})")
    return path


def parent_model_uri(settings: Settings, init_from: str) -> str:
    """MLflow URI of the model a stage starts from, for the parent_model_uri lineage tag.

    A stage's HF folder sits next to its run_id.txt, so checkpoints/<stage>/hf maps back to
    runs:/<that run>/model; any other source (an URI, a user folder) is recorded as given.
    """
    if init_from.startswith(("models:/", "runs:/")):
        return init_from
    path = settings.path(init_from).resolve()
    id_file = path.parent / RUN_ID_FILE
    if path.name == "hf" and id_file.is_file():
        return f"runs:/{id_file.read_text().strip()}/model"
    return str(path)


def is_launch_rank_zero() -> bool:
    """False in the extra processes a DDP launcher starts (they re-run the command): no MLflow run there."""
    return all(os.environ.get(k, "0") == "0" for k in ("RANK", "LOCAL_RANK", "NODE_RANK"))


def prepare_checkpoints(settings: Settings, stage: str, resume: bool) -> tuple[Path | None, str | None]:
    """(checkpoint to resume from, MLflow run id to reopen); a fresh run clears the stage's folder.

    Clearing matters: a later --resume must never pick up a previous run's checkpoints.
    """
    from components.training.trainer import last_checkpoint

    ckpt_dir = layout.checkpoints_dir(settings, stage)
    if resume:
        ckpt = last_checkpoint(settings, stage)
        if ckpt is None:
            raise ConfigError(f"{stage} --resume: no checkpoint under {ckpt_dir}; run without --resume")
        id_file = ckpt_dir / RUN_ID_FILE
        return ckpt, id_file.read_text().strip() if id_file.is_file() else None
    if is_launch_rank_zero() and ckpt_dir.exists():
        shutil.rmtree(ckpt_dir)
    return None, None


@contextlib.contextmanager
def open_stage_run(settings: Settings, stage: str, resume_id: str | None, params: dict,
                   tags: dict[str, str] | None = None) -> Iterator[str]:
    """A new stage run, or the interrupted one reopened (same id, metrics continue); yields the run id.

    The id is written to checkpoints/<stage>/run_id.txt at once, so an interrupt leaves it for --resume.
    """
    import mlflow

    ckpt_dir = layout.checkpoints_dir(settings, stage)
    if resume_id:
        tracking.configure(settings)
        from mlflow.exceptions import MlflowException
        try:
            mlflow.MlflowClient().get_run(resume_id)
        except MlflowException:
            resume_id = None  # another tracking store or a deleted run: start a new run
    if resume_id:
        ctx = mlflow.start_run(run_id=resume_id, nested=mlflow.active_run() is not None)
    else:
        ctx = tracking.stage_run(settings, stage, params=params, tags=tags)
    with ctx as run:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        (ckpt_dir / RUN_ID_FILE).write_text(run.info.run_id)
        if resume_id:
            mlflow.set_tag("resumed", "true")
        yield run.info.run_id


def final_metrics(trainer: Any, extra: dict[str, float] | None = None) -> dict[str, float]:
    """The trainer's last logged scalars as floats (plus extra), for the stage's return value."""
    out = {}
    for key, value in trainer.callback_metrics.items():
        try:
            out[key] = float(value)
        except (TypeError, ValueError):
            continue
    out["steps"] = trainer.global_step
    out.update(extra or {})
    return out


# ----------------------------------------------------------------------------- the shared fit
def train_val_loaders(cfg: TrainConfig, dataset: type, collate: Any, train_rows: list[dict], val_rows: list[dict],
                      tokenizer: Any, max_len: int, resume_from: Path | None = None) -> tuple[Any, Any]:
    """(shuffled train, ordered val) DataLoaders of one dataset class, batch size and seed from cfg; resuming
    from a checkpoint, the train order continues after the batches it had trained on."""
    from components.training import finetune_data as fd
    from components.training.trainer import checkpoint_step, loader_options

    opts = loader_options(cfg.accelerator, cfg.num_workers)  # workers + pinned memory on CUDA, none on CPU
    start = checkpoint_step(resume_from) if resume_from else 0
    train = fd.loader(dataset(train_rows, tokenizer, max_len), cfg.batch_size, collate, True, cfg.seed, **opts,
                      start_batch=start)
    val = fd.loader(dataset(val_rows, tokenizer, max_len), cfg.batch_size, collate, False, **opts)
    return train, val


def fit_extra_rank(settings: Settings, cfg: TrainConfig, stage: str, module: Any, ckpt: Path | None,
                   train: Any, val: Any, t_start: float) -> dict:
    """Train in an extra DDP process and return the stage's empty result: rank zero owns run and artifacts."""
    from components.training.trainer import build_trainer, fit

    trainer = build_trainer(settings, cfg, stage, run_id=None)
    fit(trainer, module, ckpt_path=ckpt, train_dataloaders=train, val_dataloaders=val)
    if module.last_val_step != trainer.global_step:
        trainer.validate(module, dataloaders=val, verbose=False)  # a collective: join rank zero's final validate
    return {"run_id": None, "model_uri": None, "metrics": {}, "wall_s": time.perf_counter() - t_start}


@contextlib.contextmanager
def fit_stage(settings: Settings, cfg: TrainConfig, stage: str, module: Any, ckpt: Path | None, train: Any, val: Any,
              resume_id: str | None, params: dict, extra: dict[str, float] | None = None
              ) -> Iterator[tuple[str, Any, dict[str, float]]]:
    """Rank zero's fit inside the stage's MLflow run; yields (run_id, trainer, final metrics) with the run open.

    The with-block is where the stage logs its own final metrics, samples and model. module must set
    last_val_step at each validation epoch end: when training stopped between validations, one more
    runs so the final metrics describe the final weights. extra is merged into the metrics. The module
    is back on the training device inside the block (Lightning's teardown moves it to the CPU).
    """
    from components.training.trainer import build_trainer, fit

    from components.training.trainer import to_training_device

    with open_stage_run(settings, stage, resume_id, params) as run_id:
        trainer = build_trainer(settings, cfg, stage, run_id)
        fit(trainer, module, ckpt_path=ckpt, train_dataloaders=train, val_dataloaders=val)
        if module.last_val_step != trainer.global_step:
            trainer.validate(module, dataloaders=val, verbose=False)
        to_training_device(trainer, module)  # teardown left it on the CPU: samples and scores run on the GPU
        yield run_id, trainer, final_metrics(trainer, extra)
