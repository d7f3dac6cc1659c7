"""The pretraining step's loss path: HF Llama trunk + head + loss as one function, compiled or fused.

lm_loss is the plain path (one graph for torch.compile, so Inductor fuses the logits' upcast into the
cross-entropy); compile_loss compiles it as a full graph where that holds; liger_loss_fn switches to
liger-kernel's RMSNorm / SwiGLU / fused linear cross-entropy (CUDA) after a probe step on the device.
Compromise: the liger path has only that probe as its test where no GPU is at hand; auto falls back.
"""
from __future__ import annotations

import functools
import math
import warnings
from typing import Any, Callable

import torch

from components.errors import TrainingError
from components.training.losses import causal_lm_loss


def lm_loss(model: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """causal_lm_loss of a HF causal LM on inputs x and targets y, both (B, T); no KV cache while training.

    The decoder then the head, as LlamaForCausalLM.forward does, so torch.compile sees model and loss as
    one function.
    """
    hidden = model.get_decoder()(input_ids=x, use_cache=False).last_hidden_state       # (B, T, C)
    return causal_lm_loss(model.get_output_embeddings()(hidden), y)                   # (B, T, V) -> ()


def compile_loss(fn: Any) -> Any:
    """torch.compile(fn) as one full graph; with graph breaks allowed if it does not trace whole.

    fullgraph=True holds for the HF Llama trunk + causal_lm_loss (transformers 5.24, checked on CPU); it
    also skips transformers' per-forward mask checks, which read a tensor on the host in eager mode.
    """
    full, partial = torch.compile(fn, fullgraph=True), None

    def call(*args: Any) -> torch.Tensor:
        nonlocal full, partial
        if full is not None:
            try:
                return full(*args)
            except torch._dynamo.exc.Unsupported as exc:
                warnings.warn(f"pretrain.compile: no full graph ({str(exc).splitlines()[0][:160]}); "
                              "compiling with graph breaks")
                full = None
        if partial is None:
            partial = torch.compile(fn)
        return partial(*args)
    return call


def liger_loss_fn(model: Any, precision_context: Callable[[], Any], compile_: bool, explicit: bool) -> Any:
    """liger's loss path for model (already on its device), or None when `auto` must fall back.

    A probe step ((2, 16) random tokens, forward and backward inside precision_context) runs first: its
    loss must match the plain path's within 2% and its gradients be finite. On an error or a mismatch the
    model is restored; explicit (pretrain.kernels=liger) then raises TrainingError, auto warns.
    """
    from components.model.kernels import apply_liger, remove_liger

    device = next(model.parameters()).device
    x = torch.randint(0, model.config.vocab_size, (2, 17), device=device)                  # (2, 16 + 1)
    try:
        with torch.no_grad(), precision_context():
            expected = float(lm_loss(model, x[:, :-1], x[:, 1:]))
        fused_ce = apply_liger(model)

        def liger_loss(trunk: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            hidden = trunk(input_ids=x, use_cache=False).last_hidden_state                 # (B, T, C)
            head = model.get_output_embeddings().weight                                     # (V, C)
            return fused_ce(head, hidden.flatten(0, 1), y.flatten())                        # no (B*T, V) logits

        with precision_context():
            got = liger_loss(model.get_decoder(), x[:, :-1], x[:, 1:])
        got.backward()
        grads_ok = all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None)
        model.zero_grad(set_to_none=True)
        if not (math.isclose(float(got), expected, rel_tol=2e-2) and grads_ok):
            raise RuntimeError(f"probe loss {float(got):.4f} vs plain {expected:.4f}, finite grads {grads_ok}")
    except Exception as exc:  # any failure of a kernel not yet run on this device
        remove_liger(model)
        model.zero_grad(set_to_none=True)
        if explicit:
            raise TrainingError(f"pretrain.kernels=liger failed its probe step on {device}: {exc}; "
                                "set pretrain.kernels=none") from exc
        warnings.warn(f"pretrain.kernels=auto: liger failed its probe step on {device} ({exc}); training without it")
        return None
    # The fused loss launches its own kernels (and reads the token count): compile the trunk only.
    trunk = torch.compile(model.get_decoder()) if compile_ else model.get_decoder()
    return functools.partial(liger_loss, trunk)
