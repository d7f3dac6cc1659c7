"""A lean forward pass over a Hugging Face Llama's own modules, with a preallocated per-slot KV cache.

The serving engine keeps one cache slot per running sequence; active sequences always sit in slots
0..B-1 (the engine compacts on leave), so a decode step reads the cache through views, not gathers.
Each slot has its own length: a decode step gives every row its own position id and an attention mask
over the longest span. Compromise: Llama-family only (RoPE, RMSNorm, SwiGLU; any GQA ratio), and the
layers' nn.Linear modules are called as they are, so a dynamically quantized (int8) model runs unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass
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


class _Fused:
    """F.linear over fused (concatenated) plain weights; _rows() turns it into the decode path's mm."""

    def __init__(self, weight: Tensor):
        self.weight = weight

    def __call__(self, h: Tensor) -> Tensor:
        return F.linear(h, self.weight)


def _plain(m: Any) -> bool:
    return type(m) is torch.nn.Linear and m.bias is None


def _rows(fn: Any):
    """(B, C) -> (B, N): torch.mm on the weight's transposed view for fused plain weights (what F.linear
    runs inside), the module or callable itself otherwise (a quantized Linear takes 2-D input as is)."""
    if isinstance(fn, _Fused):
        wt = fn.weight.t()
        return lambda h: torch.mm(h, wt)
    return fn


def _residual(linear: Any):
    """(x, h) -> x + linear(h): one addmm for a plain fp32 Linear (bit-identical to mm then add on CPU,
    checked); in bf16/fp16 addmm would skip HF's rounding of the projection before the add, so mm + add."""
    if _plain(linear):
        wt = linear.weight.detach().t()
        if wt.dtype == torch.float32 and wt.device.type == "cpu":
            return lambda x, h: torch.addmm(x, h, wt)
        return lambda x, h: x + torch.mm(h, wt)
    return lambda x, h: x + linear(h)


def _norm_args(norm: Any) -> tuple[Tensor, float]:
    return norm.weight.detach(), float(norm.variance_epsilon)


@dataclass
class _NormView:
    """What _rms_norm reads from a LlamaRMSNorm (for the non-fp32 fallback of the decode path)."""
    weight: Tensor
    variance_epsilon: float


