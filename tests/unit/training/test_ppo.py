"""PPO on a tiny model: rollout sanity (policy == reference -> KL 0, ratio 1), the stage run, KL early stop.

The reward model is the tiny pretrained model with a fresh one-output head (saved where the reward
stage would put it), so these tests do not pay for a reward-stage run.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from components import config as cfg
from components.data import layout
from tests.unit.training.test_finetune_stages import check_run, make_project, moved, weights


def make_ppo_project(root: Path, extra: dict | None = None) -> cfg.Settings:
    from components.training.reward import load_reward_model

    settings = make_project(root, extra)
    start = str(layout.checkpoints_dir(settings, "pretrain") / "hf")
    model, tok = load_reward_model(settings, start)
    out = layout.checkpoints_dir(settings, "reward") / "hf"
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return settings


def test_response_mask_ends_at_the_first_stop():
    from components.training.ppo import response_mask

    tokens = torch.tensor([[5, 9, 1, 1], [5, 6, 7, 8], [9, 9, 1, 1]])       # 9 = stop, 1 = pad
    assert response_mask(tokens, [9]).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]


def test_first_rollout_has_zero_kl_and_unit_ratio(tiny_root):
    from components.model.build import load_causal_lm
    from components.training import finetune_data as fd
    from components.training.ppo import _module_class
    from components.training.reward import load_reward_model

    settings = make_ppo_project(tiny_root)
    start = str(layout.checkpoints_dir(settings, "pretrain") / "hf")
    policy, tok = load_causal_lm(settings, start)
    ref, _ = load_causal_lm(settings, start, tokenizer=tok)
    reward_model, _ = load_reward_model(settings, str(layout.checkpoints_dir(settings, "reward") / "hf"))
    module = _module_class()(policy, ref, reward_model, tok, settings.ppo)
    rows = fd.sft_rows(settings, "train")[:3]
    batch = fd.PromptCollator(tok.pad_token_id)(list(fd.PromptDataset(rows, tok, max_prompt_len=40)))
    torch.manual_seed(0)
    roll = module.rollout(batch)

    B, P = batch["input_ids"].shape
    T = roll["input_ids"].shape[1]
    assert P < T <= P + settings.ppo.max_new_tokens
    assert roll["action_mask"][:, :P].sum() == 0 and (roll["action_mask"][:, P:].sum(-1) >= 1).all()
    assert torch.equal(roll["input_ids"][:, :P], batch["input_ids"])
    assert (roll["logprobs"][roll["action_mask"] == 0] == 0).all()
    assert (roll["logprobs"][roll["action_mask"] == 1] < 0).all()
    # The policy is the reference: the KL penalty is zero, and the whole reward is the score.
    assert roll["kl"].abs().max() < 1e-5
    assert roll["scores"].shape == (B,)
    # Before any update, new and old log-probs agree: ratio 1, nothing clipped.
    out = module.losses(roll, torch.arange(B))
    assert abs(float(out["ratio"].detach()) - 1.0) < 1e-5 and float(out["clip_fraction"]) == 0.0
    assert torch.isfinite(out["loss"]) and out["loss"].requires_grad
    assert float(out["entropy"]) > 0


def test_ppo_stage_updates_policy_and_logs(tiny_root):
    from components.training import ppo

    settings = make_ppo_project(tiny_root)
    start = layout.checkpoints_dir(settings, "pretrain") / "hf"
    result = ppo.run(settings, init_from=str(start))
    check_run(settings, result, "ppo", ("score", "kl", "clip_fraction", "entropy", "value_loss", "policy_loss",
                                        "train_loss", "ppo_iteration", "kl_early_stop"))
    assert result["metrics"]["ppo_iterations"] == settings.ppo.max_steps
    assert result["metrics"]["kl_early_stop"] == 0.0
    # Lightning's global_step counts optimizer steps: ppo_epochs x minibatches per iteration.
    minibatches = -(-settings.ppo.rollout_batch // settings.ppo.batch_size)
    assert result["metrics"]["steps"] == settings.ppo.max_steps * settings.ppo.ppo_epochs * minibatches
    assert moved(weights(start), weights(Path(result["hf_dir"])), "self_attn.q_proj")


@pytest.mark.slow
def test_ppo_stops_early_when_kl_runs_away(tiny_root):
    from components.training import ppo

    # A target no real update can meet: the first iteration (KL 0) trains, a later rollout stops
    # (which one depends on the samples: the per-sample KL estimate can come out negative).
    settings = make_ppo_project(tiny_root, {"ppo": {"kl_target": 1e-9, "max_steps": 4}})
    result = ppo.run(settings, init_from=str(layout.checkpoints_dir(settings, "pretrain") / "hf"))
    assert result["metrics"]["kl_early_stop"] == 1.0
    assert 1 <= result["metrics"]["ppo_iterations"] < 4


@pytest.mark.slow
def test_finetune_ppo_chain_runs_sft_reward_ppo(tiny_root):
    from components.training.stages import finetune
    from tests.unit.training.test_finetune_stages import stage_run

    settings = make_project(tiny_root, {"finetune": {"method": "ppo"}})
    out = finetune(settings)
    assert list(out["stages"]) == ["sft", "reward", "ppo"]
    sft, reward, ppo = (out["stages"][k] for k in ("sft", "reward", "ppo"))
    run = check_run(settings, ppo, "ppo", ("score", "kl", "policy_loss", "value_loss"))
    assert run.data.tags["parent_model_uri"] == sft["model_uri"]
    assert run.data.params["reward_model"] == reward["hf_dir"]
    assert stage_run(settings, reward["run_id"]).data.tags["parent_model_uri"] == sft["model_uri"]
    assert out["model_uri"] == ppo["model_uri"]
