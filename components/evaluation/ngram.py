"""Count-based baselines over token ids: interpolated Kneser-Ney trigram and add-one unigram.

They give the evaluation stage a floor a trained transformer must beat on the same token split.
Counts are numpy arrays of packed ids (sorted, looked up with searchsorted), not dicts, so ~3M
tokens fit in seconds; the price is ids packed as (u*V + v)*V + w, which needs V**3 < 2**63.
"""
from __future__ import annotations

import math

import numpy as np


def _lookup(keys: np.ndarray, values: np.ndarray, query: np.ndarray) -> np.ndarray:
    """values[keys == query] for each query, 0 where the key is absent (keys sorted ascending)."""
    if keys.size == 0:
        return np.zeros(query.shape, dtype=values.dtype)
    idx = np.minimum(np.searchsorted(keys, query), keys.size - 1)
    return np.where(keys[idx] == query, values[idx], 0)


def _group(sorted_keys: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For sorted keys: (unique keys, summed weights, number of rows per key)."""
    uniq, start, n_types = np.unique(sorted_keys, return_index=True, return_counts=True)
    total = np.add.reduceat(weights, start) if sorted_keys.size else np.zeros(0, dtype=weights.dtype)
    return uniq, total, n_types


class KneserNeyTrigram:
    """Interpolated Kneser-Ney (Chen & Goodman) with one absolute discount D for every order.

    P3(w|u,v) = max(c(uvw)-D, 0)/c(uv.) + D*N1+(uv.)/c(uv.) * P2(w|v)
    P2(w|v)   = max(N1+(.vw)-D, 0)/N1+(.v.) + D*|{w: N1+(.vw)>0}|/N1+(.v.) * P1(w)
    P1(w)     = max(N1+(.w)-D, 0)/N1+(..) + D*|{w: N1+(.w)>0}|/N1+(..) * 1/V
    A context never seen backs off entirely to the next order, so every token gets P > 0.
    """

    def __init__(self, vocab_size: int, discount: float = 0.75):
        if vocab_size < 1 or vocab_size ** 3 >= 2 ** 63:
            raise ValueError(f"vocab_size must be in [1, 2**21), got {vocab_size}")
        if not 0 < discount < 1:
            raise ValueError(f"discount must be in (0, 1), got {discount}")
        self.V = int(vocab_size)
        self.D = float(discount)
        self.fitted = False

    # ------------------------------------------------------------------ counting
    def fit(self, train_ids: np.ndarray) -> "KneserNeyTrigram":
        ids = self._check(train_ids)
        if ids.size < 3:
            raise ValueError(f"need at least 3 training tokens, got {ids.size}")
        V = self.V
        # Trigram counts c(uvw); np.unique sorts, so the context u*V+v comes out grouped.
        tri = (ids[:-2] * V + ids[1:-1]) * V + ids[2:]
        self.tri_keys, self.tri_counts = np.unique(tri, return_counts=True)
        # Trigram contexts: c(uv.) (token count) and N1+(uv.) (distinct followers).
        self.ctx3_keys, self.ctx3_count, self.ctx3_types = _group(self.tri_keys // V, self.tri_counts)

        # Bigram continuation N1+(.vw): distinct u seen before (v,w), i.e. trigram types per tail.
        tails = np.sort(self.tri_keys % (V * V))
        self.bi_keys, self.bi_cont = np.unique(tails, return_counts=True)
        # N1+(.v.) = sum over w of N1+(.vw); the follower count is the number of (v,w) types.
        self.ctx2_keys, self.ctx2_count, self.ctx2_types = _group(self.bi_keys // V, self.bi_cont)

        # Unigram continuation N1+(.w): distinct v seen before w, from all bigram types in the
        # stream (this includes the first bigram, which has no trigram around it).
        bigram_types = np.unique(ids[:-1] * V + ids[1:])
        self.uni_cont = np.bincount(bigram_types % V, minlength=V).astype(np.float64)
        total = float(bigram_types.size)
        seen = float(np.count_nonzero(self.uni_cont))
        self.p1 = (np.maximum(self.uni_cont - self.D, 0.0) + self.D * seen / V) / total
        self.fitted = True
        return self

    # ------------------------------------------------------------------ probabilities
    def _p2(self, v: np.ndarray, w: np.ndarray) -> np.ndarray:
        p1 = self.p1[w]
        n_ctx = _lookup(self.ctx2_keys, self.ctx2_count, v).astype(np.float64)
        n_types = _lookup(self.ctx2_keys, self.ctx2_types, v).astype(np.float64)
        cont = _lookup(self.bi_keys, self.bi_cont, v * self.V + w).astype(np.float64)
        safe = np.where(n_ctx > 0, n_ctx, 1.0)  # unseen context: weight below is 1, P2 = P1
        lam = np.where(n_ctx > 0, self.D * n_types / safe, 1.0)
        return np.maximum(cont - self.D, 0.0) / safe + lam * p1

    def _p3(self, u: np.ndarray, v: np.ndarray, w: np.ndarray) -> np.ndarray:
        p2 = self._p2(v, w)
        ctx = u * self.V + v
        n_ctx = _lookup(self.ctx3_keys, self.ctx3_count, ctx).astype(np.float64)
        n_types = _lookup(self.ctx3_keys, self.ctx3_types, ctx).astype(np.float64)
        count = _lookup(self.tri_keys, self.tri_counts, ctx * self.V + w).astype(np.float64)
        safe = np.where(n_ctx > 0, n_ctx, 1.0)
        lam = np.where(n_ctx > 0, self.D * n_types / safe, 1.0)
        return np.maximum(count - self.D, 0.0) / safe + lam * p2

    def prob(self, context: tuple[int, ...] | list[int], tokens: np.ndarray | int) -> np.ndarray:
        """P(token | last <= 2 context tokens), vectorised over tokens (all V: np.arange(V))."""
        self._require_fit()
        w = self._check(np.atleast_1d(np.asarray(tokens)))
        ctx = [int(t) for t in context][-2:]
        self._check(np.asarray(ctx, dtype=np.int64))
        if len(ctx) == 2:
            u, v = (np.full_like(w, c) for c in ctx)
            return self._p3(u, v, w)
        if len(ctx) == 1:
            return self._p2(np.full_like(w, ctx[0]), w)
        return self.p1[w]

    def logprob(self, context2: tuple[int, ...] | list[int], token: int) -> float:
        """Natural-log probability of one token after up to two context tokens."""
        return float(np.log(self.prob(context2, token)[0]))

    def token_logprobs(self, ids: np.ndarray) -> np.ndarray:
        """ln P(ids[t] | up to two previous tokens) for t = 1..n-1 -> (n - 1,).

        ids[0] is not scored (nothing precedes it), as a transformer's loss over a block skips
        its first token; ids[1] is scored by the bigram order, the rest by the trigram.
        """
        self._require_fit()
        ids = self._check(ids)
        if ids.size < 2:
            raise ValueError(f"need at least 2 tokens to score, got {ids.size}")
        logp = [np.log(self._p2(ids[:1], ids[1:2]))]
        if ids.size > 2:
            logp.append(np.log(self._p3(ids[:-2], ids[1:-1], ids[2:])))
        return np.concatenate(logp)

    def perplexity(self, ids: np.ndarray) -> float:
        """exp(mean NLL) over ids[1:] (see token_logprobs)."""
        return float(math.exp(-self.token_logprobs(ids).mean()))

    # ------------------------------------------------------------------ helpers
    def _check(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids).astype(np.int64, copy=False).ravel()
        if ids.size and (ids.min() < 0 or ids.max() >= self.V):
            raise ValueError(f"token ids must lie in [0, {self.V}), got range [{ids.min()}, {ids.max()}]")
        return ids

    def _require_fit(self) -> None:
        if not self.fitted:
            raise RuntimeError("KneserNeyTrigram: call fit(train_ids) first")


def unigram_perplexity(train_ids: np.ndarray, test_ids: np.ndarray, vocab_size: int) -> float:
    """Add-one (Laplace) unigram perplexity of test_ids: the floor every other model must beat."""
    train = np.asarray(train_ids).astype(np.int64, copy=False).ravel()
    test = np.asarray(test_ids).astype(np.int64, copy=False).ravel()
    if test.size == 0:
        raise ValueError("test_ids is empty")
    for label, arr in (("train_ids", train), ("test_ids", test)):
        if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
            raise ValueError(f"{label}: token ids must lie in [0, {vocab_size})")
    return float(math.exp(-AddOneUnigram(train, vocab_size).logp[test].mean()))


class AddOneUnigram:
    """Add-one (Laplace) unigram fit on train ids: P(w) = (c(w) + 1) / (N + V); the floor of every model."""

    def __init__(self, train_ids: np.ndarray, vocab_size: int):
        train = np.asarray(train_ids).astype(np.int64, copy=False).ravel()
        if train.size and (train.min() < 0 or train.max() >= vocab_size):
            raise ValueError(f"train_ids: token ids must lie in [0, {vocab_size})")
        counts = np.bincount(train, minlength=vocab_size).astype(np.float64)
        self.V = int(vocab_size)
        self.logp = np.log((counts + 1.0) / (train.size + vocab_size))

    def token_logprobs(self, ids: np.ndarray) -> np.ndarray:
        """ln P(ids[t]) for t = 1..n-1, the same positions a context model scores -> (n - 1,)."""
        ids = np.asarray(ids).astype(np.int64, copy=False).ravel()
        if ids.size and (ids.min() < 0 or ids.max() >= self.V):
            raise ValueError(f"token ids must lie in [0, {self.V})")
        return self.logp[ids[1:]]
