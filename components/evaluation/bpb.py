"""Bits per byte: the tokenizer-independent score the promotion gate compares models on.

    bits/byte = sum over scored tokens of -log2 p(token | context)  /  UTF-8 bytes of the scored text

Two tokenizers cut the same text into different tokens, so per-token perplexity says nothing across
a vocabulary change; the bytes stay the same, so bits per byte does. Every model therefore tokenizes
the raw text with its own tokenizer. Per-document (bits, bytes) are kept: the gate's paired test
resamples documents. The end marker (<|end|> after a response, EOT after a document) is scored
too: knowing where the text stops is part of predicting it; it adds bits and no bytes.

A text longer than the context is scored in chunks of block_size targets, each chunk's window
reaching back block_size tokens (its first target sees the least context, an honest, documented
under-estimate of a one-token-stride sliding window at 1/block_size of its cost).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

LN2 = math.log(2.0)
SCORE_BATCH = 8      # windows per forward pass: small enough for a CPU, fine on a GPU


@dataclass
class DocScores:
    """Per-document bits and UTF-8 bytes of one evaluation set, in a fixed document order."""
    ids: list[str]
    bits: np.ndarray       # (N,) float64: -log2 p summed over the document's scored tokens
    nbytes: np.ndarray     # (N,) int64: UTF-8 bytes of the scored text

    @property
    def bits_per_byte(self) -> float:
        return float(self.bits.sum() / max(1, int(self.nbytes.sum())))

    def to_json(self) -> dict[str, Any]:
        return {"ids": list(self.ids), "bits": [float(b) for b in self.bits], "bytes": [int(b) for b in self.nbytes]}

    def subset(self, keep: Sequence[int]) -> "DocScores":
        """The documents at positions `keep`, in that order (a domain of an evaluation set)."""
        idx = np.asarray(list(keep), dtype=np.int64)
        return DocScores([self.ids[i] for i in idx], self.bits[idx], self.nbytes[idx])

    @classmethod
    def outcomes(cls, ids: Sequence[str], values: Sequence[bool | int | float]) -> "DocScores":
        """Per-prompt 0/1 outcomes (syntax-valid, defines-name) as bits = outcome, bytes = 1: the pooled value
        is then the rate, and the gate's paired bootstrap compares two models' rates on the same prompts."""
        return cls(list(ids), np.asarray(values, dtype=np.float64), np.ones(len(ids), dtype=np.int64))

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "DocScores":
        return cls(list(obj["ids"]), np.asarray(obj["bits"], dtype=np.float64), np.asarray(obj["bytes"], dtype=np.int64))


@dataclass
class Scored:
    """One text to score: context ids (not scored), target ids (scored), its id and byte count."""
    doc_id: str
    context: list[int]
    target: list[int]
    nbytes: int


def windows(item: Scored, block: int) -> list[tuple[list[int], int]]:
    """(window of <= block + 1 ids, how many of its last positions are targets) covering every target once.

    full = context + target; targets are positions len(context)..len(full)-1, taken block at a time;
    each window ends at its chunk's last target and reaches back block + 1 tokens (or to the start).
    """
    full = item.context + item.target
    first = max(1, len(item.context))          # position 0 has no context: never a target
    out = []
    for a in range(first, len(full), block):
        b = min(a + block, len(full))
        start = max(0, b - block - 1)
        out.append((full[start:b], b - a))
    return out


def model_bits(model: Any, items: Sequence[Scored], block: int, device: Any,
               batch: int = SCORE_BATCH) -> np.ndarray:
    """Bits (-log2 p) of every item's targets under a causal LM -> (len(items),) float64.

    Windows are right-padded (causal attention: padding after a token cannot change its logits), sorted by
    length to pad little, and the sums stay on the device until one transfer at the end.
    """
    import torch  # here, not at import: the CLI imports the gate (and this module) for its error types

    jobs = [(i, w, n) for i, item in enumerate(items) for w, n in windows(item, block)]
    jobs.sort(key=lambda job: len(job[1]))
    totals = torch.zeros(len(items), dtype=torch.float64, device=device)
    for k in range(0, len(jobs), batch):
        with torch.inference_mode():
            _score_chunk(model, jobs[k:k + batch], totals, device)
    return totals.cpu().numpy() / LN2


def _score_chunk(model: Any, chunk: list[tuple[int, list[int], int]], totals: Any, device: Any) -> None:
    """Add the target bits (in nats) of one batch of windows to totals[item]."""
    import torch

    width = max(len(w) for _, w, _ in chunk)
    ids = torch.zeros(len(chunk), width, dtype=torch.long)
    mask = torch.zeros(len(chunk), width - 1, dtype=torch.float32)
    for r, (_, w, n) in enumerate(chunk):
        ids[r, :len(w)] = torch.tensor(w)
        mask[r, len(w) - 1 - n:len(w) - 1] = 1.0                         # the last n targets of this window
    ids, mask = ids.to(device), mask.to(device)
    logits = model(input_ids=ids[:, :-1]).logits.float()                 # (B, T, V)
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")  # (B, T)
    rows = torch.tensor([i for i, _, _ in chunk], device=device)
    totals.index_add_(0, rows, (nll * mask).sum(dim=1).double())


def ngram_bits(logprob_fn: Any, items: Sequence[Scored]) -> np.ndarray:
    """Bits of every item's targets under a count model: logprob_fn(ids) -> ln p of ids[1:] (given ids[:-1])."""
    out = np.zeros(len(items), dtype=np.float64)
    for i, item in enumerate(items):
        full = np.asarray(item.context + item.target, dtype=np.int64)
        lp = logprob_fn(full)                                            # (len(full) - 1,)
        out[i] = -lp[len(item.context) - 1:].sum() / LN2 if item.context else -lp.sum() / LN2
    return out


