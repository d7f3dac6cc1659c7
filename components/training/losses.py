"""Every loss of every training stage, as pure functions of tensors (no modules, no state).

Pretraining, SFT, reward modelling, DPO and PPO all live here so each formula is written once,
documented in its docstring and tested against values computed by hand. Log-probabilities are
computed in float32 whatever the model's dtype: bf16 log-softmax over a large vocab loses the margin.
Shift convention (masked_token_logprobs): logits[:, t] predict labels[:, t + 1].
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """sum(x * m) / sum(m) over all elements (or along dim); 0 where the mask is empty."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp_min(1.0)
    return (x * mask).sum(dim) / mask.sum(dim).clamp_min(1.0)


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(x - mean) / std over the masked entries (PPO advantage normalisation); masked-out entries -> 0."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)


# ----------------------------------------------------------------------------- language modelling
def causal_lm_loss(logits: Tensor, targets: Tensor, ignore_index: int = -100) -> Tensor:
    """Next-token cross-entropy, already aligned: targets[b, t] is the token that follows position t.

    loss = -1/N * sum_{b,t: y != ignore} log softmax(logits[b, t])[targets[b, t]]
    (the data pipeline yields (B, T+1) windows and splits them into x = w[:, :-1], y = w[:, 1:]).
    """
    B, T, V = logits.shape
    return F.cross_entropy(logits.reshape(B * T, V).float(), targets.reshape(B * T), ignore_index=ignore_index)


def masked_token_logprobs(logits: Tensor, labels: Tensor, mask: Tensor) -> Tensor:
    """Per-token log p(labels[b, t] | labels[b, <t]) aligned with labels, zero where not scored.

    out[b, t] = mask[b, t] * log softmax(logits[b, t - 1])[labels[b, t]]  for t >= 1,  out[b, 0] = 0
    The logits at the last position predict nothing (no next label), the label at position 0 has no
    prediction; so the output keeps the labels' (B, T) shape and the mask lines up with input_ids.
    """
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)                # (B, T-1, V)
    picked = logp.gather(-1, labels[:, 1:].unsqueeze(-1)).squeeze(-1)      # (B, T-1)
    picked = F.pad(picked, (1, 0))                                          # (B, T): column 0 unpredicted
    valid = mask.to(picked.dtype).clone()
    valid[:, 0] = 0.0
    return picked * valid


def sft_loss(logits: Tensor, input_ids: Tensor, response_mask: Tensor) -> Tensor:
    """Mean negative log-likelihood of the response tokens only (prompt tokens carry no loss).

    loss = -sum_{b,t} m[b,t] * log p(x[b,t] | x[b,<t]) / sum_{b,t>=1} m[b,t]
    """
    logps = masked_token_logprobs(logits, input_ids, response_mask)        # (B, T)
    n = response_mask[:, 1:].to(logps.dtype).sum().clamp_min(1.0)
    return -logps.sum() / n


def entropy_from_logits(logits: Tensor, mask: Tensor) -> Tensor:
    """Mean token entropy of the predictive distribution over the masked positions.

    H[b, t] = logsumexp(z) - sum_v softmax(z)_v * z_v  with z = logits[b, t];  result = masked_mean(H, mask)
    """
    z = logits.float()
    H = torch.logsumexp(z, dim=-1) - (torch.softmax(z, dim=-1) * z).sum(-1)  # (B, T)
    return masked_mean(H, mask)


# ----------------------------------------------------------------------------- preference learning
def reward_pairwise_loss(chosen: Tensor, rejected: Tensor) -> tuple[Tensor, Tensor]:
    """Bradley-Terry pairwise loss of a reward model: P(chosen > rejected) = sigmoid(r_c - r_r).

    loss = -mean(log sigmoid(r_c - r_r)),  accuracy = mean(r_c > r_r)   (chosen, rejected: (B,))
    """
    loss = -F.logsigmoid(chosen.float() - rejected.float()).mean()
    accuracy = (chosen > rejected).float().mean()
    return loss, accuracy


class DpoOutput(NamedTuple):
    loss: Tensor              # scalar, differentiable
    chosen_rewards: Tensor    # (B,) beta * (log pi(y_c) - log ref(y_c)), detached
    rejected_rewards: Tensor  # (B,) beta * (log pi(y_r) - log ref(y_r)), detached
    accuracy: Tensor          # scalar: share of pairs where the chosen reward is higher
    margin: Tensor            # scalar: mean(chosen_rewards - rejected_rewards)


def dpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
             ref_rejected_logps: Tensor, beta: float, nll_weight: float = 0.0,
             chosen_tokens: Tensor | None = None) -> DpoOutput:
    """Direct Preference Optimization, sigmoid form (Rafailov et al. 2023); inputs are (B,) sequence logps.

    loss = -mean(log sigmoid(beta * [(pi_c - ref_c) - (pi_r - ref_r)]))  +  nll_weight * mean(-pi_c / n_c)
    The second term (RPO, Pang et al. 2024) is the chosen responses' per-token NLL, n_c their token counts:
    plain DPO can raise the margin by lowering both likelihoods, which costs the bits per byte the gate
    measures; the NLL term keeps the chosen (real) code likely. nll_weight 0 is plain DPO.
    The implicit rewards beta * (pi - ref) are returned detached, for logging only.
    """
    chosen_logratio = policy_chosen_logps.float() - ref_chosen_logps.float()        # (B,)
    rejected_logratio = policy_rejected_logps.float() - ref_rejected_logps.float()  # (B,)
    loss = -F.logsigmoid(beta * (chosen_logratio - rejected_logratio)).mean()
    if nll_weight:
        if chosen_tokens is None:
            raise ValueError("dpo_loss: nll_weight needs chosen_tokens (response tokens of each chosen sequence)")
        loss = loss + nll_weight * (-policy_chosen_logps.float() / chosen_tokens.float().clamp(min=1)).mean()
    chosen_rewards = (beta * chosen_logratio).detach()
    rejected_rewards = (beta * rejected_logratio).detach()
    return DpoOutput(loss, chosen_rewards, rejected_rewards,
                     (chosen_rewards > rejected_rewards).float().mean(),
                     (chosen_rewards - rejected_rewards).mean())


# ----------------------------------------------------------------------------- PPO (RLHF)
def kl_penalized_rewards(logprobs: Tensor, ref_logprobs: Tensor, score: Tensor, mask: Tensor,
                         kl_coef: float) -> tuple[Tensor, Tensor]:
    """Per-token RLHF rewards: a KL penalty on every response token, the scalar score on the last one.

    kl[b, t] = m[b, t] * (logp[b, t] - ref_logp[b, t])       (the k1 estimator, per sampled token)
    rewards[b, t] = -kl_coef * kl[b, t] + score[b] * [t == last valid t of row b]
    Returns rewards (B, T) and the per-sequence KL sum_t kl[b, t] (B,). A row with an empty mask gets no score.
    """
    m = mask.to(logprobs.dtype)
    kl = (logprobs - ref_logprobs) * m                                   # (B, T)
    rewards = -kl_coef * kl
    T = m.shape[1]
    positions = torch.arange(T, device=m.device).expand_as(m)            # (B, T)
    last = torch.where(m > 0, positions, -1).max(dim=1).values           # (B,) -1 for empty rows
    has_any = last >= 0
    rows = torch.arange(m.shape[0], device=m.device)[has_any]
    rewards = rewards.clone()
    rewards[rows, last[has_any]] += score[has_any].to(rewards.dtype)
    return rewards, kl.sum(dim=1)


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalized Advantage Estimation over the masked (response) positions, computed right to left.

    delta_t = r_t + gamma * m_{t+1} * V_{t+1} - V_t
    A_t     = m_t * (delta_t + gamma * lam * m_{t+1} * A_{t+1})   (m_T = 0: nothing after the end)
    returns = A + V on masked positions. Both are detached targets: no gradient flows through them.
    """
    rewards, values, m = rewards.detach(), values.detach(), mask.to(values.dtype)
    T = rewards.shape[1]
    advantages = torch.zeros_like(values)                                 # (B, T)
    next_adv = torch.zeros_like(values[:, 0])                             # (B,)
    for t in reversed(range(T)):
        m_next = m[:, t + 1] if t + 1 < T else torch.zeros_like(m[:, 0])
        next_value = values[:, t + 1] * m_next if t + 1 < T else torch.zeros_like(values[:, 0])
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = (delta + gamma * lam * m_next * next_adv) * m[:, t]
        advantages[:, t] = next_adv
    returns = (advantages + values) * m
    return advantages, returns


def ppo_policy_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
                    clip_range: float) -> tuple[Tensor, Tensor]:
    """PPO clipped surrogate (Schulman et al. 2017), averaged over the masked tokens.

    ratio = exp(logp - old_logp);  loss = masked_mean(max(-A * ratio, -A * clip(ratio, 1-eps, 1+eps)))
    clip_fraction = masked share of tokens where the clipped term is the one taken.
    """
    ratio = torch.exp(logprobs - old_logprobs.detach())                  # (B, T)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clip_fraction = masked_mean((clipped > unclipped).float(), mask)
    return loss, clip_fraction.detach()


def ppo_value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_range: float) -> Tensor:
    """Clipped value loss: the value head may move at most clip_range from its rollout estimate.

    v_clip = old_v + clip(v - old_v, -eps, eps);  loss = 0.5 * masked_mean(max((v - R)^2, (v_clip - R)^2))
    """
    old_values = old_values.detach()
    v_clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    losses = torch.maximum((values - returns) ** 2, (v_clipped - returns) ** 2)   # (B, T)
    return 0.5 * masked_mean(losses, mask)
