"""Per-request descriptors for drift monitoring, computed locally (no download, no NLTK, no Hub).

One row per request: the user's prompt text (chat markup stripped, so a chat request and a raw
completion request compare alike), its length, rare-token and byte-fallback shares, its bits per
byte under the serving model, and the completion's length, mean log-prob and parse flag. Latency
is kept for the window's record but is not a drift column (the reference has no served latency).
Rare tokens: ids outside the most frequent ones covering `rare_token_coverage` of the training tokens.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from components.data import layout

# Drift columns, in report order. "prompt" is the text column; the rest are numbers.
PROMPT_COLUMNS = ["prompt_chars", "prompt_tokens", "prompt_rare_share", "prompt_byte_fallback_share",
                  "prompt_bits_per_byte"]
COMPLETION_COLUMNS = ["completion_chars", "completion_tokens", "completion_mean_logprob", "completion_parses"]
NUMERIC_COLUMNS = PROMPT_COLUMNS + COMPLETION_COLUMNS
TEXT_COLUMN = "prompt"
EMBEDDING = "embedding"

_USER_TURN = re.compile(re.escape(layout.USER) + r"\n(.*?)" + re.escape(layout.END_OF_TURN), re.DOTALL)


def user_text(prompt: str) -> str:
    """The last user turn of a chat-formatted prompt, else the prompt itself (a raw completion request)."""
    turns = _USER_TURN.findall(prompt or "")
    return turns[-1] if turns else (prompt or "")


@dataclass
class TokenStats:
    """Which token ids count as rare (by training frequency) for one tokenizer."""
    rare: np.ndarray          # (V,) bool
    source: str               # "train tokens" or "id rank" (the fallback)

    @classmethod
    def from_counts(cls, counts: np.ndarray, coverage: float, source: str = "train tokens") -> "TokenStats":
        """Rare = not among the most frequent ids that together cover `coverage` of all counted tokens."""
        order = np.argsort(-counts, kind="stable")
        cum = np.cumsum(counts[order]) / max(1, counts.sum())
        n_common = int(np.searchsorted(cum, coverage) + 1)
        rare = np.ones(len(counts), dtype=bool)
        rare[order[:n_common]] = False
        return cls(rare, source)

    @classmethod
    def for_tokenizer(cls, settings: Any, tokenizer: Any, coverage: float) -> "TokenStats":
        """From data/processed/tokens/train.bin when it was written with this tokenizer's vocabulary.

        Otherwise (no token arrays, another vocabulary) BPE's merge order stands in: later merges are
        rarer pairs, so ids ranked by id play the part of ids ranked by frequency.
        """
        import json

        vocab = len(tokenizer)
        folder = layout.tokens_dir(settings)
        meta_path, train = folder / "meta.json", folder / "train.bin"
        if meta_path.is_file() and train.is_file():
            meta = json.loads(meta_path.read_text())
            if int(meta.get("vocab_size", -1)) == vocab:
                ids = np.fromfile(train, dtype=np.dtype(meta.get("dtype", "uint16")))
                return cls.from_counts(np.bincount(ids, minlength=vocab)[:vocab].astype(np.float64), coverage)
        return cls.from_counts(np.linspace(vocab, 1, vocab), coverage, source="id rank")


def byte_fallback_bytes(text: str, offsets: Sequence[tuple[int, int]]) -> int:
    """UTF-8 bytes of the characters the tokenizer could only spell as several byte tokens.

    A byte-level BPE gives every piece of a split character the same one-character offset span, so a
    span that occurs more than once is a character that fell back to bytes.
    """
    seen: dict[tuple[int, int], int] = {}
    for span in offsets:
        seen[span] = seen.get(span, 0) + 1
    return sum(len(text[a:b].encode("utf-8")) for (a, b), n in seen.items() if n > 1 and b - a == 1)


def text_features(tokenizer: Any, stats: TokenStats, texts: list[str]) -> list[dict[str, float]]:
    """chars, tokens, rare share and byte-fallback share of each text (specials spelt as text)."""
    backend = tokenizer.backend_tokenizer
    previous = backend.encode_special_tokens
    backend.encode_special_tokens = True
    try:
        encs = backend.encode_batch(list(texts), add_special_tokens=False)
    finally:
        backend.encode_special_tokens = previous
    out = []
    for text, enc in zip(texts, encs):
        ids = np.asarray(enc.ids, dtype=np.int64)
        nbytes = len(text.encode("utf-8"))
        rare = float(stats.rare[ids[ids < len(stats.rare)]].sum()) / len(ids) if len(ids) else 0.0
        out.append({"chars": float(len(text)), "tokens": float(len(ids)), "rare_share": rare,
                    "byte_fallback_share": byte_fallback_bytes(text, enc.offsets) / nbytes if nbytes else 0.0})
    return out


def prompt_bits_per_byte(model: Any, tokenizer: Any, texts: list[str]) -> list[float]:
    """Bits per UTF-8 byte of each text read as a fresh document (after EOT) under the model; NaN if empty."""
    from components.data.tokenizer import encode_many
    from components.evaluation.bpb import Scored, model_bits

    eot = tokenizer.eos_token_id
    ids = encode_many(tokenizer, texts)
    block = int(getattr(model.config, "max_position_embeddings", 256))
    items = [Scored(str(i), [eot], t, len(x.encode("utf-8"))) for i, (x, t) in enumerate(zip(texts, ids))]
    keep = [i for i, it in enumerate(items) if it.target and it.nbytes]
    bits = model_bits(model, [items[i] for i in keep], block, next(model.parameters()).device) if keep else []
    out = [math.nan] * len(texts)
    for i, b in zip(keep, bits):
        out[i] = float(b) / items[i].nbytes
    return out


def completion_mean_logprobs(model: Any, tokenizer: Any, prompts: list[str], completions: list[str]) -> list[float]:
    """Mean natural log-prob per completion token given the chat-formatted prompt (temperature 1, as the
    engine logs it); NaN for an empty completion."""
    from components.data.tokenizer import encode_many
    from components.evaluation.bpb import LN2, Scored, model_bits
    from components.training.finetune_data import prompt_ids

    ctx = prompt_ids(tokenizer, prompts)
    tgt = encode_many(tokenizer, completions)
    block = int(getattr(model.config, "max_position_embeddings", 256))
    items = [Scored(str(i), c, t, 0) for i, (c, t) in enumerate(zip(ctx, tgt))]
    keep = [i for i, it in enumerate(items) if it.target]
    bits = model_bits(model, [items[i] for i in keep], block, next(model.parameters()).device) if keep else []
    out = [math.nan] * len(prompts)
    for i, b in zip(keep, bits):
        out[i] = -float(b) * LN2 / len(items[i].target)
    return out


def embeddings(model: Any, tokenizer: Any, texts: list[str], batch: int = 16) -> np.ndarray:
    """Mean of the last hidden state over each text's tokens -> (N, n_embd) float32."""
    import torch

    from components.data.tokenizer import encode_many

    eot = tokenizer.eos_token_id
    block = int(getattr(model.config, "max_position_embeddings", 256))
    rows = [([eot] + t)[-block:] for t in encode_many(tokenizer, texts)]
    device = next(model.parameters()).device
    out = []
    with torch.inference_mode():
        for k in range(0, len(rows), batch):
            chunk = rows[k:k + batch]
            width = max(len(r) for r in chunk)
            ids = torch.full((len(chunk), width), eot, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, r in enumerate(chunk):               # right padding: causal attention keeps the real tokens exact
                ids[i, :len(r)] = torch.tensor(r)
                mask[i, :len(r)] = 1
            hidden = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                           output_hidden_states=True).hidden_states[-1].float()   # (B, T, C)
            m = mask.to(device).unsqueeze(-1).float()
            out.append(((hidden * m).sum(1) / m.sum(1)).cpu().numpy())
    width = int(model.config.hidden_size)
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, width), np.float32)


