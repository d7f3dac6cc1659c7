"""Text generation and sequence scoring shared by evaluation, PPO rollouts, serving and the sample tables.

generate() left-pads a batch of prompts and calls HF generate (KV cache, greedy or nucleus), stops a row
at <|end|> / <|endoftext|> or a stop string, and returns only the completions. Prompts go in verbatim
(no special tokens added); prompts longer than the context keep their last tokens.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from components.model.build import stop_token_ids
from components.training.losses import masked_token_logprobs


class _StopOnStrings:
    """HF stopping criterion: a row is done once its generated tail contains any stop string.

    Only the last few tokens are decoded per step (a token is at least one byte, a character at most
    four), so the check stays cheap however long the completion grows.
    """

    def __init__(self, tokenizer: Any, stops: list[str], prompt_len: int):
        self.tokenizer, self.stops, self.prompt_len = tokenizer, stops, prompt_len
        self.tail = 4 * max(len(s) for s in stops) + 2

    def __call__(self, input_ids: Tensor, scores: Any, **kwargs: Any) -> Tensor:
        new = input_ids[:, self.prompt_len:]                                    # (B, t) generated so far
        tails = self.tokenizer.batch_decode(new[:, -self.tail:], skip_special_tokens=True)
        done = [any(s in text for s in self.stops) for text in tails]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def _left_pad(rows: list[list[int]], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Token id lists -> left-padded (B, T) ids and attention mask (the newest token is always at -1)."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, T - len(r):] = 1
    return ids.to(device), mask.to(device)


def _cut(text: str, stops: list[str]) -> str:
    """text up to (not including) the earliest stop string."""
    cut = len(text)
    for s in stops:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]


def generate(model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int = 64, temperature: float = 0.0,
             top_p: float = 1.0, stop: list[str] | None = None, seed: int | None = None) -> list[str]:
    """Complete each prompt; greedy when temperature == 0, nucleus sampling (top_p) otherwise.

    Returns the completions only (prompt not repeated), cut at the first stop string or end token.
    seed makes sampling reproducible without disturbing the caller's global RNG.
    """
    from transformers import GenerationConfig, StoppingCriteriaList

    if not prompts:
        return []
    stops = [s for s in (stop or []) if s]
    ends = stop_token_ids(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else ends[0]
    block = int(getattr(model.config, "max_position_embeddings", 0) or 0) or 10**9
    max_new = max(1, min(max_new_tokens, block - 1))
    # An empty prompt starts a fresh document: EOT is what precedes every document in pretraining.
    rows = [tokenizer.encode(p, add_special_tokens=False) or [ends[0]] for p in prompts]
    rows = [r[-(block - max_new):] for r in rows]  # keep the prompt's end: the context the completion needs
    device = next(model.parameters()).device
    input_ids, attention_mask = _left_pad(rows, pad_id, device)           # (B, T)

    sample = temperature > 0
    gen_config = GenerationConfig(
        max_new_tokens=max_new, do_sample=sample, temperature=temperature if sample else None,
        top_p=top_p if sample else None, top_k=0 if sample else None, num_beams=1,
        eos_token_id=ends, pad_token_id=pad_id, use_cache=True,
    )
    criteria = StoppingCriteriaList([_StopOnStrings(tokenizer, stops, input_ids.shape[1])] if stops else [])
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.inference_mode():
            if seed is not None:
                torch.manual_seed(seed)
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                 generation_config=gen_config, stopping_criteria=criteria)  # (B, T + t)
    finally:
        model.train(was_training)

    completions = []
    for row in out[:, input_ids.shape[1]:].tolist():
        for j, tok in enumerate(row):  # cut at the first end token (the rest is padding)
            if tok in ends:
                row = row[:j]
                break
        completions.append(_cut(tokenizer.decode(row, skip_special_tokens=True), stops))
    return completions


def sequence_logprobs(model: Any, input_ids: Tensor, attention_mask: Tensor, labels_mask: Tensor) -> Tensor:
    """Sum over t of log p(input_ids[b, t] | input_ids[b, <t]) where labels_mask[b, t] = 1 -> (B,).

    labels_mask lines up with input_ids (mark the response tokens); position ids follow the attention
    mask so left-padded rows score exactly like unpadded ones. Gradients flow (DPO needs them).
    """
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)     # (B, T)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits  # (B, T, V)
    mask = labels_mask * attention_mask
    return masked_token_logprobs(logits, input_ids, mask).sum(-1)         # (B,)
