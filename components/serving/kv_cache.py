"""A lean forward pass over a Hugging Face Llama's own modules, with a preallocated per-slot KV cache.

The serving engine keeps one cache slot per running sequence; active sequences always sit in slots
0..B-1 (the engine compacts on leave), so a decode step reads the cache through views, not gathers.
Each slot has its own length: a decode step gives every row its own position id and an attention mask
over the longest span. Compromise: Llama-family only (RoPE, RMSNorm, SwiGLU; any GQA ratio), and the
layers' nn.Linear modules are called as they are, so a dynamically quantized (int8) model runs unchanged.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class LlamaKVRunner:
    """prefill(slot, ids) and decode(tokens, positions) over a (max_batch, max_len) static KV cache."""

    def __init__(self, model: Any, max_batch: int, max_len: int | None = None):
        cfg = model.config
        self.model = model
        self.decoder = model.model
        self.layers = list(self.decoder.layers)
        self.n_head = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_head
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_head
        self.max_batch = max_batch
        self.max_len = max_len or int(cfg.max_position_embeddings)
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.scale = self.head_dim ** -0.5
        shape = (max_batch, self.n_kv, self.max_len, self.head_dim)  # (S, Hkv, L, D) per layer
        self.k = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in self.layers]
        self.v = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in self.layers]
        # RoPE tables from the model's own rotary module: elementwise, so a table row equals what HF computes.
        with torch.no_grad():
            pos = torch.arange(self.max_len, device=self.device)[None]
            probe = torch.zeros(1, device=self.device, dtype=self.dtype)
            cos, sin = self.decoder.rotary_emb(probe, pos)                  # (1, L, D)
        self.cos, self.sin = cos[0], sin[0]                                 # (L, D)
        self.positions = torch.arange(self.max_len, device=self.device)

    # ------------------------------------------------------------------ attention block
    def _attend(self, layer: Any, x: Tensor, cos: Tensor, sin: Tensor, write, read, mask: Tensor | None,
                causal: bool) -> Tensor:
        """One decoder layer on x (B, T, C); write(k, v) stores the new keys, read() returns the cache span."""
        attn = layer.self_attn
        B, T, _ = x.shape
        h = layer.input_layernorm(x)
        q = attn.q_proj(h).view(B, T, self.n_head, self.head_dim).transpose(1, 2)   # (B, H, T, D)
        k = attn.k_proj(h).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)     # (B, Hkv, T, D)
        v = attn.v_proj(h).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin                                          # cos, sin: (B, 1, T, D)
        k = k * cos + _rotate_half(k) * sin
        write(k, v)
        keys, values = read(k, v)                                                    # (B, Hkv, S, D)
        if self.n_kv != self.n_head:
            rep = self.n_head // self.n_kv
            keys, values = keys.repeat_interleave(rep, dim=1), values.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=causal and mask is None,
                                           scale=self.scale)                          # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        x = x + attn.o_proj(y)
        return x + layer.mlp(layer.post_attention_layernorm(x))

    def _head(self, x: Tensor) -> Tensor:
        return self.model.lm_head(self.decoder.norm(x))                              # (B, V)

    # ------------------------------------------------------------------ public steps
    @torch.inference_mode()
    def prefill(self, slot: int, ids: list[int]) -> Tensor:
        """Run a whole prompt (T <= max_len) into slot's cache rows 0..T-1 -> logits of its last token (V,)."""
        T = len(ids)
        x = self.decoder.embed_tokens(torch.tensor([ids], device=self.device))      # (1, T, C)
        cos, sin = self.cos[:T][None, None], self.sin[:T][None, None]               # (1, 1, T, D)
        for i, layer in enumerate(self.layers):
            def write(k, v, i=i):
                self.k[i][slot, :, :T] = k[0]
                self.v[i][slot, :, :T] = v[0]
            x = self._attend(layer, x, cos, sin, write, lambda k, v: (k, v), None, causal=True)
        return self._head(x[:, -1])[0]

    @torch.inference_mode()
    def decode(self, tokens: Tensor, positions: Tensor, span: int, same_length: bool) -> Tensor:
        """One token for each of slots 0..B-1: tokens, positions (B,) -> logits (B, V).

        span = max(positions) + 1 (known to the caller without a device sync); same_length says every
        row sits at the same position, so no mask is needed (the batch-1 case: as HF's own decode step).
        """
        B = tokens.shape[0]
        x = self.decoder.embed_tokens(tokens)[:, None]                              # (B, 1, C)
        cos, sin = self.cos[positions][:, None, None], self.sin[positions][:, None, None]  # (B, 1, 1, D)
        mask = None if same_length else (self.positions[:span][None] <= positions[:, None])[:, None, None]
        rows = torch.arange(B, device=self.device)
        for i, layer in enumerate(self.layers):
            def write(k, v, i=i):
                self.k[i][rows, :, positions] = k[:, :, 0]                          # (B, Hkv, D) at each own position
                self.v[i][rows, :, positions] = v[:, :, 0]

            def read(k, v, i=i):
                return self.k[i][:B, :, :span], self.v[i][:B, :, :span]
            x = self._attend(layer, x, cos, sin, write, read, mask, causal=False)
        return self._head(x[:, 0])

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy slot src's first `length` cache rows to slot dst (compaction after a sequence leaves)."""
        for k, v in zip(self.k, self.v):
            k[dst, :, :length] = k[src, :, :length]
            v[dst, :, :length] = v[src, :, :length]
