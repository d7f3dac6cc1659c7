"""Dynamic int8 quantization for CPU serving, and a side-by-side latency/perplexity comparison.

torch.ao dynamic quantization (fbgemm) of nn.Linear: deprecated in torch 2.13 but measured 3x
faster on these CPUs, while torchao's int8 configs were slower on CPU (TRAPS.md). Embeddings and
norms stay fp32; only Linear weights become int8, activations are quantized per batch at run time.
"""
from __future__ import annotations

import copy
import math
import statistics
import time
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


# Where dynamic int8 pays in the serving engine on CPU (benchmarks/README.md, int8 section, int8_bench.py):
# decode is faster only once the linears are wide enough that reading int8 weights saves more than the
# per-call activation quantization costs. Measured on the 2-core machine: hidden 128 (tiny) 0.6x (slower)
# at batch 1 and 16; hidden 384 (small) 2.9x at batch 1, 1.8x at batch 16.
INT8_MIN_HIDDEN = 384


def int8_pays(model: nn.Module) -> tuple[bool, str]:
    """(whether dynamic int8 makes serving this model faster here, the reason in words), by the measured rule."""
    device = next(model.parameters()).device
    if device.type != "cpu":
        return False, f"the model is on {device.type}: torch.ao dynamic int8 runs on CPU only"
    hidden = int(getattr(getattr(model, "config", None), "hidden_size", 0) or 0)
    if not hidden:
        return False, "the model has no config.hidden_size to apply the measured rule to"
    if hidden >= INT8_MIN_HIDDEN:
        return True, (f"hidden size {hidden} >= {INT8_MIN_HIDDEN}: int8 measured faster there "
                      "(1.7-2.0x decode at hidden 384, 2.3-3.4x at 768, benchmarks/README.md)")
    return False, (f"hidden size {hidden} < {INT8_MIN_HIDDEN}: int8 measured slower there "
                   "(0.6x decode at hidden 128, benchmarks/README.md)")


def quantize_int8(model: nn.Module) -> nn.Module:
    """A dynamically int8-quantized copy of model (every nn.Linear); the original is untouched."""
    engines = torch.backends.quantized.supported_engines
    if "fbgemm" in engines:
        torch.backends.quantized.engine = "fbgemm"
    elif "x86" in engines:
        torch.backends.quantized.engine = "x86"
    # Copy once ourselves (then quantize in place) so the caller's fp32 model keeps its weights
    # and its train/eval mode; the server may still be serving it while the int8 copy is built.
    qmodel = copy.deepcopy(model).to("cpu").eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=FutureWarning)
        # torch 2.13 warns that quantized tensor dtypes are deprecated: known, see module docstring.
        warnings.filterwarnings("ignore", message=".*deprecated.*", category=UserWarning)
        return torch.ao.quantization.quantize_dynamic(qmodel, {nn.Linear}, dtype=torch.qint8, inplace=True)


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids)
    # HF models return an output object; plain modules may return the logits tensor itself.
    return out.logits if hasattr(out, "logits") else out


def _perplexity(logits: torch.Tensor, ids: torch.Tensor) -> float:
    # Next-token loss: position t predicts ids[t+1].  logits (B, T, V), ids (B, T)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(), ids[:, 1:].reshape(-1))
    return float(math.exp(loss.item()))


@torch.inference_mode()
def compare_int8(model: nn.Module, ids: torch.Tensor, repeats: int = 5, int8_model: nn.Module | None = None
                 ) -> dict[str, Any]:
    """Median forward latency and perplexity on ids (B, T) of the fp32 model vs its int8 copy.

    Runs alternate fp32/int8 after one warm-up each, so machine noise hits both sides alike.
    Returns fp32_ms, int8_ms, speedup (fp32/int8), fp32_ppl, int8_ppl, max_abs_logit_diff.
    """
    if ids.dim() != 2 or ids.size(1) < 2:
        raise ValueError(f"ids must be (B, T) with T >= 2, got shape {tuple(ids.shape)}")
    fp32 = model.to("cpu").eval()
    int8 = int8_model if int8_model is not None else quantize_int8(fp32)
    ids = ids.to("cpu").long()

    ref, q = _logits(fp32, ids), _logits(int8, ids)  # warm-up, and the outputs we score
    times: dict[str, list[float]] = {"fp32": [], "int8": []}
    for _ in range(max(1, repeats)):
        for key, m in (("fp32", fp32), ("int8", int8)):
            t0 = time.perf_counter()
            _logits(m, ids)
            times[key].append((time.perf_counter() - t0) * 1000.0)
    fp32_ms, int8_ms = statistics.median(times["fp32"]), statistics.median(times["int8"])
    return {
        "fp32_ms": fp32_ms,
        "int8_ms": int8_ms,
        "speedup": fp32_ms / int8_ms if int8_ms > 0 else float("inf"),
        "fp32_ppl": _perplexity(ref, ids),
        "int8_ppl": _perplexity(q, ids),
        "max_abs_logit_diff": float((ref.float() - q.float()).abs().max()),
    }
