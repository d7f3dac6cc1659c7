"""Pretraining stage: next-token prediction on the token arrays, one MLflow run `pretrain`, resumable.

CausalLMModule wraps the HF model (loss, val perplexity, throughput and MFU; on CUDA liger's fused kernels
and a full-graph torch.compile when configured); run() wires model, data, trainer and MLflow, and leaves a
plain HF folder (checkpoints/pretrain/hf) plus a logged transformers model for the next stage. --resume continues the newest checkpoint inside the same MLflow run.
The module class is built on first use, so importing this file does not import lightning.
"""
from __future__ import annotations

import functools
import json
import math
import os
import shutil
import time
from typing import Any

import torch

from components import tracking
from components.config import Settings, TrainConfig
from components.data import layout
from components.errors import ConfigError
from components.model.build import count_parameters, load_causal_lm
from components.training.data import TokenData
from components.training.hot_path import compile_loss, liger_loss_fn, lm_loss
from components.training.stages import RUN_ID_FILE, is_launch_rank_zero, open_stage_run
from components.training.trainer import (build_trainer, configure_adamw, cosine_with_warmup, fit, last_checkpoint,
                                         loader_options, resolve_compile, to_training_device)

STAGE = "pretrain"


# ----------------------------------------------------------------------------- throughput accounting
def flops_per_token(n_params: int, n_layer: int, n_embd: int, block_size: int) -> float:
    """Training FLOPs per token (PaLM appendix B): 6N for the matmuls + 12 * L * d * T for attention."""
    return 6.0 * n_params + 12.0 * n_layer * n_embd * block_size


def measure_matmul_flops(device: torch.device, precision: str = "32-true", seconds: float = 0.3) -> float:
    """Best observed square-matmul FLOP/s on device in the training dtype (the MFU denominator)."""
    dtype = torch.bfloat16 if precision.startswith("bf16") else torch.float16 if precision.startswith("16") \
        else torch.float32
    n = 4096 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.mm(a, b)
    sync()
    best, spent = float("inf"), 0.0
    while spent < seconds:
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync()
        dt = time.perf_counter() - t0
        best, spent = min(best, dt), spent + dt
    return 2.0 * n ** 3 / best


def peak_flops(settings: Settings, device: torch.device, precision: str) -> float:
    """The scoping stage's measured matmul peak when it measured this device type in this precision, else now."""
    report = layout.scoping_dir(settings) / "report.json"
    r = json.loads(report.read_text()) if report.is_file() else {}
    if r.get("accelerator") == device.type and r.get("precision") == precision and r.get("matmul_flops"):
        return float(r["matmul_flops"])
    return measure_matmul_flops(device, precision)


