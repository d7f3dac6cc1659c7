"""generate(): greedy equals a hand-written argmax loop, completions only, stop strings, end tokens,
batching with left padding, seeded sampling; sequence_logprobs against a manual sum."""
from __future__ import annotations

import pytest
import torch

from components.model.build import build_model
from components.model.generation import generate, sequence_logprobs, stop_token_ids
from tests.unit.training.helpers import tiny_tokenizer, varied_tiny_model

SHAPE = {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 64, "intermediate_size": 96, "vocab_size": 400}
PROMPTS = ["def compute_items(data):\n", "import os\n\nCONST"]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return varied_tiny_model(SHAPE, tok)


def manual_greedy(model, tok, prompt, n, ids: list[int] | None = None):
    """Reference: full forward each step, argmax of the last position, stop at an end token (from the prompt's
    ids, or from `ids` when given)."""
    ids = tok.encode(prompt, add_special_tokens=False) if ids is None else ids
    ends = {tok.eos_token_id, tok.convert_tokens_to_ids("<|end|>")}
    new = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
            if nxt in ends:
                break
            new.append(nxt)
    return tok.decode(new, skip_special_tokens=True)


def test_greedy_matches_manual_loop_and_returns_completion_only(model, tok):
    out = generate(model, tok, PROMPTS[:1], max_new_tokens=12)
    assert out == [manual_greedy(model, tok, PROMPTS[0], 12)] and out[0]
    assert out == generate(model, tok, PROMPTS[:1], max_new_tokens=12)  # deterministic


def test_batched_left_padding_matches_single_prompts(model, tok):
    batched = generate(model, tok, PROMPTS, max_new_tokens=10)
    single = [generate(model, tok, [p], max_new_tokens=10)[0] for p in PROMPTS]
    assert batched == single


def test_stop_string_cuts_the_completion(model, tok):
    full = generate(model, tok, PROMPTS[:1], max_new_tokens=24)[0]
    # A short ASCII stop string from the middle (byte-level decoding can show partial characters).
    i = next(i for i in range(2, len(full) - 1)
             if full[i:i + 2].isascii() and full[i:i + 2].isprintable() and not full[i:i + 2].isspace())
    stop = full[i:i + 2]
    cut = generate(model, tok, PROMPTS[:1], max_new_tokens=24, stop=[stop, "never-seen-§"])[0]
    assert cut == full[:full.find(stop)]


def test_end_of_text_ends_generation(tok):
    m = build_model(SHAPE, tok)
    with torch.no_grad():
        m.model.norm.weight.zero_()  # all logits 0: argmax picks id 0, which is <|endoftext|>
    assert generate(m, tok, PROMPTS, max_new_tokens=8) == ["", ""]


def test_seeded_sampling_is_reproducible_and_leaves_global_rng_alone(model, tok):
    state = torch.get_rng_state()
    a = generate(model, tok, PROMPTS, max_new_tokens=10, temperature=1.0, top_p=0.9, seed=3)
    b = generate(model, tok, PROMPTS, max_new_tokens=10, temperature=1.0, top_p=0.9, seed=3)
    assert a == b
    assert torch.equal(state, torch.get_rng_state())


def test_long_and_empty_prompts(model, tok):
    """A prompt beyond the context keeps its last block_size - max_new_tokens tokens; an empty one starts from
    the end-of-text token, as every pretraining document does: each equals a plain greedy loop on that input."""
    long_prompt = "x = 1\n" * 200                                              # far beyond block_size 64
    out = generate(model, tok, [long_prompt, ""], max_new_tokens=8)
    model.eval()
    tail = tok.encode(long_prompt, add_special_tokens=False)[-(64 - 8):]
    assert out == [manual_greedy(model, tok, "", 8, ids=tail), manual_greedy(model, tok, "", 8, ids=[stop_token_ids(tok)[0]])]
    assert generate(model, tok, [], max_new_tokens=8) == []


def test_model_mode_is_restored(model, tok):
    model.train()
    generate(model, tok, PROMPTS[:1], max_new_tokens=2)
    assert model.training
    model.eval()


def test_sequence_logprobs_matches_manual_sum_and_ignores_left_padding(model, tok):
    ids = torch.tensor([[5, 17, 42, 99, 7]])                                 # (1, 5)
    labels_mask = torch.tensor([[0, 0, 1, 1, 1]])
    got = sequence_logprobs(model, ids, torch.ones_like(ids), labels_mask).detach()
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0], -1)          # (T, V)
    want = sum(float(logp[t - 1, ids[0, t]]) for t in (2, 3, 4))
    assert got.shape == (1,) and abs(float(got[0]) - want) < 1e-4
    # The same row left-padded by 3 pads scores the same (position ids follow the mask).
    padded = torch.cat([torch.full((1, 3), tok.pad_token_id), ids], dim=1)
    attn = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(ids)], dim=1)
    lm = torch.cat([torch.zeros(1, 3, dtype=torch.long), labels_mask], dim=1)
    assert abs(float(sequence_logprobs(model, padded, attn, lm).detach()[0]) - want) < 1e-4