def describe(model: Any, tokenizer: Any, stats: TokenStats, prompts: list[str], completions: list[str],
             mean_logprobs: list[float | None] | None = None, latencies: list[float | None] | None = None,
             with_embeddings: bool = False) -> list[dict[str, Any]]:
    """Descriptor rows for (user prompt, completion) pairs. mean_logprobs from the request log are used
    as given; missing ones (None) are computed under the model. Embeddings go in as one list column."""
    from components.evaluation.scorers import parses

    n = len(prompts)
    pf = text_features(tokenizer, stats, prompts)
    cf = text_features(tokenizer, stats, completions)
    bpb = prompt_bits_per_byte(model, tokenizer, prompts)
    given = list(mean_logprobs) if mean_logprobs is not None else [None] * n
    todo = [i for i, v in enumerate(given) if v is None]
    if todo:
        computed = completion_mean_logprobs(model, tokenizer, [prompts[i] for i in todo], [completions[i] for i in todo])
        for i, v in zip(todo, computed):
            given[i] = v
    emb = embeddings(model, tokenizer, prompts) if with_embeddings else None
    rows = []
    for i in range(n):
        row = {TEXT_COLUMN: prompts[i], "completion": completions[i],
               **{f"prompt_{k}": v for k, v in pf[i].items()},
               "prompt_bits_per_byte": bpb[i],
               "completion_chars": cf[i]["chars"], "completion_tokens": cf[i]["tokens"],
               "completion_mean_logprob": float(given[i]) if given[i] is not None else math.nan,
               "completion_parses": float(parses(completions[i])),
               "latency_s": (latencies[i] if latencies is not None and latencies[i] is not None else math.nan)}
        if emb is not None:
            row[EMBEDDING] = [float(x) for x in emb[i]]
        rows.append(row)
    return rows
