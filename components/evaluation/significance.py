"""Is a bits-per-byte gain real? A paired bootstrap over documents, pure numpy.

Both models are scored on the same documents, so the comparison is paired: resample documents with
replacement (the same indices for both), and for each resample take

    delta* = sum(bits_a*) / sum(bytes*)  -  sum(bits_b*) / sum(bytes*)

(the pooled bits per byte, as the metric itself is pooled). The (1 - confidence) / 2 and
(1 + confidence) / 2 percentiles of delta* bound the difference; a gain is significant only when
the whole interval lies below zero. Documents, not tokens, are the unit: tokens within a document are
not independent, and resampling them would make every gain look significant. A per-prompt 0/1 outcome
(syntax-valid, defines-name) is the same computation with bytes = 1: delta* is then the difference of
the two rates on the same prompts. `one_sided=True` puts each bound at `confidence` on its own (the
(1 - confidence) and confidence percentiles): what a regression test with a tolerance needs.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PairedInterval:
    delta: float        # observed bpb(a) - bpb(b); negative means a is better
    low: float          # the interval's bounds at `confidence`
    high: float
    confidence: float
    n_docs: int

    @property
    def a_better(self) -> bool:
        """a is significantly better (lower bits per byte): the whole interval is below zero."""
        return self.high < 0.0

    def describe(self, a: str = "candidate", b: str = "champion") -> str:
        return (f"{a} - {b} = {self.delta:+.4f} bits/byte, {self.confidence:.0%} interval "
                f"[{self.low:+.4f}, {self.high:+.4f}] over {self.n_docs} documents")


def paired_bootstrap(bits_a: np.ndarray, bits_b: np.ndarray, nbytes: np.ndarray, confidence: float = 0.95,
                     n_boot: int = 2000, seed: int = 0, one_sided: bool = False) -> PairedInterval:
    """Paired percentile-bootstrap interval of bpb(a) - bpb(b) over documents (see module docstring)."""
    a = np.asarray(bits_a, dtype=np.float64)
    b = np.asarray(bits_b, dtype=np.float64)
    w = np.asarray(nbytes, dtype=np.float64)
    if not (a.shape == b.shape == w.shape) or a.ndim != 1 or a.size == 0:
        raise ValueError(f"need three equal-length, non-empty 1-D arrays, got {a.shape}, {b.shape}, {w.shape}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    delta = (a.sum() - b.sum()) / w.sum()
    rng = np.random.default_rng(seed)  # own generator: never touches numpy's global state
    idx = rng.integers(0, a.size, size=(n_boot, a.size))                   # (n_boot, N) resampled documents
    boot = (a[idx].sum(axis=1) - b[idx].sum(axis=1)) / w[idx].sum(axis=1)  # (n_boot,)
    tail = (1.0 - confidence) if one_sided else (1.0 - confidence) / 2.0
    low, high = np.quantile(boot, [tail, 1.0 - tail])
    return PairedInterval(float(delta), float(low), float(high), float(confidence), int(a.size))