# ----------------------------------------------------------------------------- the LightningModule
@functools.lru_cache(maxsize=None)
def _module_class() -> type:
    import lightning as L

    class CausalLMModule(L.LightningModule):
        """Next-token training of a HF causal LM on (B, T+1) token windows.

        The loss path is chosen in setup(), once the device is known: liger's fused kernels on CUDA
        (cfg.kernels), torch.compile of trunk + loss (cfg.compile; auto = on CUDA). Throughput is wall time over
        logging intervals, read at the one host sync each interval already has.
        """

        def __init__(self, model: Any, cfg: TrainConfig, data: TokenData, flops_per_token: float,
                     peak_flops: float | None = None, settings: Settings | None = None):
            super().__init__()
            self.model, self.cfg, self.data, self.settings = model, cfg, data, settings
            self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
            self.kernels = "none"                               # resolved in setup()
            self._loss_fn: Any = None
            self._val_losses: list[torch.Tensor] = []
            self.last_val: tuple[int, float] | None = None     # (global step, val loss) of the latest validation
            self.last_train_loss = torch.tensor(float("nan"))
            self.throughput: list[tuple[int, float]] = []       # (tokens, seconds) per logging interval
            self.first_step: tuple[int, float] | None = None    # (tokens, seconds) of a fit's first step
            self._mark: tuple[int, float] | None = None         # (global step, time) the current interval began
            self._t0 = self._val_t0 = self._val_s = 0.0

        def setup(self, stage: str) -> None:
            if self._loss_fn is not None:
                return
            from components.model.kernels import resolve_kernels

            # Resolved before any step (an explicit liger on CPU fails here); applied in on_fit_start.
            self.kernels = resolve_kernels(getattr(self.cfg, "kernels", "none"), self.trainer.strategy.root_device.type)
            self.compile = resolve_compile(self.cfg.compile, self.trainer.strategy.root_device.type)
            loss = functools.partial(lm_loss, self.model)
            self._loss_fn = compile_loss(loss) if self.compile else loss

        def _use_liger(self) -> None:
            """liger's kernels for the loss path, after hot_path's probe step on this device (auto may fall back)."""
            fn = liger_loss_fn(self.model, self.trainer.precision_plugin.forward_context, self.compile,
                               explicit=self.cfg.kernels == "liger")
            if fn is None:
                self.kernels = "none"
            else:
                self._loss_fn = fn

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return self.model(input_ids=input_ids, use_cache=False).logits         # (B, T, V)

        def _loader_options(self) -> dict[str, Any]:
            # Workers and pinned memory when this run trains on CUDA (the device Lightning chose), none on CPU.
            return loader_options(self.trainer.strategy.root_device.type, getattr(self.cfg, "num_workers", None))

        def train_dataloader(self) -> Any:
            # Runs after Lightning restored a checkpoint: global_step is where the data must continue.
            return self.data.train_loader(start_step=self.trainer.global_step, rank=self.trainer.global_rank,
                                          **self._loader_options())

        def val_dataloader(self) -> Any:
            return self.data.val_loader(self.cfg.val_batches, **self._loader_options())

        def configure_optimizers(self) -> dict:
            opt = configure_adamw(self.model, self.cfg)
            sched = cosine_with_warmup(opt, self.cfg.warmup_steps, self.cfg.max_steps, self.cfg.min_lr_ratio)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

        def on_fit_start(self) -> None:
            if self.kernels == "liger" and not getattr(self, "_liger_on", False):  # the model is on its device now
                self._liger_on = True
                self._use_liger()
            if self.peak_flops is None:
                self.peak_flops = peak_flops(self.settings, self.device, self.trainer.precision) \
                    if self.settings is not None else measure_matmul_flops(self.device, self.trainer.precision)
            self._mark, self.first_step = None, None

        def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
            x, y = batch[:, :-1], batch[:, 1:]                                # (B, T) inputs, (B, T) targets
            loss = self._loss_fn(x, y)
            # No prog_bar: Lightning would .item() it every batch (NonFiniteGuard feeds the bar instead).
            self.log("train_loss", loss)
            self.last_train_loss = loss.detach()
            self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"])
            return loss

        # -- throughput: wall time over logging intervals
        def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
            if self._mark is None:
                self._t0 = time.perf_counter()

        def on_train_batch_end(self, outputs: Any, batch: torch.Tensor, batch_idx: int) -> None:
            step = self.trainer.global_step
            first = self._mark is None
            if not first and step % self.trainer.log_every_n_steps and not 0 < self.trainer.max_steps <= step:
                return
            # The one host sync of the interval (NonFiniteGuard has just read the same step): the clock then
            # times finished work, not queued launches. Both ends of an interval sit at the same point of a step.
            float(self.last_train_loss)
            now = time.perf_counter()
            tokens_per_step = batch.shape[0] * (batch.shape[1] - 1) * self.trainer.world_size
            if first:  # the first step of a fit pays for allocation (and compilation): kept apart
                self.first_step = (tokens_per_step, now - self._t0)
            else:
                # Validation inside the interval is not training time.
                tokens, seconds = (step - self._mark[0]) * tokens_per_step, now - self._mark[1] - self._val_s
                tps = tokens / max(seconds, 1e-9)
                mfu = tps * self.flops_per_token / (self.peak_flops * self.trainer.world_size)
                self.log_dict({"tokens_per_sec": tps, "mfu": mfu})
                self.throughput.append((tokens, seconds))
            self._mark, self._val_s = (step, now), 0.0

        def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
            x, y = batch[:, :-1], batch[:, 1:]                                # (B, T)
            self._val_losses.append(self._loss_fn(x, y).detach())

        def on_validation_epoch_start(self) -> None:
            self._val_losses = []
            self._val_t0 = time.perf_counter()

        def on_validation_epoch_end(self) -> None:
            self._log_val()  # its all_gather + float waits for the validation's kernels: time them whole
            self._val_s += time.perf_counter() - self._val_t0

        def _log_val(self) -> None:
            if not self._val_losses:
                return
            # Averaged over every rank's windows here; logged as floats, so Lightning does not reduce again.
            mean = float(self.all_gather(torch.stack(self._val_losses).mean()).mean())
            self.log_dict({"val_loss": mean, "val_perplexity": math.exp(mean)})
            self.last_val = (self.trainer.global_step, mean)

    return CausalLMModule


def __getattr__(name: str) -> Any:
    if name == "CausalLMModule":  # `from components.training.pretrain import CausalLMModule` builds it lazily
        return _module_class()
    raise AttributeError(name)


