"""Per-row helpers of the engine's token loop: temperature + nucleus sampling with a row's own generator,
and the stop-string hold-back (text that may be the start of a stop string is not streamed yet).
Compromise: sampling runs one row at a time (rows have their own seeds and parameters).
"""
from __future__ import annotations

from typing import Any

import torch


def stop_prefix_len(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of text that begins some stop string (held back until resolved)."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


def sample_row(logits: torch.Tensor, p: Any, gen: torch.Generator) -> int:
    """Temperature then nucleus (top_p) filtering, as HF's warpers do, then one draw from gen.

    The logits are shifted by their max before the division (softmax does not change), and the temperature
    is at least the dtype's smallest normal number (1e-300 is 0 in float32): a tiny temperature then sends
    the other scores to -inf instead of every score to +-inf or 0/0 (NaN probabilities)."""
    temperature = max(p.temperature, torch.finfo(logits.dtype).tiny)
    scores = (logits - logits.max()) / temperature                            # (V,), max 0
    if p.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)
        cum = sorted_scores.softmax(-1).cumsum(-1)
        remove = cum <= (1 - p.top_p)
        remove[-1] = False                                                     # keep at least the top token
        scores = scores.masked_fill(remove.scatter(0, order, remove), float("-inf"))
    probs = scores.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=gen))