@dataclass
class _DecodeLayer:
    ln1: tuple[Tensor, float]
    ln2: tuple[Tensor, float]
    qkv: Any
    gate_up: Any
    o: Any
    down: Any
    inter: int


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
        # The decode path's view of the same weights: 2-D callables, norms as (weight, eps), RoPE tables
        # tiled over the q and k heads (one multiply covers every head).
        self.embed = self.decoder.embed_tokens.weight.detach()
        self.cos_qk, self.sin_qk = self.cos.repeat(1, self.n_head + self.n_kv), self.sin.repeat(1, self.n_head + self.n_kv)
        self.rows = torch.arange(max_batch, device=self.device)
        self.fast = [_DecodeLayer(
            ln1=_norm_args(l.input_layernorm), ln2=_norm_args(l.post_attention_layernorm),
            qkv=_rows(self.qkv[i]), gate_up=_rows(self.gate_up[i]), o=_residual(l.self_attn.o_proj),
            down=_residual(l.mlp.down_proj), inter=l.mlp.gate_proj.out_features) for i, l in enumerate(self.layers)]
        self.final_norm, self.head2d = _norm_args(self.decoder.norm), _rows(self.lm_head)

    @staticmethod
    def _fused(*linears: Any):
        """One matmul for several projections of the same input (fewer kernel launches per token): their
        weights concatenated; plain nn.Linear only, so a quantized model keeps calling its own modules.
        The weights are read once here: an engine serves the weights it was built with."""
        if all(_plain(m) for m in linears):
            weight = linears[0].weight.detach() if len(linears) == 1 else \
                torch.cat([m.weight.detach() for m in linears], dim=0)          # (sum N, C)
            return _Fused(weight)
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
        if all(_plain(m) for m in lins):
            qk = torch.cat([attn.q_proj.weight, attn.k_proj.weight]).detach()           # ((H + Hkv) D, C)
            rot = _rotate_half(qk.view(H + Hkv, D, -1).transpose(1, 2)).transpose(1, 2).reshape(qk.shape)
            return _Fused(torch.cat([qk, attn.v_proj.weight.detach(), rot]))

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
    def decode(self, tokens: Tensor, positions: Tensor | None, span: int, same_length: bool) -> Tensor:
        """One token for each of slots 0..B-1: tokens, positions (B,) -> logits (B, V).

        span = max(positions) + 1 (known to the caller without a device sync); same_length says every
        row sits at the same position span - 1, so no mask is needed (the batch-1 case: as HF's own decode
        step) and positions may be None.
        """
        return self.decode_graph(tokens, positions, span, same_length)

    def decode_graph(self, tokens: Tensor, positions: Tensor | None, span: int, same_length: bool) -> Tensor:
        """decode() without its inference_mode wrapper: what torch.compile takes (call it under no_grad;
        dynamo cannot trace inference-mode tensors, measured here with torch 2.13).

        Batch-1 decode on CPU is bound by per-op overhead (~1-4 us per op, ~40 ops per layer), so this
        path works on 2-D (B, C) rows: torch.mm on the fused weights' transposed views (what F.linear
        does inside, minus three dispatches), addmm for projection + residual (bit-identical to mm then
        add, checked), cache reads and writes through one as_strided view each, in-place norm ops.
        """
        B = tokens.shape[0]
        H, Hkv, D = self.n_head, self.n_kv, self.head_dim
        A, KV = (H + Hkv) * D, Hkv * D                                             # q+k width, k (or v) width
        x = F.embedding(tokens, self.embed)                                         # (B, C)
        if same_length:  # one shared position: strided views instead of gathers and scatters, no mask
            at, mask = span - 1, None
            cos, sin = self.cos_qk[at], self.sin_qk[at]                             # (A,)
        else:
            at = None
            cos, sin = self.cos_qk[positions], self.sin_qk[positions]               # (B, A)
            mask = (self.positions[:span][None] <= positions[:, None])[:, None, None]  # (B, 1, 1, S)
            rows = self.rows[:B]
        s0, s1, s2, s3 = self.k[0].stride()
        for i, lay in enumerate(self.fast):
            qkv = lay.qkv(self._norm(x, lay.ln1))                                   # (B, A + KV + A)
            qk = qkv[:, :A] * cos + qkv[:, A + KV:] * sin                           # RoPE on q and k at once
            k_new, v_new = qk[:, H * D:].view(B, Hkv, D), qkv[:, A:A + KV].view(B, Hkv, D)
            kc, vc = self.k[i], self.v[i]
            if at is not None:
                torch.as_strided(kc, (B, Hkv, D), (s0, s1, s3), at * s2).copy_(k_new)
                torch.as_strided(vc, (B, Hkv, D), (s0, s1, s3), at * s2).copy_(v_new)
            else:
                kc[rows, :, positions] = k_new                                      # each row at its own position
                vc[rows, :, positions] = v_new
            keys = torch.as_strided(kc, (B, Hkv, span, D), (s0, s1, s2, s3))        # (B, Hkv, S, D)
            values = torch.as_strided(vc, (B, Hkv, span, D), (s0, s1, s2, s3))
            if Hkv != H:
                keys, values = keys.repeat_interleave(H // Hkv, dim=1), values.repeat_interleave(H // Hkv, dim=1)
            y = F.scaled_dot_product_attention(qk[:, :H * D].view(B, H, 1, D), keys, values, attn_mask=mask,
                                               scale=self.scale)                    # (B, H, 1, D)
            x = lay.o(x, y.reshape(B, H * D))                                       # x + o_proj(y)
            gu = lay.gate_up(self._norm(x, lay.ln2))                                # (B, 2I)
            x = lay.down(x, F.silu(gu[:, :lay.inter]) * gu[:, lay.inter:])          # x + down(SwiGLU)
        return self.head2d(self._norm(x, self.final_norm))                          # (B, V)

    @staticmethod
    def _norm(x: Tensor, norm: tuple[Tensor, float]) -> Tensor:
        """LlamaRMSNorm on fp32 (B, C) rows, op for op as HF (x * x is pow(2) exactly), in place where safe."""
        weight, eps = norm
        if x.dtype != torch.float32:
            return _rms_norm(x, _NormView(weight, eps))
        var = (x * x).mean(-1, keepdim=True)
        return weight * (x * var.add_(eps).rsqrt_())

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy slot src's first `length` cache rows to slot dst (compaction after a sequence leaves)."""
        for k, v in zip(self.k, self.v):
            k[dst, :, :length] = k[src, :, :length]
            v[dst, :, :length] = v[src, :, :length]