# ----------------------------------------------------------------------------- the stage
def _log_reports(run_id: str, model: Any, tokenizer: Any, data: TokenData) -> None:
    """Loss curve (from the run's full metric history, so resumed runs plot whole) and sample generations."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import mlflow

    from components.model.generation import generate

    client = mlflow.MlflowClient()
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in ("train_loss", "val_loss"):
        hist = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
        if hist:
            marker = "o" if key == "val_loss" else None  # few val points: show each one
            ax.plot([m.step for m in hist], [m.value for m in hist], label=key, marker=marker)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("pretraining loss")
    ax.legend()
    mlflow.log_figure(fig, "plots/loss_curve.png")
    plt.close(fig)

    prompts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in data.sample_prompts(n=4, n_tokens=24)]
    completions = generate(model, tokenizer, prompts, max_new_tokens=48, temperature=0.0)
    mlflow.log_table({"prompt": prompts, "completion": completions}, artifact_file="samples/generations.json")


def run(settings: Settings, resume: bool = False) -> dict:
    """Train (or resume) the pretraining stage; returns run_id, model_uri, final metrics and wall_s."""
    t_start = time.perf_counter()
    cfg = settings.pretrain
    ckpt_dir = layout.checkpoints_dir(settings, STAGE)
    zero = is_launch_rank_zero()
    ckpt, resume_id = None, None
    if resume:
        ckpt = last_checkpoint(settings, STAGE)
        if ckpt is None:
            raise ConfigError(f"pretrain --resume: no checkpoint under {ckpt_dir}; run without --resume")
        id_file = ckpt_dir / RUN_ID_FILE
        resume_id = id_file.read_text().strip() if id_file.is_file() else None
    elif zero and ckpt_dir.exists():
        shutil.rmtree(ckpt_dir)  # a later --resume must never pick up a previous run's checkpoints

    torch.manual_seed(cfg.seed)  # a scratch init is part of the run: the same seed gives the same weights
    model, tokenizer = load_causal_lm(settings, settings.model.init_from)
    c = model.config
    data = TokenData(settings, block_size=c.max_position_embeddings, batch_size=cfg.batch_size, seed=cfg.seed)
    sizes = data.check(vocab_rows=model.get_input_embeddings().num_embeddings)
    n_params = count_parameters(model)
    fpt = flops_per_token(n_params, c.num_hidden_layers, c.hidden_size, c.max_position_embeddings)
    shape = {"n_layer": c.num_hidden_layers, "n_head": c.num_attention_heads, "n_embd": c.hidden_size,
             "block_size": c.max_position_embeddings, "intermediate_size": c.intermediate_size,
             "vocab_size": c.vocab_size}
    params = {"pretrain": cfg.model_dump(mode="json"), "model": {**shape, "init_from": settings.model.init_from},
              "n_params": n_params, "flops_per_token": fpt, "tokens": sizes}
    module = _module_class()(model, cfg, data, fpt, settings=settings)

    if not zero:  # extra DDP process: train only; rank zero owns the MLflow run and the artifacts
        trainer = build_trainer(settings, cfg, STAGE, run_id=None)
        fit(trainer, module, ckpt_path=ckpt)
        if module.last_val is None or module.last_val[0] != trainer.global_step:
            trainer.validate(module, verbose=False)  # a collective: every rank joins rank zero's final validate
        return {"run_id": None, "model_uri": None, "metrics": {}, "wall_s": time.perf_counter() - t_start}

    with open_stage_run(settings, STAGE, resume_id, params) as run_id:  # writes run_id.txt for --resume
        import mlflow
        if resume:
            mlflow.set_tag("resumed_from", ckpt.name)
        trainer = build_trainer(settings, cfg, STAGE, run_id)
        mlflow.set_tag("world_size", str(trainer.world_size))  # a tag: a --resume may use another world size
        fit(trainer, module, ckpt_path=ckpt)
        if module.last_val is None or module.last_val[0] != trainer.global_step:
            trainer.validate(module, verbose=False)  # final val metrics always describe the final weights

        # All tokens over all wall time of the logging intervals after the first step (that one alone if
        # the run was too short for an interval).
        steady = module.throughput or [module.first_step or (0, 1.0)]
        tps = sum(x[0] for x in steady) / sum(x[1] for x in steady)
        mfu = tps * fpt / (module.peak_flops * trainer.world_size) if module.peak_flops else 0.0
        metrics = {"val_loss": module.last_val[1], "val_perplexity": math.exp(module.last_val[1]),
                   "train_loss": float(module.last_train_loss), "tokens_per_sec": tps, "mfu": mfu,
                   "steps": trainer.global_step, "n_params": n_params}
        mlflow.log_metrics({"final_val_loss": metrics["val_loss"], "final_val_perplexity": metrics["val_perplexity"],
                            "avg_tokens_per_sec": metrics["tokens_per_sec"], "avg_mfu": metrics["mfu"]},
                           step=trainer.global_step)
        mlflow.set_tag("precision", str(trainer.precision))  # what `auto` resolved to
        mlflow.set_tag("kernels", module.kernels)
        to_training_device(trainer, model).eval()  # fit's teardown left it on the CPU: sample on the GPU
        _log_reports(run_id, model, tokenizer, data)
        hf_dir = ckpt_dir / "hf"
        model.save_pretrained(str(hf_dir))
        tokenizer.save_pretrained(str(hf_dir))
        init_from = settings.model.init_from
        model_uri = tracking.log_hf_model(model, tokenizer, task="text-generation", name="model",
                                          parent_uri=None if init_from == "scratch" else init_from)
    return {"run_id": run_id, "model_uri": model_uri, "hf_dir": str(hf_dir), "metrics": metrics,
            "wall_s": time.perf_counter() - t_start}
