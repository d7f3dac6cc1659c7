"""One Lightning Trainer factory for every training stage, plus the optimizer, schedule and resume helpers.

Each stage builds its LightningModule and calls build_trainer(settings, cfg, stage, run_id): steps,
clipping, precision (resolve_precision: `auto` picks bf16-mixed / 16-mixed / 32-true for the device),
devices, validation cadence, checkpoints under checkpoints/<stage>/, metrics into the stage's already-open
MLflow run, and a guard that stops on a NaN/inf loss. Nothing here waits on the GPU once per step: the
guard and the progress bar read the loss once per logging interval. lightning is imported inside
functions only (7-9 s), so the CLI stays fast.
"""
from __future__ import annotations

import math
import os
import signal
import sys
import warnings
from pathlib import Path
from typing import Any, Iterable

import torch

from components import quiet, tracking
from components.config import Settings, TrainConfig
from components.data import layout
from components.errors import TrainingError

INTERRUPTED_CKPT = "interrupted.ckpt"


# ----------------------------------------------------------------------------- device, precision, loaders
def device_type(accelerator: str = "auto") -> str:
    """The torch device type a run with this Lightning accelerator trains on: cuda, cpu (or mps, tpu, ...)."""
    if accelerator in ("auto", "gpu", "cuda"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return accelerator


def resolve_precision(precision: str, accelerator: str = "auto") -> str:
    """The Lightning precision string a run uses; `auto` picks it for the device the run trains on.

    auto -> bf16-mixed on a CUDA device with native bf16 (Ampere and newer), 16-mixed on older CUDA
    devices (fp16 autocast + GradScaler), 32-true elsewhere (on CPU, bf16-mixed stays an explicit choice:
    its speed there is not measured). Any other value is returned as given.
    """
    if precision != "auto":
        return precision
    if device_type(accelerator) != "cuda":
        return "32-true"
    try:  # emulated bf16 (pre-Ampere) is slower than fp16 with a scaler: count native support only
        native_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch without the keyword
        native_bf16 = torch.cuda.is_bf16_supported()
    return "bf16-mixed" if native_bf16 else "16-mixed"


def resolve_compile(compile_: bool | str, device: str) -> bool:
    """`auto` compiles on CUDA (the eager forward's mask checks read the device each step; the compiled
    graph does not) and not on CPU (compilation costs ~40 s there before it pays off). A bool is kept."""
    if compile_ == "auto":
        return device == "cuda"
    return bool(compile_)


def loader_options(accelerator: str = "auto", num_workers: int | None = None) -> dict[str, Any]:
    """DataLoader keywords for the device: worker processes and pinned memory on CUDA, neither on CPU.

    On a GPU the step is short, so batches are built by workers and copied from page-locked memory while
    the previous step runs; on CPU workers would only compete with the step for the same cores.
    """
    cuda = device_type(accelerator) == "cuda"
    if num_workers is None:
        num_workers = min(4, max(1, (os.cpu_count() or 2) // 2)) if cuda else 0
    return {"num_workers": num_workers, "pin_memory": cuda, "persistent_workers": num_workers > 0}


def to_training_device(trainer: Any, module: torch.nn.Module) -> torch.nn.Module:
    """Move a module back to the device it trained on (Lightning's teardown leaves it on the CPU).

    Sample generations and scoring after fit then run on the GPU, not on the host.
    """
    return module.to(trainer.strategy.root_device)


# ----------------------------------------------------------------------------- optimizer and schedule
def configure_adamw(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (>= 2-D: linear and embedding weights).

    Norm gains and biases stay undecayed: shrinking them toward zero only fights the normalisation.
    fused: cfg.fused_adamw, or when unset (auto) fused exactly when every parameter is on CUDA: one kernel
    launch for all tensors there, while on CPU the optimizer is <1% of a step (benchmarks/README.md).
    Clipping a fused AdamW's gradients under mixed precision is GradClip's job (see below).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = cfg.fused_adamw if cfg.fused_adamw is not None else bool(params) and all(p.is_cuda for p in params)
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


def checkpoint_step(path: Path) -> int:
    """The optimizer steps a Lightning checkpoint had taken (its global_step): where a resume continues."""
    import torch

    return int(torch.load(path, map_location="cpu", weights_only=False, mmap=True)["global_step"])


def _callbacks(settings: Settings, cfg: TrainConfig, stage: str, interactive: bool) -> list[Any]:
    """Gradient clipping, NaN/inf guard, Ctrl-C checkpoint, schedule re-sync (built here: lightning loads lazily)."""
    from lightning.pytorch.callbacks import Callback

    ckpt_dir = layout.checkpoints_dir(settings, stage)

    class GradClip(Callback):
        """Clips the global gradient norm to cfg.grad_clip right before each optimizer step, in every precision.

        Lightning's own clipping (Trainer(gradient_clip_val)) refuses a fused AdamW under bf16-/16-mixed
        ("performs unscaling of gradients internally"), and in manual optimization (PPO) it would clip
        fp16 gradients while they are still scaled. on_before_optimizer_step runs after the backward in
        both modes, and, for an unfused optimizer, after Lightning's scaler.unscale_. For a fused one,
        Lightning leaves the gradients scaled; unscaling them here is what torch's AMP recipe does, and
        GradScaler.step then sees the optimizer UNSCALED and passes no scale to the fused kernel (the
        inf/NaN check of unscale_ still skips a bad step). bf16 has no scaler: clipping is all there is.
        """

        def __init__(self, max_norm: float):
            self.max_norm = max_norm

        def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: torch.optim.Optimizer) -> None:
            plugin = trainer.precision_plugin
            scaler = getattr(plugin, "scaler", None)
            if scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False) and any(
                    p.grad is not None for group in optimizer.param_groups for p in group["params"]):
                scaler.unscale_(optimizer)
            # The plugin's own norm clipping over its main parameters (FSDP's raises, as Lightning's would).
            plugin.clip_grad_by_norm(optimizer, self.max_norm)

    class NonFiniteGuard(Callback):
        """Stops training on a NaN/inf loss without a host sync per step.

        Each backward folds "is this loss finite" into a device-side scalar (the first bad step, +inf
        while none); the host reads it once per logging interval (trainer.log_every_n_steps), before
        every checkpoint (ckpt_every) and at the end of training. So training stops within one logging
        interval of the first non-finite loss, and no checkpoint is ever written after one: the last
        checkpoint on disk is a good state. The same read gives the progress bar its loss.
        """

        def __init__(self) -> None:
            self.first_bad: torch.Tensor | None = None   # () float: step of the first non-finite loss, inf if none
            self.last_loss: torch.Tensor | None = None

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            self.first_bad = self.last_loss = None

        def on_before_backward(self, trainer: Any, pl_module: Any, loss: torch.Tensor) -> None:
            loss = loss.detach()
            bad_at = torch.where(torch.isfinite(loss).all(), math.inf, float(trainer.global_step))  # () on device
            self.first_bad = bad_at if self.first_bad is None else torch.minimum(self.first_bad, bad_at)
            self.last_loss = loss

        def poisoned(self, trainer: Any) -> int | None:
            """The first non-finite step on any rank, or None (one host read; a collective under DDP)."""
            if self.first_bad is None:
                return None
            first = self.first_bad
            if trainer.world_size > 1:  # every rank checks at the same steps, so all join this reduce
                first = trainer.strategy.reduce(first.clone(), reduce_op="min")
            value = float(first)
            return None if math.isinf(value) else int(value)

        def check(self, trainer: Any) -> None:
            bad = self.poisoned(trainer)
            if bad is not None:
                last = last_checkpoint(settings, stage)
                raise TrainingError(
                    f"{stage}: non-finite loss at step {bad} (checked every {trainer.log_every_n_steps} steps and "
                    f"before each checkpoint; stopped at step {trainer.global_step}); lower {stage}.lr (now {cfg.lr}) "
                    f"or check the data; last good checkpoint: {last or 'none'}")

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            step = trainer.global_step
            due = (step % trainer.log_every_n_steps == 0 or step % cfg.ckpt_every == 0
                   or 0 < trainer.max_steps <= step or trainer.should_stop)
            if not due:
                return
            self.check(trainer)  # runs before ModelCheckpoint's hook: Lightning orders checkpoint callbacks last
            if interactive and self.last_loss is not None:
                # A Python float for the bar: Lightning would .item() a prog_bar tensor on every batch.
                pl_module.log("loss", float(self.last_loss), prog_bar=True, logger=False)

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            self.check(trainer)  # the final weights are about to be saved and logged

    class InterruptCheckpoint(Callback):
        """On Ctrl-C, save the state reached so far (interrupted.ckpt) so --resume continues from there."""

        interrupted = False

        def __init__(self, guard: NonFiniteGuard):
            self.guard = guard

        def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
            if not isinstance(exception, KeyboardInterrupt):
                return
            self.interrupted = True
            if self.guard.poisoned(trainer) is not None:
                return  # a non-finite loss since the last check: the weights are not worth resuming
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

    guard = NonFiniteGuard()
    clip = [GradClip(cfg.grad_clip)] if cfg.grad_clip else []
    return [*clip, guard, InterruptCheckpoint(guard), ScheduleFromConfig()]


# ----------------------------------------------------------------------------- the trainer
def _progress(interactive: bool, stage: str) -> list[Any]:
    """A rich progress bar on a terminal; elsewhere (a piped log, CI, a worker) a progress line every ~20 s."""
    if not interactive:
        from components.training.progress import progress_lines

        return [progress_lines(stage)]
    from lightning.pytorch.callbacks import RichProgressBar

    return [RichProgressBar(leave=True)]


def log_every(cfg: TrainConfig) -> int:
    """Steps between logged points: ~100 per curve, every step for short runs."""
    return max(1, cfg.max_steps // 100)


def build_trainer(settings: Settings, cfg: TrainConfig, stage: str, run_id: str | None,
                  callbacks: Iterable[Any] = (), **overrides: Any) -> Any:
    """A lightning.Trainer for one stage; metrics go to the already-open MLflow run `run_id`.

    run_id is None only in the extra processes of a DDP launch (the logger is rank-zero only).

    Gradient clipping is the GradClip callback, never Lightning's gradient_clip_val (which refuses a
    fused AdamW under mixed precision); cfg.precision goes through resolve_precision.
    overrides go straight to lightning.Trainer (tests pass enable_progress_bar=False, ...).
    """
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import MLFlowLogger

    tracking.quiet_env()
    quiet.third_party()
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
        gradient_clip_val=None,  # GradClip clips (see _callbacks)
        precision=resolve_precision(cfg.precision, cfg.accelerator),
        strategy=cfg.strategy, devices=cfg.devices, num_nodes=cfg.num_nodes, accelerator=cfg.accelerator,
        # Step-based validation: count batches across epochs, not within one (streams have no epochs).
        val_check_interval=cfg.val_every, check_val_every_n_epoch=None, limit_val_batches=cfg.val_batches,
        num_sanity_val_steps=0,
        logger=logger,
        callbacks=[*_callbacks(settings, cfg, stage, interactive), *callbacks, checkpoint, *_progress(interactive, stage)],
        # ~100 points per curve, every step for short runs; also the host's read interval (NonFiniteGuard).
        log_every_n_steps=log_every(cfg),
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
