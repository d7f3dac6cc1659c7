"""Descriptors on hand-made requests: the chat markup stripped, rare/byte-fallback shares counted by hand,
bits per byte and mean log-prob checked against a direct forward pass of a tiny Llama."""
from __future__ import annotations

import math

import numpy as np
import pytest

from components.data import layout
from components.monitoring import descriptors as D
from tests.unit.training.helpers import tiny_tokenizer, varied_tiny_model

SHAPE = dict(n_layer=2, n_head=2, n_embd=16, block_size=64, intermediate_size=32)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer(400)


@pytest.fixture(scope="module")
def model(tok):
    return varied_tiny_model({**SHAPE, "vocab_size": len(tok)}, tok, seed=0)


def test_user_text_strips_chat_markup(tok):
    from components.data.tokenizer import format_prompt

    assert D.user_text(format_prompt(tok, "Write `f(x)`\nplease")) == "Write `f(x)`\nplease"
    chat = tok.apply_chat_template([{"role": "system", "content": "be brief"}, {"role": "user", "content": "one"},
                                    {"role": "assistant", "content": "1"}, {"role": "user", "content": "two"}],
                                   add_generation_prompt=True, tokenize=False)
    assert D.user_text(chat) == "two"                     # the last user turn
    assert D.user_text("def f(x):") == "def f(x):"        # a raw completion prompt stays as sent


def test_rare_ids_cover_the_frequent_mass():
    counts = np.array([50, 30, 10, 5, 5, 0], dtype=float)     # 100 tokens
    stats = D.TokenStats.from_counts(counts, coverage=0.8)
    assert stats.rare.tolist() == [False, False, True, True, True, True]     # 50 + 30 reach 80 %
    stats = D.TokenStats.from_counts(counts, coverage=0.85)
    assert stats.rare.tolist() == [False, False, False, True, True, True]


def test_token_stats_read_the_training_tokens(tiny_settings, tok):
    from tests.unit.training.helpers import write_tiny_data

    write_tiny_data(tiny_settings)
    stats = D.TokenStats.for_tokenizer(tiny_settings, tok, 0.95)
    assert stats.source == "train tokens" and len(stats.rare) == len(tok)
    ids = np.fromfile(layout.tokens_dir(tiny_settings) / "train.bin", dtype=np.uint16)
    assert not stats.rare[np.bincount(ids).argmax()]            # the most frequent id is common
    (layout.tokens_dir(tiny_settings) / "meta.json").unlink()
    assert D.TokenStats.for_tokenizer(tiny_settings, tok, 0.95).source == "id rank"


def test_text_features_by_hand(tok):
    stats = D.TokenStats(np.zeros(len(tok), dtype=bool), "test")
    ascii_, accented = D.text_features(tok, stats, ["abc", "é"])
    assert ascii_["chars"] == 3 and ascii_["byte_fallback_share"] == 0.0 and ascii_["rare_share"] == 0.0
    enc = tok.backend_tokenizer.encode("é", add_special_tokens=False)
    assert accented["tokens"] == len(enc.ids) == 2              # a 2-byte character this tiny vocab never merged
    assert accented["byte_fallback_share"] == 1.0                # both of its bytes fell back
    mixed = D.text_features(tok, stats, ["aé"])[0]
    assert mixed["byte_fallback_share"] == pytest.approx(2 / 3)  # 2 of 3 UTF-8 bytes
    rare = np.zeros(len(tok), dtype=bool)
    ids = tok.backend_tokenizer.encode("abc", add_special_tokens=False).ids
    rare[ids[0]] = True
    assert D.text_features(tok, D.TokenStats(rare, "test"), ["abc"])[0]["rare_share"] == pytest.approx(1 / len(ids))


def _logprobs(model, ids):
    import torch
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    lp = torch.log_softmax(logits, -1)
    return [float(lp[t - 1, ids[t]]) for t in range(1, len(ids))]


def test_bits_per_byte_and_mean_logprob_match_a_forward_pass(model, tok):
    from components.training.finetune_data import prompt_ids

    text = "def add(a, b):"
    ids = [tok.eos_token_id] + tok.encode(text, add_special_tokens=False)
    expected = -sum(_logprobs(model, ids)) / math.log(2) / len(text.encode())
    got = D.prompt_bits_per_byte(model, tok, [text, ""])
    assert got[0] == pytest.approx(expected, rel=1e-4) and math.isnan(got[1])

    ctx = prompt_ids(tok, ["add two numbers"])[0]
    completion = tok.encode("return a + b", add_special_tokens=False)
    lps = _logprobs(model, ctx + completion)[len(ctx) - 1:]
    got = D.completion_mean_logprobs(model, tok, ["add two numbers", "x"], ["return a + b", ""])
    assert got[0] == pytest.approx(sum(lps) / len(lps), rel=1e-4) and math.isnan(got[1])


def test_embeddings_are_the_mean_last_hidden_state(model, tok):
    import torch

    emb = D.embeddings(model, tok, ["abc", "a much longer prompt here"], batch=2)   # padded together
    ids = [tok.eos_token_id] + tok.encode("abc", add_special_tokens=False)
    with torch.no_grad():
        h = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0]
    assert emb.shape == (2, SHAPE["n_embd"])
    np.testing.assert_allclose(emb[0], h.mean(0).numpy(), rtol=1e-4, atol=1e-5)


def test_describe_uses_logged_logprobs_and_flags_parses(model, tok):
    stats = D.TokenStats(np.zeros(len(tok), dtype=bool), "test")
    rows = D.describe(model, tok, stats, ["add", "sub"], ["def add(a, b):\n    return a + b\n", "return ((("],
                      mean_logprobs=[-1.5, None], latencies=[0.25, None], with_embeddings=True)
    assert [r["completion_parses"] for r in rows] == [1.0, 0.0]
    assert rows[0]["completion_mean_logprob"] == -1.5
    assert rows[1]["completion_mean_logprob"] == pytest.approx(
        D.completion_mean_logprobs(model, tok, ["sub"], ["return ((("])[0], rel=1e-5)
    assert rows[0]["latency_s"] == 0.25 and math.isnan(rows[1]["latency_s"])
    assert set(D.NUMERIC_COLUMNS) <= set(rows[0]) and len(rows[0][D.EMBEDDING]) == SHAPE["n_embd"]
