"""PPO stage: RLHF of the SFT policy against the reward model, with a KL leash to the frozen SFT model.

One iteration (our own step counter; Lightning's global_step counts optimizer steps): sample a
completion per prompt at temperature 1 (no top-k/p, so sampling and scoring share one distribution),
score it with the frozen reward model, per-token log-probs of policy and reference, KL-penalised
rewards, GAE, then ppo_epochs of minibatch updates of policy + value head (manual optimization).
Compromises: a fixed kl_coef (kl_target only triggers an early stop at 2x); the value head shares the
policy trunk and is not saved with the HF model.
"""
from __future__ import annotations

import functools
import time
from typing import Any

import torch
import torch.nn.functional as F

from components.config import PpoConfig, Settings
from components.errors import ConfigError
from components.model.build import count_parameters, load_causal_lm, stop_token_ids
from components.training import finetune_data as fd
from components.training.dpo import drop_frozen, freeze
from components.training.losses import (entropy_from_logits, gae, kl_penalized_rewards, masked_mean,
                                        masked_token_logprobs, masked_whiten, ppo_policy_loss, ppo_value_loss)
from components.training.reporting import finish_stage
from components.training.reward import load_reward_model, score
from components.training.stages import (default_init_from, final_metrics, hf_dir, is_launch_rank_zero,
                                        open_stage_run, parent_model_uri, prepare_checkpoints)
from components.training.trainer import (build_trainer, configure_adamw, cosine_with_warmup, fit, loader_options,
                                         to_training_device)

STAGE = "ppo"
N_SAMPLES = 8
FROZEN_PREFIXES = ("ref.", "reward_model.")
KL_STOP_FACTOR = 2.0  # stop when the rollout KL exceeds this multiple of kl_target


def reward_source(settings: Settings) -> str:
    """checkpoints/reward/hf, else the newest registered reward model; ConfigError when neither exists."""
    local = hf_dir(settings, "reward")
    if (local / "config.json").is_file():
        return str(local)
    from components import tracking
    tracking.configure(settings)
    import mlflow
    name = settings.registry.reward_model_name
    versions = mlflow.MlflowClient().search_model_versions(f"name='{name}'")
    if versions:
        return f"models:/{name}/{max(int(v.version) for v in versions)}"
    raise ConfigError(f"ppo: no reward model at {local} and none registered as {name!r}; "
                      "run `llmcycle train reward` first")


def response_mask(tokens: torch.Tensor, stop_ids: list[int]) -> torch.Tensor:
    """1 on generated tokens up to and including the first stop token, 0 after (padding) -> (B, N)."""
    is_stop = torch.isin(tokens, torch.tensor(stop_ids, device=tokens.device)).long()  # (B, N)
    ended_before = (is_stop.cumsum(-1) - is_stop) > 0                                  # (B, N)
    return (~ended_before).long()


