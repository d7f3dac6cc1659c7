"""Dynamic int8 quantization on a tiny HF Llama: it runs, stays close to fp32, and reports both sides."""
import pytest
import torch
from torch import nn

from components.evaluation.quantize import compare_int8, quantize_int8


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def test_quantize_int8_swaps_linears_and_leaves_original(tiny_llama):
    q = quantize_int8(tiny_llama)
    linear_fp32 = [m for m in tiny_llama.modules() if type(m) is nn.Linear]
    assert linear_fp32, "the fp32 model keeps its nn.Linear layers (quantized a copy)"
    kinds = {type(m).__module__ for m in q.modules() if "Linear" in type(m).__name__}
    assert all("quantized" in k for k in kinds), kinds


def test_int8_logits_close_to_fp32(tiny_llama):
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(1))
    q = quantize_int8(tiny_llama)
    with torch.inference_mode():
        ref, out = tiny_llama(ids).logits, q(ids).logits
    assert out.shape == ref.shape == (2, 16, 100)
    # Random-init logits are small; int8 error should be a small fraction of their spread.
    assert (out - ref).abs().max() < 0.1 * ref.std() + 0.05
    # And the ranking barely moves: top-1 agrees on most positions.
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.8


def test_compare_int8_reports_latency_and_perplexity(tiny_llama):
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(2))
    r = compare_int8(tiny_llama, ids, repeats=3)
    assert {"fp32_ms", "int8_ms", "speedup", "fp32_ppl", "int8_ppl"} <= set(r)
    assert r["fp32_ms"] > 0 and r["int8_ms"] > 0 and r["speedup"] == pytest.approx(r["fp32_ms"] / r["int8_ms"])
    # Untrained model over 100 tokens: perplexity near 100, int8 within a few percent of fp32.
    assert 50 < r["fp32_ppl"] < 200
    assert r["int8_ppl"] == pytest.approx(r["fp32_ppl"], rel=0.05)
    with pytest.raises(ValueError):
        compare_int8(tiny_llama, ids[0])
