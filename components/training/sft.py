"""SFT stage: supervised fine-tuning on (prompt, response) pairs, loss on the response tokens only.

Starts from the pretrained HF folder (or any init_from), optionally through a LoRA adapter (peft,
merged back before logging so the next stage gets a plain model). One MLflow run `sft` with train
loss, val loss and val response perplexity, the loss curve, sample generations and the logged model.
The module class is built on first use, so importing this file does not import lightning.
"""
from __future__ import annotations

import functools
import math
import time
from typing import Any

import torch

from components.config import LoraConfig, Settings, TrainConfig
from components.model.build import count_parameters, load_causal_lm
from components.training import finetune_data as fd
from components.training.losses import masked_token_logprobs, sft_loss
from components.training.reporting import finish_stage
from components.training.stages import (default_init_from, fit_extra_rank, fit_stage, hf_dir, is_launch_rank_zero,
                                        parent_model_uri, prepare_checkpoints, train_val_loaders)
from components.training.trainer import configure_adamw, cosine_with_warmup

STAGE = "sft"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
N_SAMPLES = 8


def apply_lora(model: Any, lora: LoraConfig) -> Any:
    """Wrap a local causal LM in a LoRA adapter on the attention projections (base weights frozen)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    config = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                            target_modules=LORA_TARGETS, bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


@functools.lru_cache(maxsize=None)
def _module_class() -> type:
    import lightning as L

    class SftModule(L.LightningModule):
        """Response-only next-token training of a HF causal LM (plain or peft-wrapped)."""

        def __init__(self, model: Any, cfg: TrainConfig):
            super().__init__()
            self.model, self.cfg = model, cfg
            self._val_nll: list[torch.Tensor] = []
            self._val_tokens: list[torch.Tensor] = []
            self.last_val_step: int | None = None

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.model(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, T, V)

        def configure_optimizers(self) -> dict:
            opt = configure_adamw(self.model, self.cfg)  # only requires_grad params: LoRA trains the adapter
            sched = cosine_with_warmup(opt, self.cfg.warmup_steps, self.cfg.max_steps, self.cfg.min_lr_ratio)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

        def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
            logits = self(batch["input_ids"], batch["attention_mask"])              # (B, T, V)
            loss = sft_loss(logits, batch["input_ids"], batch["response_mask"])
            # No prog_bar: Lightning would .item() it every batch (NonFiniteGuard feeds the bar instead).
            self.log("train_loss", loss, batch_size=batch["input_ids"].shape[0])
            self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"])
            return loss

        def on_validation_epoch_start(self) -> None:
            self._val_nll, self._val_tokens = [], []

        def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
            logits = self(batch["input_ids"], batch["attention_mask"])              # (B, T, V)
            logps = masked_token_logprobs(logits, batch["input_ids"], batch["response_mask"])  # (B, T)
            # Sums, not batch means: perplexity is per response token over the whole val set.
            self._val_nll.append(-logps.sum().detach())
            self._val_tokens.append(batch["response_mask"][:, 1:].sum().to(logps.dtype))

        def on_validation_epoch_end(self) -> None:
            if not self._val_nll:
                return
            nll = self.all_gather(torch.stack(self._val_nll).sum()).sum()
            tokens = self.all_gather(torch.stack(self._val_tokens).sum()).sum().clamp_min(1.0)
            loss = nll / tokens
            self.log_dict({"val_loss": loss, "val_response_ppl": torch.exp(loss)})
            self.last_val_step = self.trainer.global_step

    return SftModule


def __getattr__(name: str) -> Any:
    if name == "SftModule":  # `from components.training.sft import SftModule` builds it lazily
        return _module_class()
    raise AttributeError(name)


def run(settings: Settings, init_from: str | None = None, resume: bool = False) -> dict:
    """Fine-tune on the SFT pairs; returns run_id, model_uri, hf_dir, final metrics and wall_s."""
    t_start = time.perf_counter()
    cfg = settings.sft
    init_from = init_from or default_init_from(settings, STAGE)
    train_rows, val_rows = fd.sft_rows(settings, "train"), fd.sft_rows(settings, "val")
    ckpt, resume_id = prepare_checkpoints(settings, STAGE, resume)

    model, tokenizer = load_causal_lm(settings, init_from)
    max_len = model.config.max_position_embeddings
    train, val = train_val_loaders(cfg, fd.SftDataset, fd.SftCollator(tokenizer.pad_token_id),
                                   train_rows, val_rows, tokenizer, max_len, resume_from=ckpt)
    n_params = count_parameters(model)
    if cfg.lora.enabled:
        model = apply_lora(model, cfg.lora)
    # from_pretrained hands back eval mode and Lightning 2.6 keeps each module's mode: dropout
    # (LoRA's included) would silently stay off.
    model.train()
    module = _module_class()(model, cfg)
    params = {"sft": cfg.model_dump(mode="json"), "init_from": init_from, "n_params": n_params,
              "n_trainable": count_parameters(model, trainable_only=True),
              "train_pairs": len(train_rows), "val_pairs": len(val_rows), "max_len": max_len}

    if not is_launch_rank_zero():  # extra DDP process: train only; rank zero owns the run and artifacts
        return fit_extra_rank(settings, cfg, STAGE, module, ckpt, train, val, t_start)

    import mlflow

    with fit_stage(settings, cfg, STAGE, module, ckpt, train, val, resume_id, params,
                   extra={"n_params": n_params}) as (run_id, trainer, metrics):
        mlflow.log_metrics({"final_val_loss": metrics["val_loss"],
                            "final_val_response_ppl": math.exp(metrics["val_loss"])}, step=trainer.global_step)
        # Fold the adapter into the base weights: the next stage and serving see a plain LlamaForCausalLM.
        final = module.model.merge_and_unload() if cfg.lora.enabled else module.model
        model_uri = finish_stage(run_id, hf_dir(settings, STAGE), final, tokenizer, ("train_loss", "val_loss"),
                                 "SFT loss (response tokens, nats/token)", parent_model_uri(settings, init_from),
                                 sample_prompts=val_rows[:N_SAMPLES],
                                 max_new_tokens=settings.evaluate.max_new_tokens)
    return {"run_id": run_id, "model_uri": model_uri, "hf_dir": str(hf_dir(settings, STAGE)), "metrics": metrics,
            "wall_s": time.perf_counter() - t_start}
