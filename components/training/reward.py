"""Reward stage: a scalar reward model trained on preference pairs (Bradley-Terry), for PPO.

LlamaForSequenceClassification(num_labels=1) initialised from the SFT weights (a fresh score head);
it reads the hidden state of the last non-pad token, so pad_token_id is set on its config. Each
batch scores chosen and rejected completions of the same prompts in one forward. Logged with the
text-classification task and registered as settings.registry.reward_model_name (llmcycle-reward).
"""
from __future__ import annotations

import functools
import time
from typing import Any

import torch

from components import tracking
from components.config import Settings, TrainConfig
from components.model.build import count_parameters
from components.training import finetune_data as fd
from components.training.losses import reward_pairwise_loss
from components.training.reporting import finish_stage
from components.training.stages import (default_init_from, fit_extra_rank, fit_stage, hf_dir, is_launch_rank_zero,
                                        local_model_dir, parent_model_uri, prepare_checkpoints, train_val_loaders)
from components.training.trainer import configure_adamw, cosine_with_warmup

STAGE = "reward"
N_SAMPLES = 8


def load_reward_model(settings: Settings, source: str) -> tuple[Any, Any]:
    """(LlamaForSequenceClassification with one output, tokenizer) from a causal-LM or reward folder/URI."""
    from transformers import LlamaForSequenceClassification

    from components.data.tokenizer import load_tokenizer

    folder = local_model_dir(settings, source)
    tokenizer = load_tokenizer(folder if (folder / "tokenizer.json").is_file() else settings)
    # pad_token_id decides which position is pooled: the last token that is not padding.
    model = LlamaForSequenceClassification.from_pretrained(
        str(folder), num_labels=1, pad_token_id=tokenizer.pad_token_id, local_files_only=True,
        attn_implementation="sdpa")
    return model, tokenizer


