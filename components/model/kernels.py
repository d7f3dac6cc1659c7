"""Fused training kernels for the Llama hot path (liger-kernel), chosen per run and applied per model instance.

resolve_kernels turns the `kernels` setting (auto | liger | none) into what a run on a given device uses;
apply_liger patches one model instance's RMSNorm and SwiGLU modules with liger-kernel's Triton kernels
and returns its fused linear + cross-entropy loss, which never materialises the (B*T, V) logits.
Compromises: CUDA only (Triton); RoPE is left to transformers, because liger replaces it for every Llama
in the process (a module-level function), and this process may later run a Llama on the CPU. The
parameters and their names are untouched, so save_pretrained still writes a plain HF Llama.
"""
from __future__ import annotations

import importlib.util
from typing import Any, Callable

import torch

from components.errors import ConfigError


def liger_available() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def resolve_kernels(kernels: str, device_type: str, key: str = "pretrain.kernels") -> str:
    """"liger" or "none" for a run on device_type; ConfigError (naming key) when liger cannot run.

    auto -> liger on CUDA when liger-kernel is importable, none otherwise (CPU runs, no package).
    """
    if kernels == "none":
        return "none"
    usable = device_type == "cuda" and liger_available()
    if kernels == "auto":
        return "liger" if usable else "none"
    if kernels != "liger":
        raise ConfigError(f"{key}: expected auto, liger or none, got {kernels!r}")
    if device_type != "cuda":
        raise ConfigError(f"{key}=liger needs a CUDA device (its kernels are Triton); this run trains on "
                          f"{device_type}: set {key}=auto or none")
    if not liger_available():
        raise ConfigError(f"{key}=liger: liger-kernel is not installed; `pip install 'llmcycle[gpu]'` "
                          f"(or liger-kernel) or set {key}=auto or none")
    return "liger"


def apply_liger(model: Any) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """Patch model's norms and MLPs in place with liger's kernels; returns loss(weight, hidden, targets).

    loss(lm_head.weight (V, C), hidden (N, C), targets (N,)) = mean next-token cross-entropy over the
    targets != -100, computed chunk by chunk without the (N, V) logits (liger's fused linear CE).
    """
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss, apply_liger_kernel_to_llama
    from transformers.models.llama import modeling_llama

    # apply_liger_kernel_to_llama also swaps the classes in transformers' module (every Llama built
    # later in this process would get Triton modules, on CPU too): keep them, patch this instance only.
    saved = {name: getattr(modeling_llama, name) for name in ("LlamaRMSNorm", "LlamaMLP", "apply_rotary_pos_emb")}
    try:
        apply_liger_kernel_to_llama(rope=False, cross_entropy=False, fused_linear_cross_entropy=False,
                                    rms_norm=True, swiglu=True, model=model)
    finally:
        for name, value in saved.items():
            setattr(modeling_llama, name, value)
    return LigerFusedLinearCrossEntropyLoss()


def remove_liger(model: Any) -> None:
    """Undo apply_liger on this instance: its modules answer with their own class's forward again."""
    for module in model.modules():
        for name in ("forward", "extra_repr"):  # liger binds both on the instance (module.__dict__)
            module.__dict__.pop(name, None)