@functools.lru_cache(maxsize=None)
def _module_class() -> type:
    import lightning as L
    from lightning.pytorch.utilities import rank_zero_warn

    class PpoModule(L.LightningModule):
        """Policy + value head trained with PPO; frozen reference and reward model ride along."""

        def __init__(self, policy: Any, ref: Any, reward_model: Any, tokenizer: Any, cfg: PpoConfig):
            super().__init__()
            self.policy, self.cfg = policy, cfg
            self.ref, self.reward_model = freeze(ref), freeze(reward_model)
            self.value_head = torch.nn.Linear(policy.config.hidden_size, 1)
            torch.nn.init.zeros_(self.value_head.weight)  # V = 0 at the start: early advantages = rewards
            torch.nn.init.zeros_(self.value_head.bias)
            self.stop_ids = stop_token_ids(tokenizer)
            self.pad_id = tokenizer.pad_token_id
            self.automatic_optimization = False  # rollouts + several minibatch updates per batch
            self.strict_loading = False          # frozen models are not checkpointed
            self.iteration = 0                   # own step counter: PPO iterations, saved in checkpoints
            self.kl_stopped = False

        def configure_optimizers(self) -> dict:
            opt = configure_adamw(self, self.cfg)  # policy + value head: the frozen models need no grad
            sched = cosine_with_warmup(opt, self.cfg.warmup_steps, self.cfg.max_steps, self.cfg.min_lr_ratio)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

        def on_save_checkpoint(self, checkpoint: dict) -> None:
            drop_frozen(checkpoint, FROZEN_PREFIXES)
            checkpoint["ppo_iteration"] = self.iteration

        def on_load_checkpoint(self, checkpoint: dict) -> None:
            self.iteration = int(checkpoint.get("ppo_iteration", 0))

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    action_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            """(logprobs, values, logits): logprobs/values (B, T) aligned with input_ids, logits (B, T, V)."""
            position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)            # (B, T) left padding
            hidden = self.policy.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                               position_ids=position_ids).last_hidden_state  # (B, T, C)
            logits = self.policy.get_output_embeddings()(hidden)                   # (B, T, V)
            logprobs = masked_token_logprobs(logits, input_ids, action_mask)       # (B, T)
            # V_t must be the value of the state before token t is chosen, i.e. read at t - 1.
            values = F.pad(self.value_head(hidden).squeeze(-1).float()[:, :-1], (1, 0))  # (B, T)
            return logprobs, values * action_mask, logits

        @torch.no_grad()
        def rollout(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
            """Sample, score and build advantages for one batch of left-padded prompts."""
            from transformers import GenerationConfig

            prompt_ids, prompt_mask = batch["input_ids"], batch["attention_mask"]  # (B, P)
            gen_config = GenerationConfig(
                do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=self.cfg.max_new_tokens,
                eos_token_id=self.stop_ids, pad_token_id=self.pad_id, use_cache=True,
                suppress_tokens=[self.pad_id])  # a sampled pad would read as the end of the sequence
            was_training = self.policy.training
            self.policy.eval()
            seqs = self.policy.generate(input_ids=prompt_ids, attention_mask=prompt_mask,
                                        generation_config=gen_config)             # (B, P + N)
            self.policy.train(was_training)
            P = prompt_ids.shape[1]
            resp = response_mask(seqs[:, P:], self.stop_ids)                       # (B, N)
            attention_mask = torch.cat([prompt_mask, resp], dim=1)                 # (B, T)
            action_mask = torch.cat([torch.zeros_like(prompt_mask), resp], dim=1)  # (B, T) scored tokens
            logprobs, values, _ = self(seqs, attention_mask, action_mask)          # (B, T), (B, T)
            position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)
            ref_logits = self.ref(input_ids=seqs, attention_mask=attention_mask, position_ids=position_ids).logits
            ref_logprobs = masked_token_logprobs(ref_logits, seqs, action_mask)    # (B, T)
            scores = score(self.reward_model, seqs, attention_mask).float()        # (B,)
            rewards, kl = kl_penalized_rewards(logprobs, ref_logprobs, scores, action_mask, self.cfg.kl_coef)
            advantages, returns = gae(rewards, values, action_mask, self.cfg.gamma, self.cfg.lam)
            return {"input_ids": seqs, "attention_mask": attention_mask, "action_mask": action_mask,
                    "logprobs": logprobs, "values": values, "returns": returns,
                    "advantages": masked_whiten(advantages, action_mask), "scores": scores, "kl": kl}

        def losses(self, roll: dict[str, torch.Tensor], idx: torch.Tensor) -> dict[str, torch.Tensor]:
            """PPO losses of the minibatch rows idx under the current policy (differentiable 'loss')."""
            mask = roll["action_mask"][idx]                                          # (b, T)
            logprobs, values, logits = self(roll["input_ids"][idx], roll["attention_mask"][idx], mask)
            pg_loss, clip_fraction = ppo_policy_loss(logprobs, roll["logprobs"][idx], roll["advantages"][idx],
                                                     mask, self.cfg.clip_range)
            vf_loss = ppo_value_loss(values, roll["values"][idx], roll["returns"][idx], mask, self.cfg.value_clip)
            entropy = entropy_from_logits(logits[:, :-1], mask[:, 1:])  # logits at t-1 choose token t
            loss = pg_loss + self.cfg.vf_coef * vf_loss - self.cfg.ent_coef * entropy
            ratio = masked_mean(torch.exp(logprobs - roll["logprobs"][idx]), mask)
            return {"loss": loss, "policy_loss": pg_loss, "value_loss": vf_loss, "entropy": entropy,
                    "clip_fraction": clip_fraction, "ratio": ratio}

        def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
            if self.iteration >= self.cfg.max_steps:  # a resumed run that had already finished
                self.trainer.should_stop = True
                return None
            roll = self.rollout(batch)
            stats = {"score": roll["scores"].mean(), "kl": roll["kl"].mean(),
                     "response_length": roll["action_mask"].sum(-1).float().mean()}
            # One read per iteration decides the early stop (the rollout's generate has synced already).
            kl = float(stats["kl"])
            if kl > KL_STOP_FACTOR * self.cfg.kl_target:
                rank_zero_warn(f"ppo: KL to the SFT model {kl:.3f} exceeds {KL_STOP_FACTOR}x kl_target "
                               f"({self.cfg.kl_target}); stopping at iteration {self.iteration}")
                self.kl_stopped = True
                values = dict(zip(stats, torch.stack(list(stats.values())).tolist()))
                self.log_dict({**values, "kl_early_stop": 1.0}, prog_bar=True)  # same flags as below: Lightning insists
                self.trainer.should_stop = True
                return None
            opt, sched = self.optimizers(), self.lr_schedulers()
            B = roll["input_ids"].shape[0]
            mb = min(self.cfg.batch_size, B)
            sums: dict[str, torch.Tensor] = {}
            n = 0
            for _ in range(self.cfg.ppo_epochs):
                for idx in torch.randperm(B, device=self.device).split(mb):
                    out = self.losses(roll, idx)
                    opt.zero_grad()
                    self.manual_backward(out["loss"])
                    opt.step()  # clipped by the trainer's GradClip callback, after the scaler's unscale_
                    for key, value in out.items():  # summed on the device: no host read per minibatch
                        sums[key] = sums[key] + value.detach() if key in sums else value.detach()
                    n += 1
            sched.step()
            self.iteration += 1
            # The iteration's one transfer: rollout stats and minibatch means together.
            names = [*stats, *(("train_loss" if k == "loss" else k) for k in sums)]
            values = torch.stack([*(v.float() for v in stats.values()),
                                  *(v.float() / n for v in sums.values())]).tolist()
            # Python floats: prog_bar costs nothing more, the bar shows the iteration's figures.
            self.log_dict({**dict(zip(names, values)), "kl_early_stop": 0.0, "ppo_iteration": float(self.iteration),
                           "lr": opt.param_groups[0]["lr"]}, prog_bar=True)
            if self.iteration >= self.cfg.max_steps:
                self.trainer.should_stop = True
            return None

    return PpoModule