def score(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Scalar reward per row -> (B,); position ids follow the mask so left padding scores like none."""
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)        # (B, T)
    return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits[:, 0]


@functools.lru_cache(maxsize=None)
def _module_class() -> type:
    import lightning as L

    class RewardModule(L.LightningModule):
        """Pairwise (chosen > rejected) training of a sequence-scoring model."""

        def __init__(self, model: Any, cfg: TrainConfig):
            super().__init__()
            self.model, self.cfg = model, cfg
            self._val: list[torch.Tensor] = []
            self.last_val_step: int | None = None

        def configure_optimizers(self) -> dict:
            opt = configure_adamw(self.model, self.cfg)
            sched = cosine_with_warmup(opt, self.cfg.warmup_steps, self.cfg.max_steps, self.cfg.min_lr_ratio)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

        def _pair_scores(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
            scores = score(self.model, batch["input_ids"], batch["attention_mask"])   # (2B,)
            return scores.float().chunk(2)                                            # (B,), (B,)

        def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
            chosen, rejected = self._pair_scores(batch)
            loss, acc = reward_pairwise_loss(chosen, rejected)
            self.log_dict({"train_loss": loss, "train_accuracy": acc,
                           "train_margin": (chosen - rejected).mean().detach()},
                          batch_size=chosen.shape[0])  # no prog_bar: it would cost a host sync per batch
            self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"])
            return loss

        def on_validation_epoch_start(self) -> None:
            self._val = []

        def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
            chosen, rejected = self._pair_scores(batch)
            loss, acc = reward_pairwise_loss(chosen, rejected)
            n = float(chosen.shape[0])
            # Per-pair sums, so the val metrics weigh every pair once however batches fall.
            self._val.append(torch.stack([loss * n, acc * n, (chosen - rejected).sum(),
                                          torch.tensor(n, device=loss.device)]).detach())

        def on_validation_epoch_end(self) -> None:
            if not self._val:
                return
            loss_sum, acc_sum, margin_sum, n = self.all_gather(torch.stack(self._val).sum(0)).reshape(-1, 4).sum(0)
            self.log_dict({"val_loss": loss_sum / n, "val_accuracy": acc_sum / n, "val_margin": margin_sum / n})
            self.last_val_step = self.trainer.global_step

    return RewardModule


def __getattr__(name: str) -> Any:
    if name == "RewardModule":
        return _module_class()
    raise AttributeError(name)


@torch.no_grad()
def log_pair_scores(model: Any, tokenizer: Any, rows: list[dict], max_len: int) -> None:
    """Held-out pairs with both scores, as an MLflow table (what the reward model prefers, and by how much)."""
    import mlflow

    if not rows:
        return
    batch = fd.PreferenceCollator(tokenizer.pad_token_id)(list(fd.PreferenceDataset(rows, tokenizer, max_len)))
    model.eval()
    device = next(model.parameters()).device
    scores = score(model, batch["input_ids"].to(device), batch["attention_mask"].to(device)).float().cpu()
    chosen, rejected = scores.chunk(2)
    mlflow.log_table({"prompt": [r["prompt"] for r in rows], "kind": [r.get("kind", "") for r in rows],
                      "chosen": [r["chosen"] for r in rows], "rejected": [r["rejected"] for r in rows],
                      "chosen_score": chosen.tolist(), "rejected_score": rejected.tolist()},
                     artifact_file="samples/pair_scores.json")


def run(settings: Settings, init_from: str | None = None, resume: bool = False) -> dict:
    """Train the reward model on the preference pairs; returns run_id, model_uri, version, metrics, wall_s."""
    t_start = time.perf_counter()
    cfg = settings.reward
    init_from = init_from or default_init_from(settings, STAGE)
    train_rows, val_rows = fd.preference_rows(settings, "train"), fd.preference_rows(settings, "val")
    ckpt, resume_id = prepare_checkpoints(settings, STAGE, resume)

    model, tokenizer = load_reward_model(settings, init_from)
    max_len = model.config.max_position_embeddings
    train, val = train_val_loaders(cfg, fd.PreferenceDataset, fd.PreferenceCollator(tokenizer.pad_token_id),
                                   train_rows, val_rows, tokenizer, max_len, resume_from=ckpt)
    model.train()  # from_pretrained returns eval mode; Lightning 2.6 keeps module modes as found
    module = _module_class()(model, cfg)
    params = {"reward": cfg.model_dump(mode="json"), "init_from": init_from, "n_params": count_parameters(model),
              "train_pairs": len(train_rows), "val_pairs": len(val_rows), "max_len": max_len}

    if not is_launch_rank_zero():  # extra DDP process: train only; rank zero owns the run and artifacts
        return fit_extra_rank(settings, cfg, STAGE, module, ckpt, train, val, t_start)

    import mlflow

    with fit_stage(settings, cfg, STAGE, module, ckpt, train, val, resume_id, params) as (run_id, trainer, metrics):
        mlflow.log_metrics({"final_val_accuracy": metrics["val_accuracy"], "final_val_loss": metrics["val_loss"]},
                           step=trainer.global_step)
        log_pair_scores(model, tokenizer, val_rows[:N_SAMPLES], max_len)
        out = hf_dir(settings, STAGE)
        parent = parent_model_uri(settings, init_from)
        model_uri = finish_stage(run_id, out, model, tokenizer, ("train_loss", "val_loss", "val_accuracy"),
                                 "reward model: pairwise loss and accuracy", parent, task="text-classification")
        version = tracking.register_model(
            settings, model_uri, settings.registry.reward_model_name, stage=STAGE,
            description=f"reward model (val pairwise accuracy {metrics['val_accuracy']:.3f}) from {parent}")
        mlflow.set_tag("registered_version", str(version.version))
    return {"run_id": run_id, "model_uri": model_uri, "hf_dir": str(out), "registered_version": str(version.version),
            "metrics": metrics, "wall_s": time.perf_counter() - t_start}
