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


def _rms_norm(x: Tensor, norm: Any) -> Tensor:
    """LlamaRMSNorm's own formula, op for op (torch's fused rms_norm is ~3x slower per call on CPU)."""
    h = x if x.dtype == torch.float32 else x.float()     # the casts are no-ops in fp32: skip their calls
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * (h if x.dtype == torch.float32 else h.to(x.dtype))


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
        self.qkv = [self._qkv_rot(l.self_attn) for l in self.layers]
        self.gate_up = [self._fused(l.mlp.gate_proj, l.mlp.up_proj) for l in self.layers]
        self.o = [self._fused(l.self_attn.o_proj) for l in self.layers]
        self.down = [self._fused(l.mlp.down_proj) for l in self.layers]
        self.lm_head = self._fused(model.lm_head)

    @staticmethod
    def _fused(*linears: Any):
        """One matmul for several projections of the same input (fewer kernel launches per token): their
        weights concatenated; plain nn.Linear only, so a quantized model keeps calling its own modules.
        The weights are read once here: an engine serves the weights it was built with."""
        if all(type(m) is torch.nn.Linear and m.bias is None for m in linears):
            weight = linears[0].weight.detach() if len(linears) == 1 else \
                torch.cat([m.weight.detach() for m in linears], dim=0)          # (sum N, C)
            return lambda h: F.linear(h, weight)
        if len(linears) == 1:
            return linears[0]
        return lambda h: torch.cat([m(h) for m in linears], dim=-1)

    def _qkv_rot(self, attn: Any):
        """h -> [q, k, v, rotate_half(q), rotate_half(k)] as (B, T, (2H + 3Hkv) * D).

        rotate_half is a signed permutation of output rows, so for plain linears it is folded into the
        weight (one matmul gives both halves of RoPE, exactly: the same dot products, negated or moved).
        """
        H, Hkv, D = self.n_head, self.n_kv, self.head_dim
        lins = (attn.q_proj, attn.k_proj, attn.v_proj)
        if all(type(m) is torch.nn.Linear and m.bias is None for m in lins):
            qk = torch.cat([attn.q_proj.weight, attn.k_proj.weight]).detach()           # ((H + Hkv) D, C)
            rot = _rotate_half(qk.view(H + Hkv, D, -1).transpose(1, 2)).transpose(1, 2).reshape(qk.shape)
            weight = torch.cat([qk, attn.v_proj.weight.detach(), rot])
            return lambda h: F.linear(h, weight)

        def modules(h: Tensor) -> Tensor:
            qk = torch.cat([attn.q_proj(h), attn.k_proj(h)], dim=-1)
            rot = _rotate_half(qk.unflatten(-1, (H + Hkv, D))).flatten(-2)
            return torch.cat([qk, attn.v_proj(h), rot], dim=-1)
        return modules

    # ------------------------------------------------------------------ attention block
    def _attend(self, i: int, x: Tensor, cos: Tensor, sin: Tensor, write, read, mask: Tensor | None,
                causal: bool) -> Tensor:
        """Decoder layer i on x (B, T, C); write(k, v) stores the new keys, read(k, v) returns the span."""
        layer = self.layers[i]
        B, T, _ = x.shape
        H, Hkv, D = self.n_head, self.n_kv, self.head_dim
        h = _rms_norm(x, layer.input_layernorm)
        qkv = self.qkv[i](h).view(B, T, 2 * H + 3 * Hkv, D).transpose(1, 2)        # (B, 2H + 3Hkv, T, D)
        qk = qkv[:, :H + Hkv] * cos + qkv[:, H + 2 * Hkv:] * sin                     # RoPE on q and k at once
        q, k, v = qk[:, :H], qk[:, H:], qkv[:, H + Hkv:H + 2 * Hkv]                  # (B, H|Hkv, T, D)
        write(k, v)
        keys, values = read(k, v)                                                    # (B, Hkv, S, D)
        if Hkv != H:
            keys, values = keys.repeat_interleave(H // Hkv, dim=1), values.repeat_interleave(H // Hkv, dim=1)
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=causal and mask is None,
                                           scale=self.scale)                          # (B, H, T, D)
        x = x + self.o[i](y.transpose(1, 2).reshape(B, T, H * D))
        gate, up = self.gate_up[i](_rms_norm(x, layer.post_attention_layernorm)).chunk(2, -1)
        return x + self.down[i](F.silu(gate) * up)                          # SwiGLU

    def _head(self, x: Tensor) -> Tensor:
        return self.lm_head(_rms_norm(x, self.decoder.norm))                         # (B, V)

    # ------------------------------------------------------------------ public steps
    @torch.inference_mode()
    def prefill(self, slot: int, ids: list[int]) -> Tensor:
        """Run a whole prompt (T <= max_len) into slot's cache rows 0..T-1 -> logits of its last token (V,)."""
        T = len(ids)
        x = self.decoder.embed_tokens(torch.tensor([ids], device=self.device))      # (1, T, C)
        cos, sin = self.cos[:T][None, None], self.sin[:T][None, None]               # (1, 1, T, D)
        for i in range(len(self.layers)):
            def write(k, v, i=i):
                self.k[i][slot, :, :T] = k[0]
                self.v[i][slot, :, :T] = v[0]
            x = self._attend(i, x, cos, sin, write, lambda k, v: (k, v), None, causal=True)
        return self._head(x[:, -1])[0]

    @torch.inference_mode()
    def decode(self, tokens: Tensor, positions: Tensor, span: int, same_length: bool) -> Tensor:
        """One token for each of slots 0..B-1: tokens, positions (B,) -> logits (B, V).

        span = max(positions) + 1 (known to the caller without a device sync); same_length says every
        row sits at the same position, so no mask is needed (the batch-1 case: as HF's own decode step).
        """
        return self.decode_graph(tokens, positions, span, same_length)

    def decode_graph(self, tokens: Tensor, positions: Tensor, span: int, same_length: bool) -> Tensor:
        """decode() without its inference_mode wrapper: what torch.compile takes (call it under no_grad;
        dynamo cannot trace inference-mode tensors, measured here with torch 2.13)."""
        B = tokens.shape[0]
        x = self.decoder.embed_tokens(tokens)[:, None]                              # (B, 1, C)
        if same_length:  # one shared position: slices instead of gathers and scatters, no mask
            at, mask, rows = span - 1, None, None
            cos, sin = self.cos[at:span][None, None], self.sin[at:span][None, None]     # (1, 1, 1, D)
        else:
            at, rows = None, torch.arange(B, device=self.device)
            cos, sin = self.cos[positions][:, None, None], self.sin[positions][:, None, None]  # (B, 1, 1, D)
            mask = (self.positions[:span][None] <= positions[:, None])[:, None, None]   # (B, 1, 1, S)
        for i in range(len(self.layers)):
            def write(k, v, i=i):
                if at is not None:
                    self.k[i][:B, :, at] = k[:, :, 0]
                    self.v[i][:B, :, at] = v[:, :, 0]
                else:
                    self.k[i][rows, :, positions] = k[:, :, 0]                      # (B, Hkv, D) at each own position
                    self.v[i][rows, :, positions] = v[:, :, 0]

            def read(k, v, i=i):
                return self.k[i][:B, :, :span], self.v[i][:B, :, :span]
            x = self._attend(i, x, cos, sin, write, read, mask, causal=False)
        return self._head(x[:, 0])

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy slot src's first `length` cache rows to slot dst (compaction after a sequence leaves)."""
        for k, v in zip(self.k, self.v):
            k[dst, :, :length] = k[src, :, :length]
            v[dst, :, :length] = v[src, :, :length]
