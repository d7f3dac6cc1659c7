"""Every loss against values worked out by hand on tensors small enough to check on paper."""
from __future__ import annotations

import math

import pytest
import torch

from components.training import losses as L


def close(a, b, tol=1e-5):
    return abs(float(a) - float(b)) < tol


def test_masked_mean_ignores_masked_entries_and_empty_mask_is_zero():
    x = torch.tensor([[1.0, 2.0, 100.0]])
    assert close(L.masked_mean(x, torch.tensor([[1, 1, 0]])), 1.5)
    assert close(L.masked_mean(x, torch.zeros(1, 3)), 0.0)
    assert torch.allclose(L.masked_mean(torch.tensor([[1.0, 3.0], [2.0, 9.0]]), torch.tensor([[1, 1], [1, 0]]), dim=1),
                          torch.tensor([2.0, 2.0]))


def test_masked_whiten_has_zero_mean_unit_variance_on_the_mask():
    x = torch.tensor([[1.0, 3.0, 50.0]])
    m = torch.tensor([[1, 1, 0]])
    w = L.masked_whiten(x, m)
    assert torch.allclose(w, torch.tensor([[-1.0, 1.0, 0.0]]), atol=1e-4)  # mean 2, std 1


def test_causal_lm_loss_uniform_and_peaked_and_ignored():
    # Uniform logits over V=4: every token costs log 4.
    assert close(L.causal_lm_loss(torch.zeros(2, 3, 4), torch.randint(0, 4, (2, 3))), math.log(4))
    # logits (2, 0) with target 0: -log(e^2 / (e^2 + 1)) = log(1 + e^-2).
    logits = torch.tensor([[[2.0, 0.0], [0.0, 0.0]]])
    targets = torch.tensor([[0, -100]])
    assert close(L.causal_lm_loss(logits, targets), math.log(1 + math.exp(-2)))
    # Both positions counted: (log(1 + e^-2) + log 2) / 2.
    assert close(L.causal_lm_loss(logits, torch.tensor([[0, 1]])), (math.log(1 + math.exp(-2)) + math.log(2)) / 2)


def test_masked_token_logprobs_shift_convention():
    # logits[:, t] predict labels[:, t + 1]; output aligned with labels, column 0 always 0.
    logits = torch.tensor([[[1.0, 0.0], [0.0, 3.0], [9.0, 9.0]]])           # (1, 3, 2)
    labels = torch.tensor([[1, 0, 1]])
    out = L.masked_token_logprobs(logits, labels, torch.ones(1, 3))
    lp1 = 1.0 - math.log(math.exp(1.0) + 1.0)       # position 0 predicts labels[1] = 0: log softmax([1, 0])[0]
    lp2 = 3.0 - math.log(1.0 + math.exp(3.0))       # position 1 predicts labels[2] = 1: log softmax([0, 3])[1]
    assert out.shape == (1, 3)
    assert torch.allclose(out, torch.tensor([[0.0, lp1, lp2]]), atol=1e-5)
    masked = L.masked_token_logprobs(logits, labels, torch.tensor([[1, 0, 1]]))
    assert torch.allclose(masked, torch.tensor([[0.0, 0.0, lp2]]), atol=1e-5)


def test_sft_loss_counts_response_tokens_only():
    logits = torch.tensor([[[1.0, 0.0], [0.0, 3.0], [9.0, 9.0]]])
    ids = torch.tensor([[1, 0, 1]])
    # Only the last token is a response token: loss = -log softmax([0, 3])[1] = log(1 + e^-3).
    assert close(L.sft_loss(logits, ids, torch.tensor([[0, 0, 1]])), math.log(1 + math.exp(-3)))
    # Two response tokens: the mean of both NLLs.
    both = (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(-3))) / 2
    assert close(L.sft_loss(logits, ids, torch.tensor([[0, 1, 1]])), both)


def test_entropy_from_logits():
    logits = torch.zeros(1, 2, 4)
    logits[0, 1] = torch.tensor([100.0, 0.0, 0.0, 0.0])                     # ~one-hot: entropy ~0
    assert close(L.entropy_from_logits(logits, torch.tensor([[1, 0]])), math.log(4))
    assert close(L.entropy_from_logits(logits, torch.tensor([[1, 1]])), math.log(4) / 2, tol=1e-4)


def test_reward_pairwise_loss_bradley_terry():
    loss, acc = L.reward_pairwise_loss(torch.tensor([1.0]), torch.tensor([0.0]))
    assert close(loss, math.log(1 + math.exp(-1)))
    assert close(acc, 1.0)
    loss, acc = L.reward_pairwise_loss(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0]))
    assert close(loss, (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(2))) / 2)
    assert close(acc, 0.5)


def test_dpo_loss_sigmoid_form():
    out = L.dpo_loss(torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-1.5]), torch.tensor([-1.5]), beta=0.1)
    # chosen log-ratio 0.5, rejected -0.5: loss = -log sigmoid(0.1 * 1.0) = log(1 + e^-0.1)
    assert close(out.loss, math.log(1 + math.exp(-0.1)))
    assert close(out.chosen_rewards[0], 0.05) and close(out.rejected_rewards[0], -0.05)
    assert close(out.margin, 0.1) and close(out.accuracy, 1.0)
    # Policy == reference: loss is log 2, rewards zero.
    z = torch.tensor([-3.0, -4.0])
    same = L.dpo_loss(z, z, z, z, beta=0.5)
    assert close(same.loss, math.log(2)) and close(same.margin, 0.0)


