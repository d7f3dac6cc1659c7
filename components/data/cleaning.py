"""Document cleaning: UTF-8 decoding, newline normalization, hash splits, exact and near-duplicate removal.

Near duplicates use MinHash over word 5-shingles with LSH banding, vectorized in numpy (uint64
arithmetic wraps, which is what the hash functions want). Word hashes come from an id table built
in processing order, not Python's salted hash(), so results are identical across processes.
The index is incremental: a document is compared only with earlier kept ones ("drop the later one").
"""
from __future__ import annotations

import hashlib

import numpy as np

SHINGLE = 5
NUM_PERM = 64
SPLIT_BUCKETS = 10_000

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def decode(payload: bytes | str) -> str | None:
    """Text of a document, or None when it is not UTF-8 text (undecodable, NUL bytes, lone surrogates)."""
    if isinstance(payload, bytes):
        if b"\x00" in payload:
            return None
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError:
            return None
    else:
        if "\x00" in payload:
            return None
        try:
            # JSON can carry "\ud800": such a string cannot be written back as UTF-8.
            payload.encode("utf-8")
        except UnicodeEncodeError:
            return None
        text = payload
    return text


def normalize(text: str) -> str:
    """Drop a leading BOM, unify newlines to \\n, strip trailing whitespace at the end of the document."""
    if text.startswith("\ufeff"):
        text = text[1:]
    return text.replace("\r\n", "\n").replace("\r", "\n").rstrip()


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def split_of(key: str, val: float, test: float) -> str:
    """train/val/test from a hash of `key` alone: the same document always lands in the same split."""
    bucket = int(hashlib.sha256(key.encode("utf-8")).hexdigest(), 16) % SPLIT_BUCKETS
    if bucket < round(val * SPLIT_BUCKETS):
        return "val"
    if bucket < round((val + test) * SPLIT_BUCKETS):
        return "test"
    return "train"


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer: spreads sequential ids / sums over all 64 bits."""
    x = x ^ (x >> np.uint64(30))
    x = x * _M1
    x = x ^ (x >> np.uint64(27))
    x = x * _M2
    return x ^ (x >> np.uint64(31))


def choose_bands(threshold: float, num_perm: int = NUM_PERM, recall: float = 0.99) -> int:
    """Rows per LSH band: the largest r (dividing num_perm) that still makes a pair at exactly
    `threshold` a candidate with probability >= recall. Fewer candidates, same recall."""
    best = 1
    for r in range(1, num_perm + 1):
        if num_perm % r:
            continue
        b = num_perm // r
        if 1.0 - (1.0 - threshold ** r) ** b >= recall:
            best = r
    return best


class NearDupIndex:
    """Incremental MinHash-LSH index; `add(text)` returns False when text near-duplicates a kept doc."""

    def __init__(self, threshold: float, num_perm: int = NUM_PERM, seed: int = 0):
        self.threshold = threshold
        self.num_perm = num_perm
        self.rows = choose_bands(threshold, num_perm)
        rng = np.random.default_rng(seed)
        # Odd multipliers make x -> a*x + b a bijection mod 2^64: one "permutation" per column.
        self._a = rng.integers(1, 2**63, size=num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        self._b = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64)
        self._k = _mix(np.arange(1, SHINGLE + 1, dtype=np.uint64) * _GOLDEN)
        self._words: dict[str, int] = {}
        self._buckets: dict[tuple[int, bytes], list[int]] = {}
        self._sigs: list[np.ndarray] = []

    def signature(self, text: str) -> np.ndarray:
        words = text.split()
        table = self._words
        ids = np.fromiter((table.setdefault(w, len(table)) for w in words), dtype=np.uint64, count=len(words))
        h = _mix(ids + np.uint64(1))
        if len(h) >= SHINGLE:
            n = len(h) - SHINGLE + 1
            # Order-sensitive combination of 5 consecutive word hashes, re-mixed.
            sh = h[:n] * self._k[0]
            for j in range(1, SHINGLE):
                sh = sh + h[j:j + n] * self._k[j]
            sh = _mix(sh)
        else:
            sh = _mix(h.sum(dtype=np.uint64, keepdims=True) if len(h) else np.zeros(1, np.uint64))
        sig = np.empty(self.num_perm, dtype=np.uint64)
        # Chunk long documents so the (n, num_perm) temporary stays around 16 MB.
        chunk = 32_768
        sig.fill(np.iinfo(np.uint64).max)
        for start in range(0, len(sh), chunk):
            p = sh[start:start + chunk, None] * self._a + self._b       # (n, num_perm)
            p ^= p >> np.uint64(32)
            np.minimum(sig, p.min(axis=0), out=sig)
        return sig

    def add(self, text: str) -> bool:
        sig = self.signature(text)
        keys = [(b, sig[b * self.rows:(b + 1) * self.rows].tobytes()) for b in range(self.num_perm // self.rows)]
        seen: set[int] = set()
        for key in keys:
            for other in self._buckets.get(key, ()):
                if other in seen:
                    continue
                seen.add(other)
                if float(np.mean(self._sigs[other] == sig)) >= self.threshold:
                    return False
        idx = len(self._sigs)
        self._sigs.append(sig)
        for key in keys:
            self._buckets.setdefault(key, []).append(idx)
        return True


def estimate_jaccard(a: str, b: str, num_perm: int = 256) -> float:
    """MinHash Jaccard estimate of two texts' word 5-shingles (diagnostics and tests)."""
    index = NearDupIndex(threshold=1.0, num_perm=num_perm)
    return float(np.mean(index.signature(a) == index.signature(b)))


def exact_jaccard(a: str, b: str) -> float:
    def shingles(t: str) -> set[tuple[str, ...]]:
        w = t.split()
        return {tuple(w[i:i + SHINGLE]) for i in range(max(1, len(w) - SHINGLE + 1))}
    sa, sb = shingles(a), shingles(b)
    return len(sa & sb) / max(1, len(sa | sb)) if (sa or sb) else 1.0

