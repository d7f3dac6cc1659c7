"""Ingest stage: source -> cleaned, deduplicated, split corpus at data/raw/corpus.jsonl.

Order: read -> decode (drop non-UTF-8/binary) -> normalize -> length filter -> sort by id ->
exact dedup (sha256) -> near dedup (MinHash-LSH, incremental, so max_documents can stop early with
the same result as deduplicating everything first) -> split by hash of the id -> atomic write.
"""
from __future__ import annotations

import time

from components.config import Settings
from components.data import layout
from components.data.cleaning import NearDupIndex, decode, normalize, split_of, text_hash
from components.data.io import atomic_file, write_jsonl
from components.data.sources import STDLIB_GLOB, Source, iter_raw, resolve_source
from components.errors import DataError

DROP_REASONS = ("too_short", "too_long", "not_utf8", "exact_dup", "near_dup")


def _found(source: Source, settings: Settings) -> str:
    if source.kind == "jsonl":
        return f"lines in {source.path}"
    pattern = STDLIB_GLOB if source.kind == "stdlib" else settings.data.glob
    return f"files matching {pattern!r} under {source.path} (excluding dirs {settings.data.exclude_dirs})"


def run(settings: Settings) -> dict:
    """Build data/raw/corpus.jsonl from settings.data.source; return stats. Raises ConfigError/DataError."""
    t0 = time.perf_counter()
    d = settings.data
    source = resolve_source(settings)
    dropped = dict.fromkeys(DROP_REASONS, 0)

    docs: list[tuple[str, str]] = []     # (id, normalized text)
    n_read = 0
    for raw in iter_raw(source, settings):
        n_read += 1
        text = decode(raw.payload)
        if text is None:
            dropped["not_utf8"] += 1
            continue
        text = normalize(text)
        if len(text) < d.min_chars:
            dropped["too_short"] += 1
        elif len(text) > d.max_chars:
            dropped["too_long"] += 1
        else:
            docs.append((raw.id, text))
    t_read = time.perf_counter() - t0

    if n_read == 0:
        raise DataError(f"data.source {source.spec}: empty corpus, found no {_found(source, settings)}")
    if dropped["not_utf8"] * 2 > n_read:
        raise DataError(f"data.source {source.spec}: {dropped['not_utf8']} of {n_read} documents are binary "
                        f"or not UTF-8 text; expected a text corpus")

    docs.sort(key=lambda item: item[0])
    index = NearDupIndex(d.near_dup_threshold, seed=d.seed)
    seen_hashes: set[str] = set()
    kept: list[dict] = []
    for doc_id, text in docs:
        if d.max_documents is not None and len(kept) >= d.max_documents:
            break
        h = text_hash(text)
        if h in seen_hashes:
            dropped["exact_dup"] += 1
            continue
        seen_hashes.add(h)
        if not index.add(text):
            dropped["near_dup"] += 1
            continue
        kept.append({"id": doc_id, "source": source.kind, "split": split_of(doc_id, d.split.val, d.split.test),
                     "text": text})
    t_dedup = time.perf_counter() - t0 - t_read

    if not kept:
        reasons = ", ".join(f"{k}={v}" for k, v in dropped.items() if v)
        raise DataError(f"data.source {source.spec}: read {n_read} documents but none remain after "
                        f"filtering ({reasons}; min_chars={d.min_chars}, max_chars={d.max_chars})")

    out = layout.corpus_path(settings)
    with atomic_file(out) as f:
        write_jsonl(f, kept)

    splits = {s: sum(1 for doc in kept if doc["split"] == s) for s in layout.SPLITS}
    return {
        "source": source.spec,
        "path": str(out),
        "read": n_read,
        "documents": len(kept),
        "chars": sum(len(doc["text"]) for doc in kept),
        "splits": splits,
        "dropped": dropped,
        "capped": d.max_documents is not None and len(kept) >= d.max_documents,
        "seconds": round(time.perf_counter() - t0, 3),
        "seconds_read": round(t_read, 3),
        "seconds_dedup": round(t_dedup, 3),
    }