def doc_scores(items: Sequence[Scored], bits: np.ndarray) -> DocScores:
    return DocScores([it.doc_id for it in items], np.asarray(bits, dtype=np.float64),
                     np.asarray([it.nbytes for it in items], dtype=np.int64))


# ----------------------------------------------------------------------------- the two evaluation sets
def test_documents(settings: Any, max_bytes: int | None) -> list[dict]:
    """Test-split documents in corpus order; with max_bytes, the first ones up to that many UTF-8 bytes.

    The cut is in bytes, not tokens, so every tokenizer sees the same documents.
    """
    from components.data.datasets import read_corpus

    docs = read_corpus(settings).get("test") or []
    if max_bytes is None:
        return docs
    out, total = [], 0
    for doc in docs:
        if out and total >= max_bytes:
            break
        out.append(doc)
        total += len(doc["text"].encode("utf-8"))
    return out


def test_items(tokenizer: Any, docs: list[dict]) -> list[Scored]:
    """<eot> + document + <eot> with the tokenizer given, as the data stage lays documents out."""
    from components.data.tokenizer import encode_many

    eot = tokenizer.eos_token_id
    ids = encode_many(tokenizer, [d["text"] for d in docs])
    return [Scored(str(d.get("id", i)), [eot], t + [eot], len(d["text"].encode("utf-8")))
            for i, (d, t) in enumerate(zip(docs, ids))]


def sft_items(tokenizer: Any, rows: list[dict], end_as_eot: bool = False) -> list[Scored]:
    """The chat-formatted prompt as context, the response + <|end|> as target (the task a champion serves).

    end_as_eot ends the target with EOT instead (for count models fit on raw text, which never saw <|end|>).
    """
    from components.data import layout
    from components.data.tokenizer import encode_many
    from components.training.finetune_data import prompt_ids

    end = tokenizer.eos_token_id if end_as_eot else tokenizer.convert_tokens_to_ids(layout.END_OF_TURN)
    prompts = prompt_ids(tokenizer, [r["prompt"] for r in rows])
    responses = encode_many(tokenizer, [r["response"] for r in rows], specials_as_text=True)
    return [Scored(str(r.get("id", i)), p, t + [end], len(r["response"].encode("utf-8")))
            for i, (r, p, t) in enumerate(zip(rows, prompts, responses))]


def read_scores(path: Path) -> dict[str, DocScores]:
    return {name: DocScores.from_json(obj) for name, obj in json.loads(path.read_text()).items()}
