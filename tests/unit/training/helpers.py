"""Tiny data-stage outputs for training tests: a BPE tokenizer and token arrays in a temp project.

Written straight into the layout paths (no DVC, no ingest) so model and training tests start in
under a second; the tokenizer is trained once per session on the deterministic test corpus.
"""
from __future__ import annotations

import functools
import json
import random

import numpy as np

from components.config import Settings
from components.data import layout
from tests.corpus_factory import make_module


@functools.lru_cache(maxsize=None)
def _texts(n_docs: int = 40, seed: int = 0) -> tuple[str, ...]:
    rng = random.Random(seed)
    return tuple(make_module(rng, i) for i in range(n_docs))


@functools.lru_cache(maxsize=None)
def _raw_tokenizer(vocab_size: int):
    from components.data.tokenizer import train_bpe
    return train_bpe(iter(_texts()), vocab_size, min_frequency=2)


def tiny_tokenizer(vocab_size: int = 400):
    """A fresh PreTrainedTokenizerFast (byte-level BPE, project special tokens) trained on the test corpus."""
    from components.data.tokenizer import wrap
    return wrap(_raw_tokenizer(vocab_size))  # wrap deep-copies the backend: the cached one stays clean


def write_tiny_data(settings: Settings, vocab_size: int = 400, val_docs: int = 6) -> object:
    """Save the tokenizer to tokenizer_dir, {train,val,test}.bin + meta.json to tokens_dir and the documents to
    data/raw/corpus.jsonl (what evaluation's bits per byte reads); returns the tokenizer."""
    tok = tiny_tokenizer(vocab_size)
    tok.save_pretrained(str(layout.tokenizer_dir(settings)))
    texts = list(_texts())
    splits = {"train": texts[: -2 * val_docs], "val": texts[-2 * val_docs: -val_docs], "test": texts[-val_docs:]}
    out = layout.tokens_dir(settings)
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split, docs in splits.items():
        ids: list[int] = []
        for doc in docs:  # EOT after every document, as the data stage writes them
            ids.extend(tok.encode(doc, add_special_tokens=False))
            ids.append(tok.eos_token_id)
        np.asarray(ids, dtype=np.uint16).tofile(out / f"{split}.bin")
        counts[split] = len(ids)
    meta = {"dtype": "uint16", "vocab_size": len(tok), "eot_id": tok.eos_token_id, "pad_id": tok.pad_token_id,
            "tokens": counts}
    (out / "meta.json").write_text(json.dumps(meta))
    corpus = layout.corpus_path(settings)
    corpus.parent.mkdir(parents=True, exist_ok=True)
    corpus.write_text("".join(json.dumps({"id": f"{split}{i}", "split": split, "text": doc}) + "\n"
                              for split, docs in splits.items() for i, doc in enumerate(docs)))
    return tok


def varied_tiny_model(shape: dict, tokenizer, seed: int = 0):
    """A tiny Llama whose greedy paths are varied and well separated (for exact-output comparisons).

    At init the residual stream is mostly the input embedding, so a tied model just repeats its last
    token; scaling the block matrices by 8 gives distinct continuations to test decoders against.
    """
    import torch

    from components.model.build import build_model

    torch.manual_seed(seed)
    m = build_model(shape, tokenizer)
    with torch.no_grad():
        for p in m.model.layers.parameters():
            if p.dim() == 2:
                p.mul_(8)
    return m.eval()