def test_dpo_loss_with_the_chosen_nll_term_by_hand():
    # Two pairs; chosen sequence logps -6 (3 tokens) and -4 (2 tokens): per-token NLL 2 and 2, mean 2.
    pc, pr = torch.tensor([-6.0, -4.0]), torch.tensor([-7.0, -5.0])
    ref = torch.tensor([-6.5, -4.5])
    plain = L.dpo_loss(pc, pr, ref, ref, beta=0.1)
    rpo = L.dpo_loss(pc, pr, ref, ref, beta=0.1, nll_weight=0.5, chosen_tokens=torch.tensor([3, 2]))
    assert close(plain.loss, math.log(1 + math.exp(-0.1)))           # both margins 1.0
    assert close(rpo.loss, plain.loss + 0.5 * 2.0)
    assert close(rpo.margin, plain.margin)                            # rewards unchanged by the NLL term
    with pytest.raises(ValueError, match="chosen_tokens"):
        L.dpo_loss(pc, pr, ref, ref, beta=0.1, nll_weight=1.0)


def test_dpo_loss_gradient_flows_to_policy_only():
    pc = torch.tensor([-1.0], requires_grad=True)
    pr = torch.tensor([-2.0], requires_grad=True)
    out = L.dpo_loss(pc, pr, torch.tensor([-1.5]), torch.tensor([-1.5]), beta=0.1)
    out.loss.backward()
    # d/dpc -log sigmoid(beta * (pc - pr + ...)) = -beta * sigmoid(-beta * 1.0)
    assert close(pc.grad[0], -0.1 * (1 / (1 + math.exp(0.1))))
    assert close(pr.grad[0], 0.1 * (1 / (1 + math.exp(0.1))))
    assert not out.chosen_rewards.requires_grad


def test_kl_penalized_rewards_score_at_last_valid_token():
    logprobs = torch.tensor([[-1.0, -2.0, 0.0], [-1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.5, -1.0, 0.0], [-1.0, -1.0, -1.0]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    rewards, kl = L.kl_penalized_rewards(logprobs, ref, torch.tensor([2.0, 5.0]), mask, kl_coef=0.1)
    # row 0: kl per token (0.5, -1.0, 0); rewards (-0.05, +0.1 + 2.0, 0). row 1: empty mask, no score.
    assert torch.allclose(rewards, torch.tensor([[-0.05, 2.1, 0.0], [0.0, 0.0, 0.0]]), atol=1e-6)
    assert torch.allclose(kl, torch.tensor([-0.5, 0.0]))


def test_gae_hand_computed():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.5, 0.5]])
    adv, ret = L.gae(rewards, values, torch.ones(1, 3), gamma=0.9, lam=0.8)
    # t=2: delta = 1 - 0.5 = 0.5, A = 0.5
    # t=1: delta = 0 + 0.9 * 0.5 - 0.5 = -0.05, A = -0.05 + 0.72 * 0.5 = 0.31
    # t=0: delta = -0.05, A = -0.05 + 0.72 * 0.31 = 0.1732
    assert torch.allclose(adv, torch.tensor([[0.1732, 0.31, 0.5]]), atol=1e-5)
    assert torch.allclose(ret, adv + values)
    # gamma = lam = 1: every advantage is the final reward minus the value.
    adv1, _ = L.gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=1.0)
    assert torch.allclose(adv1, torch.full((1, 3), 0.5))


def test_gae_stops_at_the_mask():
    rewards = torch.tensor([[0.0, 1.0, 7.0]])
    values = torch.tensor([[0.2, 0.4, 9.0]])
    adv, ret = L.gae(rewards, values, torch.tensor([[0, 1, 0]]), gamma=1.0, lam=1.0)
    # Only position 1 counts; nothing bootstraps from the padded position 2: A = 1 - 0.4.
    assert torch.allclose(adv, torch.tensor([[0.0, 0.6, 0.0]]), atol=1e-6)
    assert torch.allclose(ret, torch.tensor([[0.0, 1.0, 0.0]]), atol=1e-6)


def test_ppo_policy_loss_clipping():
    logprobs = torch.tensor([[math.log(1.5), 0.0, 5.0]])
    old = torch.zeros(1, 3)
    adv = torch.tensor([[1.0, -1.0, 3.0]])
    loss, clip_frac = L.ppo_policy_loss(logprobs, old, adv, torch.tensor([[1, 1, 0]]), clip_range=0.2)
    # token 0: ratio 1.5, A=1: max(-1.5, -1.2) = -1.2 (clipped); token 1: ratio 1, A=-1: 1 (not clipped)
    assert close(loss, (-1.2 + 1.0) / 2)
    assert close(clip_frac, 0.5)


def test_ppo_value_loss_clipping():
    # v=1 moved 1.0 from old 0.0; clipped to 0.2: max((1-1)^2, (0.2-1)^2) = 0.64 -> 0.5 * 0.64
    loss = L.ppo_value_loss(torch.tensor([[1.0, 3.0]]), torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, 0.0]]),
                            torch.tensor([[1, 0]]), clip_range=0.2)
    assert close(loss, 0.32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_lm_losses_compute_in_float32(dtype):
    logits = torch.zeros(1, 2, 4, dtype=dtype)
    assert L.causal_lm_loss(logits, torch.tensor([[1, 2]])).dtype == torch.float32
    assert L.masked_token_logprobs(logits, torch.tensor([[1, 2]]), torch.ones(1, 2)).dtype == torch.float32
