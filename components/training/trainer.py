"""One Lightning Trainer factory for every training stage, plus the optimizer, schedule and resume helpers.

Each stage builds its LightningModule and calls build_trainer(settings, cfg, stage, run_id): steps,
clipping, precision, devices, validation cadence, checkpoints under checkpoints/<stage>/, metrics into the
stage's already-open MLflow run, and a guard that stops on a NaN/inf loss. lightning is imported inside
functions only (7-9 s), so the CLI stays fast.
"""
from __future__ import annotations

import math
import signal
import sys
import warnings
from pathlib import Path
from typing import Any, Iterable

import torch

from components import tracking
from components.config import Settings, TrainConfig
from components.data import layout
from components.errors import TrainingError

INTERRUPTED_CKPT = "interrupted.ckpt"


# ----------------------------------------------------------------------------- optimizer and schedule
def configure_adamw(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (>= 2-D: linear and embedding weights).

    Norm gains and biases stay undecayed: shrinking them toward zero only fights the normalisation.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # The fused CUDA kernel is one launch for all tensors; on CPU the optimizer is <1% of a step here
    # (benchmarks/README.md), so torch's default single-tensor loop is kept there.
    fused = bool(params) and all(p.is_cuda for p in params)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8, fused=fused or None)


def cosine_with_warmup(optimizer: torch.optim.Optimizer, warmup_steps: int, max_steps: int,
                       min_lr_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup to the peak lr over warmup_steps, then cosine decay to min_lr_ratio * peak at max_steps.

    factor(s) = (s + 1) / warmup                                  for s < warmup
    factor(s) = r + (1 - r) * 0.5 * (1 + cos(pi * p)),  p = (s - warmup) / (max_steps - warmup)   after
    """
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ----------------------------------------------------------------------------- checkpoints
def last_checkpoint(settings: Settings, stage: str) -> Path | None:
    """The newest Lightning checkpoint of a stage (last.ckpt, a periodic one, or interrupted.ckpt), or None."""
    folder = layout.checkpoints_dir(settings, stage)
    if not folder.is_dir():
        return None
    ckpts = sorted(folder.glob("*.ckpt"), key=lambda p: (p.stat().st_mtime_ns, p.name == "last.ckpt"))
    return ckpts[-1] if ckpts else None


def _callbacks(settings: Settings, cfg: TrainConfig, stage: str) -> list[Any]:
    """NaN/inf guard, Ctrl-C checkpoint, schedule re-sync (classes built here so lightning loads lazily)."""
    from lightning.pytorch.callbacks import Callback

    ckpt_dir = layout.checkpoints_dir(settings, stage)

    class NonFiniteGuard(Callback):
        """Stops training on a NaN/inf loss before its gradients touch the weights.

        Checked in on_before_backward (automatic and manual optimization both pass through it), so
        the checkpoint callback never saves a poisoned state and the last good checkpoint stays.
        """

        def on_before_backward(self, trainer: Any, pl_module: Any, loss: torch.Tensor) -> None:
            if not torch.isfinite(loss.detach()).all():
                last = last_checkpoint(settings, stage)
                raise TrainingError(
                    f"{stage}: non-finite loss ({loss.detach().float().item()}) at step {trainer.global_step}; "
                    f"lower {stage}.lr (now {cfg.lr}) or check the data; last good checkpoint: {last or 'none'}")

    class InterruptCheckpoint(Callback):
        """On Ctrl-C, save the state reached so far (interrupted.ckpt) so --resume continues from there."""

        interrupted = False

        def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
            if not isinstance(exception, KeyboardInterrupt):
                return
            self.interrupted = True
            # Save the state as of the end of the last finished batch: Lightning's resume logic reads its
            # progress counters, and a batch fetched but not processed would shift the validation and
            # logging steps of the resumed run by one. The batch is simply redone on resume.
            progress = trainer.fit_loop.epoch_loop.batch_progress
            saved = [(c, c.ready, c.started) for c in (progress.total, progress.current)]
            for counter, _, _ in saved:
                counter.ready = counter.started = min(counter.started, counter.processed)
            try:
                trainer.save_checkpoint(ckpt_dir / INTERRUPTED_CKPT)
            finally:
                for counter, ready, started in saved:
                    counter.ready, counter.started = ready, started

    class ScheduleFromConfig(Callback):
        """After a restore, take the lr from this run's schedule, not the one saved in the checkpoint.

        The optimizer state restores each group's last lr; when --resume comes with a new max_steps or
        warmup, the first resumed step would otherwise use the old schedule's value.
        """

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            for config in trainer.lr_scheduler_configs:
                sched = config.scheduler
                if isinstance(sched, torch.optim.lr_scheduler.LambdaLR):
                    lrs = [base * f(sched.last_epoch) for base, f in zip(sched.base_lrs, sched.lr_lambdas)]
                    for group, lr in zip(sched.optimizer.param_groups, lrs):
                        group["lr"] = lr
                    sched._last_lr = lrs

    return [NonFiniteGuard(), InterruptCheckpoint(), ScheduleFromConfig()]


# ----------------------------------------------------------------------------- the trainer
def _progress_bar(interactive: bool) -> list[Any]:
    """A rich progress bar on a terminal; none in CI logs or tests (they are not a TTY)."""
    if not interactive:
        return []
    from lightning.pytorch.callbacks import RichProgressBar

    return [RichProgressBar(leave=True)]


def build_trainer(settings: Settings, cfg: TrainConfig, stage: str, run_id: str | None,
                  callbacks: Iterable[Any] = (), **overrides: Any) -> Any:
    """A lightning.Trainer for one stage; metrics go to the already-open MLflow run `run_id`.

    run_id is None only in the extra processes of a DDP launch (the logger is rank-zero only).

    overrides go straight to lightning.Trainer (a PPO module with manual optimization passes
    gradient_clip_val=None and clips itself; tests pass enable_progress_bar=False, ...).
    """
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import MLFlowLogger

    tracking.quiet_env()
    # The folder already holds run_id.txt (and, on resume, the checkpoints being resumed): expected.
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")  # TF32 matmuls in 32-true: ~free speed on Ampere+
    ckpt_dir = layout.checkpoints_dir(settings, stage)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = ModelCheckpoint(
        dirpath=ckpt_dir, filename="step-{step:06d}", auto_insert_metric_name=False,
        every_n_train_steps=cfg.ckpt_every, save_last=True, save_top_k=1, save_on_train_epoch_end=False,
    )
    logger = MLFlowLogger(experiment_name=tracking.EXPERIMENT, tracking_uri=tracking.tracking_uri(settings),
                          run_id=run_id, log_model=False)
    interactive = sys.stderr.isatty()
    kwargs: dict[str, Any] = dict(
        max_steps=cfg.max_steps,
        gradient_clip_val=cfg.grad_clip or None,
        precision=cfg.precision,
        strategy=cfg.strategy, devices=cfg.devices, num_nodes=cfg.num_nodes, accelerator=cfg.accelerator,
        # Step-based validation: count batches across epochs, not within one (streams have no epochs).
        val_check_interval=cfg.val_every, check_val_every_n_epoch=None, limit_val_batches=cfg.val_batches,
        num_sanity_val_steps=0,
        logger=logger,
        callbacks=[*_callbacks(settings, cfg, stage), *callbacks, checkpoint, *_progress_bar(interactive)],
        # ~100 points per curve; every step for short runs.
        log_every_n_steps=max(1, cfg.max_steps // 100),
        enable_progress_bar=interactive, enable_model_summary=interactive,
        default_root_dir=str(ckpt_dir),
    )
    kwargs.update(overrides)
    return L.Trainer(**kwargs)


def fit(trainer: Any, module: Any, datamodule: Any = None, ckpt_path: str | Path | None = None, **kwargs: Any) -> None:
    """trainer.fit that lets Ctrl-C surface as KeyboardInterrupt again.

    Lightning turns KeyboardInterrupt into sys.exit(1) and ignores SIGINT from then on; the caller
    (stage run, Prefect task) should see the interrupt, and a second Ctrl-C should work again.
    """
    handler = signal.getsignal(signal.SIGINT)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt_path) if ckpt_path else None, **kwargs)
    except SystemExit:
        if any(getattr(cb, "interrupted", False) for cb in trainer.callbacks):
            raise KeyboardInterrupt from None
        raise
    finally:
        # Only when Lightning changed it: signal.signal raises outside the main thread (Prefect workers).
        if handler is not None and signal.getsignal(signal.SIGINT) is not handler:
            signal.signal(signal.SIGINT, handler)
