"""DPO stage: direct preference optimization of the SFT policy against a frozen copy of itself.

Policy and reference both load from init_from (the SFT folder); each batch stacks chosen and
rejected completions so one forward per model gives all four sequence log-probs (response tokens
only). The reference never trains and is left out of checkpoints (a resume reloads it from
init_from). Logs loss, implicit-reward accuracy, margin and chosen/rejected rewards, train and val.
"""
from __future__ import annotations

import functools
import time
from typing import Any

import torch

from components.config import DpoConfig, Settings
from components.model.build import count_parameters, load_causal_lm
from components.model.generation import sequence_logprobs
from components.training import finetune_data as fd
from components.training.losses import dpo_loss
from components.training.reporting import finish_stage
from components.training.stages import (default_init_from, fit_extra_rank, fit_stage, hf_dir, is_launch_rank_zero,
                                        parent_model_uri, prepare_checkpoints, train_val_loaders)
from components.training.trainer import configure_adamw, cosine_with_warmup

STAGE = "dpo"
N_SAMPLES = 8
FROZEN_PREFIXES = ("ref.",)


def freeze(model: Any) -> Any:
    """Eval mode and no gradients: a reference or reward model the optimizer must never see."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def drop_frozen(checkpoint: dict, prefixes: tuple[str, ...]) -> None:
    """Remove frozen submodules from a Lightning checkpoint (they reload from their source folder)."""
    state = checkpoint.get("state_dict", {})
    for key in [k for k in state if k.startswith(prefixes)]:
        del state[key]


@functools.lru_cache(maxsize=None)
def _module_class() -> type:
    import lightning as L

    class DpoModule(L.LightningModule):
        """Sigmoid-DPO on (chosen, rejected) pairs with a frozen reference model."""

        def __init__(self, model: Any, ref: Any, cfg: DpoConfig):
            super().__init__()
            self.model, self.ref, self.cfg = model, freeze(ref), cfg
            self.strict_loading = False  # checkpoints hold the policy only (see on_save_checkpoint)
            self._val: list[torch.Tensor] = []
            self.last_val_step: int | None = None

        def configure_optimizers(self) -> dict:
            opt = configure_adamw(self.model, self.cfg)
            sched = cosine_with_warmup(opt, self.cfg.warmup_steps, self.cfg.max_steps, self.cfg.min_lr_ratio)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

        def on_save_checkpoint(self, checkpoint: dict) -> None:
            drop_frozen(checkpoint, FROZEN_PREFIXES)

        def _dpo(self, batch: dict[str, torch.Tensor]) -> Any:
            args = (batch["input_ids"], batch["attention_mask"], batch["response_mask"])
            pc, pr = sequence_logprobs(self.model, *args).chunk(2)                   # (B,), (B,)
            with torch.no_grad():
                rc, rr = sequence_logprobs(self.ref, *args).chunk(2)                 # (B,), (B,)
            n_chosen = batch["response_mask"].chunk(2)[0][:, 1:].sum(dim=1)          # (B,) scored chosen tokens
            return dpo_loss(pc, pr, rc, rr, self.cfg.beta, self.cfg.nll_weight, n_chosen)

        @staticmethod
        def _scalars(out: Any) -> dict[str, torch.Tensor]:
            return {"loss": out.loss.detach(), "accuracy": out.accuracy, "margin": out.margin,
                    "chosen_reward": out.chosen_rewards.mean(), "rejected_reward": out.rejected_rewards.mean()}

        def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
            out = self._dpo(batch)
            stats = self._scalars(out)
            # No prog_bar: Lightning would .item() these every batch (a host sync per step).
            self.log_dict({f"train_{k}": v for k, v in stats.items()}, batch_size=out.chosen_rewards.shape[0])
            self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"])
            return out.loss

        def on_validation_epoch_start(self) -> None:
            self._val = []

        def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
            out = self._dpo(batch)
            n = float(out.chosen_rewards.shape[0])
            # Pair-weighted sums: every val pair counts once, however batches and ranks split them.
            self._val.append(torch.stack([v.float() * n for v in self._scalars(out).values()]
                                         + [torch.tensor(n, device=out.loss.device)]))

        def on_validation_epoch_end(self) -> None:
            if not self._val:
                return
            k = len(self._val[0])
            sums = self.all_gather(torch.stack(self._val).sum(0)).reshape(-1, k).sum(0)
            names = ("loss", "accuracy", "margin", "chosen_reward", "rejected_reward")
            self.log_dict({f"val_{name}": sums[i] / sums[-1] for i, name in enumerate(names)})
            self.last_val_step = self.trainer.global_step

    return DpoModule


def __getattr__(name: str) -> Any:
    if name == "DpoModule":
        return _module_class()
    raise AttributeError(name)


def run(settings: Settings, init_from: str | None = None, resume: bool = False) -> dict:
    """Align the SFT model on the preference pairs with DPO; returns run_id, model_uri, metrics, wall_s."""
    t_start = time.perf_counter()
    cfg = settings.dpo
    init_from = init_from or default_init_from(settings, STAGE)
    train_rows, val_rows = fd.preference_rows(settings, "train"), fd.preference_rows(settings, "val")
    ckpt, resume_id = prepare_checkpoints(settings, STAGE, resume)

    model, tokenizer = load_causal_lm(settings, init_from)
    ref, _ = load_causal_lm(settings, init_from, tokenizer=tokenizer)
    max_len = model.config.max_position_embeddings
    train, val = train_val_loaders(cfg, fd.PreferenceDataset, fd.PreferenceCollator(tokenizer.pad_token_id),
                                   train_rows, val_rows, tokenizer, max_len, resume_from=ckpt)
    model.train()  # from_pretrained returns eval mode; Lightning 2.6 keeps module modes as found
    module = _module_class()(model, ref, cfg)
    params = {"dpo": cfg.model_dump(mode="json"), "init_from": init_from, "n_params": count_parameters(model),
              "train_pairs": len(train_rows), "val_pairs": len(val_rows), "max_len": max_len}

    if not is_launch_rank_zero():  # extra DDP process: train only; rank zero owns the run and artifacts
        return fit_extra_rank(settings, cfg, STAGE, module, ckpt, train, val, t_start)

    import mlflow

    with fit_stage(settings, cfg, STAGE, module, ckpt, train, val, resume_id, params) as (run_id, trainer, metrics):
        mlflow.log_metrics({"final_val_accuracy": metrics["val_accuracy"], "final_val_margin": metrics["val_margin"]},
                           step=trainer.global_step)
        samples = [{"prompt": r["prompt"], "name": r.get("name", ""), "response": r["chosen"]}
                   for r in val_rows[:N_SAMPLES]]
        model_uri = finish_stage(run_id, hf_dir(settings, STAGE), model, tokenizer,
                                 ("train_loss", "val_loss", "train_margin", "val_margin"),
                                 "DPO loss and implicit-reward margin", parent_model_uri(settings, init_from),
                                 sample_prompts=samples, max_new_tokens=settings.evaluate.max_new_tokens)
    return {"run_id": run_id, "model_uri": model_uri, "hf_dir": str(hf_dir(settings, STAGE)), "metrics": metrics,
            "wall_s": time.perf_counter() - t_start}
