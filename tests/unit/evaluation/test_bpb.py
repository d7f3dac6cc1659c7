"""Bits per byte: windows cover every target once, model bits equal a hand-summed cross-entropy, and the
n-gram bits use the same positions."""
import math

import numpy as np
import pytest
import torch

from components.evaluation.bpb import DocScores, Scored, doc_scores, model_bits, ngram_bits, windows


def test_windows_score_each_target_once_with_the_longest_context():
    item = Scored("d", context=[0], target=[1, 2, 3, 4, 5], nbytes=5)
    # block 2: targets at positions 1..5 in chunks of 2; each window ends at its chunk's last target.
    assert windows(item, 2) == [([0, 1, 2], 2), ([2, 3, 4], 2), ([3, 4, 5], 1)]
    covered = sum(n for _, n in windows(item, 2))
    assert covered == len(item.target)
    # A prompt as context: only response positions are targets, the prompt reaches back as context.
    sft = Scored("s", context=[7, 8, 9], target=[1, 2], nbytes=2)
    assert windows(sft, 8) == [([7, 8, 9, 1, 2], 2)]
    # No context at all: position 0 has nothing before it and is never a target.
    assert windows(Scored("n", [], [4, 5, 6], 3), 8) == [([4, 5, 6], 2)]


class Bigram(torch.nn.Module):
    """logits depend on the current token only: easy to check by hand."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = table                                      # (V, V) logits of next given current

    def forward(self, input_ids):
        class Out:
            pass
        out = Out()
        out.logits = self.table[input_ids]                      # (B, T, V)
        return out


def test_model_bits_equal_the_hand_summed_cross_entropy():
    torch.manual_seed(0)
    table = torch.randn(6, 6)
    model = Bigram(table)
    items = [Scored("a", [0], [1, 2, 3, 4, 5, 0, 1], 10), Scored("b", [2, 3], [4], 3)]
    bits = model_bits(model, items, block=3, device="cpu", batch=2)
    logp = torch.log_softmax(table, dim=-1)

    def hand(ctx, tgt):
        full = ctx + tgt
        return -sum(logp[full[t - 1], full[t]].item() for t in range(len(ctx), len(full))) / math.log(2)

    assert bits == pytest.approx([hand([0], [1, 2, 3, 4, 5, 0, 1]), hand([2, 3], [4])], rel=1e-6)
    scores = doc_scores(items, bits)
    assert scores.bits_per_byte == pytest.approx(bits.sum() / 13)
    assert DocScores.from_json(scores.to_json()).ids == ["a", "b"]


def test_ngram_bits_score_the_same_positions():
    uniform = lambda ids: np.full(len(ids) - 1, math.log(1 / 4))  # noqa: E731 - ln p = ln 1/4 everywhere
    items = [Scored("a", [0, 1], [2, 3, 1], 3)]
    assert ngram_bits(uniform, items)[0] == pytest.approx(3 * 2.0)   # three targets, 2 bits each