def __getattr__(name: str) -> Any:
    if name == "PpoModule":
        return _module_class()
    raise AttributeError(name)


def run(settings: Settings, init_from: str | None = None, resume: bool = False) -> dict:
    """PPO of the SFT policy against the reward model; returns run_id, model_uri, metrics, wall_s."""
    t_start = time.perf_counter()
    cfg = settings.ppo
    init_from = init_from or default_init_from(settings, STAGE)
    reward_from = reward_source(settings)
    rows, val_rows = fd.sft_rows(settings, "train"), fd.sft_rows(settings, "val")
    ckpt, resume_id = prepare_checkpoints(settings, STAGE, resume)

    policy, tokenizer = load_causal_lm(settings, init_from)
    ref, _ = load_causal_lm(settings, init_from, tokenizer=tokenizer)
    reward_model, _ = load_reward_model(settings, reward_from)
    block = policy.config.max_position_embeddings
    if cfg.max_new_tokens >= block:
        raise ConfigError(f"ppo.max_new_tokens ({cfg.max_new_tokens}) must be below the context ({block})")
    prompts = fd.PromptDataset(rows, tokenizer, max_prompt_len=block - cfg.max_new_tokens)
    train = fd.loader(prompts, cfg.rollout_batch, fd.PromptCollator(tokenizer.pad_token_id), True, cfg.seed,
                      **loader_options(cfg.accelerator, cfg.num_workers))
    policy.train()  # from_pretrained returns eval mode; Lightning 2.6 keeps module modes as found
    module = _module_class()(policy, ref, reward_model, tokenizer, cfg)
    params = {"ppo": cfg.model_dump(mode="json"), "init_from": init_from, "reward_model": reward_from,
              "n_params": count_parameters(policy), "prompts": len(rows)}
    # Manual optimization: Lightning must not count our steps (the module stops itself); the trainer's
    # GradClip callback clips inside each opt.step(), after the scaler's unscale_.
    overrides = dict(max_steps=-1, max_epochs=-1, limit_val_batches=0)

    if not is_launch_rank_zero():
        fit(build_trainer(settings, cfg, STAGE, run_id=None, **overrides), module, ckpt_path=ckpt,
            train_dataloaders=train)
        return {"run_id": None, "model_uri": None, "metrics": {}, "wall_s": time.perf_counter() - t_start}

    import mlflow

    with open_stage_run(settings, STAGE, resume_id, params) as run_id:
        trainer = build_trainer(settings, cfg, STAGE, run_id, **overrides)
        fit(trainer, module, ckpt_path=ckpt, train_dataloaders=train)
        to_training_device(trainer, module)  # teardown left it on the CPU: samples run on the GPU
        outcome = {"ppo_iterations": module.iteration, "kl_early_stop": float(module.kl_stopped)}
        metrics = final_metrics(trainer, outcome)
        mlflow.log_metrics(outcome, step=trainer.global_step)
        model_uri = finish_stage(run_id, hf_dir(settings, STAGE), policy, tokenizer, ("score", "kl", "train_loss"),
                                 "PPO: reward-model score, KL to SFT, total loss",
                                 parent_model_uri(settings, init_from), sample_prompts=val_rows[:N_SAMPLES],
                                 max_new_tokens=settings.evaluate.max_new_tokens)
    return {"run_id": run_id, "model_uri": model_uri, "hf_dir": str(hf_dir(settings, STAGE)), "metrics": metrics,
            "wall_s": time.perf_counter() - t_start}
