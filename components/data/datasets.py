"""Datasets stage: corpus + tokenizer -> token arrays, SFT pairs and preference pairs under data/processed.

Token arrays are flat {train,val,test}.bin (uint16 below 65,536 ids) with EOT after every document,
plus meta.json. Pairs come from the corpus's documented functions (or the user's JSONL) and stay in
their document's split. A corpus pair longer than the model context is dropped (there are thousands);
a user's SFT pair (data.sft_jsonl: a retrain's feedback, each one paid for) is cut at a line boundary to
fit instead. All three outputs are built in temp sibling dirs, optionally checked, then renamed into
place together (or not at all).
"""
from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np

from components.config import Settings, resolve_model_shape
from components.data import layout
from components.data.cleaning import split_of, text_hash
from components.data.functions import extract_functions, make_pairs
from components.data.io import (atomic_write_json, read_jsonl, remove_dirs, replace_dirs, temp_dir_for,
                                write_jsonl)
from components.data.tokenizer import encode_many, format_pair, load_tokenizer
from components.errors import ConfigError, DataError

Check = Callable[[dict[str, Path]], None]


def read_corpus(settings: Settings) -> dict[str, list[dict]]:
    """Corpus documents grouped by split (corpus order kept)."""
    path = layout.corpus_path(settings)
    if not path.is_file():
        raise ConfigError(f"no corpus at {path}: run `llmcycle data ingest` first")
    by_split: dict[str, list[dict]] = {s: [] for s in layout.SPLITS}
    for line_no, row in read_jsonl(path):
        if row.get("split") not in by_split or not isinstance(row.get("text"), str) or not row.get("id"):
            raise DataError(f"{path}:{line_no}: expected id, split in {layout.SPLITS} and a string text")
        by_split[row["split"]].append(row)
    return by_split


def token_arrays(tokenizer, by_split: dict[str, list[dict]], out: Path) -> dict:
    """Write {split}.bin and meta.json into `out`; return meta."""
    vocab = len(tokenizer)
    dtype = np.uint16 if vocab < 65_536 else np.uint32
    eot = tokenizer.eos_token_id
    meta = {"dtype": np.dtype(dtype).name, "vocab_size": vocab, "eot_id": eot, "pad_id": tokenizer.pad_token_id,
            "tokens": {}, "documents": {}}
    for split, docs in by_split.items():
        ids = encode_many(tokenizer, [d["text"] for d in docs])
        parts = []
        for seq in ids:
            parts.append(np.asarray(seq, dtype=dtype))
            parts.append(np.asarray([eot], dtype=dtype))      # closes every document: (n_i + 1,)
        arr = np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)
        arr.tofile(out / f"{split}.bin")
        meta["tokens"][split] = int(arr.size)
        meta["documents"][split] = len(docs)
    atomic_write_json(out / "meta.json", meta)
    return meta


def _user_pairs(settings: Settings, key: str, fields: tuple[str, ...]) -> dict[str, list[dict]]:
    """The user's JSONL pairs, split by a hash of the prompt (identical prompts share a split), or by the
    row's own `split` field (train | val | test) when it has one: a retrain keeps the splits it was given."""
    raw = getattr(settings.data, key)
    path = settings.path(Path(raw).expanduser())
    if not path.is_file():
        raise ConfigError(f"data.{key}: file does not exist: {path}")
    prefix = key.removesuffix("_jsonl")
    by_split: dict[str, list[dict]] = {s: [] for s in layout.SPLITS}
    seen: set[str] = set()
    for line_no, obj in read_jsonl(path):
        for f in fields:
            if not isinstance(obj.get(f), str) or not obj[f]:
                raise DataError(f"{path}:{line_no}: missing or empty string field {f!r} (expected {', '.join(fields)})")
        row_id = f"{prefix}:{obj['id']}" if obj.get("id") is not None else f"{prefix}:line-{line_no}"
        if row_id in seen:
            raise DataError(f"{path}:{line_no}: duplicate id {row_id!r}")
        seen.add(row_id)
        row = {"id": row_id, "doc_id": row_id, "name": str(obj.get("name", "")), **{f: obj[f] for f in fields},
               **_weight_and_domain(obj, path, line_no)}
        if "chosen" in fields:
            row["kind"] = "user"      # provenance, whatever the file says: one of the known kinds
        split = obj.get("split")
        if split is None:
            split = split_of(text_hash(obj["prompt"]), settings.data.split.val, settings.data.split.test)
        elif split not in by_split:
            raise DataError(f"{path}:{line_no}: field 'split' must be one of {', '.join(layout.SPLITS)}, got {split!r}")
        by_split[split].append(row)
    return by_split


def _weight_and_domain(obj: dict, path: Path, line_no: int) -> dict:
    """A pair's optional `weight` (training sampling weight, a positive number; a retrain up-weights its new
    pairs) and `domain` (a name the gate scores separately, e.g. `drifted`), checked and passed through."""
    out: dict = {}
    if "weight" in obj:
        w = obj["weight"]
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not w > 0 or w != w or w == float("inf"):
            raise DataError(f"{path}:{line_no}: field 'weight' must be a positive finite number, got {w!r}")
        out["weight"] = float(w)
    if "domain" in obj:
        if not isinstance(obj["domain"], str) or not obj["domain"].isidentifier():
            raise DataError(f"{path}:{line_no}: field 'domain' must be a name (letters, digits, _), "
                            f"got {obj['domain']!r}")
        out["domain"] = obj["domain"]
    return out


def _corpus_pairs(settings: Settings, by_split: dict[str, list[dict]]) -> tuple[dict, dict, int]:
    sft: dict[str, list[dict]] = {}
    pref: dict[str, list[dict]] = {}
    n_functions = 0
    for split, docs in by_split.items():
        fns = [fn for d in docs for fn in extract_functions(d["text"], d["id"])]
        n_functions += len(fns)
        sft[split], pref[split] = make_pairs(fns, settings.data.seed)
    return sft, pref, n_functions


def _fit(tokenizer, rows: list[dict], answers: tuple[str, ...], block_size: int,
         cache: dict[str, int]) -> tuple[list[dict], int]:
    """Rows whose longest rendered exchange (prompt + each answer, chat template) fits block_size.
    `cache` maps rendered text -> token count (an SFT response is also a preference `chosen`)."""
    longest = [0] * len(rows)
    for field in answers:
        texts = [format_pair(tokenizer, r["prompt"], r[field]) for r in rows]
        todo = sorted({t for t in texts if t not in cache})
        for text, ids in zip(todo, encode_many(tokenizer, todo, specials_as_text=False)):
            cache[text] = len(ids)
        longest = [max(n, cache[t]) for n, t in zip(longest, texts)]
    keep = [r for r, n in zip(rows, longest) if n <= block_size]
    return keep, len(rows) - len(keep)


def _trim(tokenizer, rows: list[dict], block_size: int) -> tuple[list[dict], int]:
    """(rows, n_cut): each SFT row whose rendered pair is longer than block_size keeps the longest head of its
    response, whole lines, that fits (binary search over the line count); a row none of whose lines fit stays
    as it is, for _fit to drop. Why: a correction's first lines still teach the domain it came from."""
    def fits(prompt: str, response: str) -> bool:
        ids = encode_many(tokenizer, [format_pair(tokenizer, prompt, response)], specials_as_text=False)[0]
        return len(ids) <= block_size

    out, n_cut = [], 0
    for row in rows:
        lines = row["response"].split("\n")
        if len(lines) < 2 or fits(row["prompt"], row["response"]):
            out.append(row)
            continue
        lo, hi = 0, len(lines) - 1          # invariant: lines[:lo] fits (or lo == 0), lines[:hi + 1] does not
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fits(row["prompt"], "\n".join(lines[:mid])) else (lo, mid - 1)
        if lo and "\n".join(lines[:lo]).strip():
            out.append({**row, "response": "\n".join(lines[:lo])})
            n_cut += 1
        else:
            out.append(row)
    return out, n_cut


def _cap(by_split: dict[str, list[dict]], cap: int | None, seed: int) -> dict[str, list[dict]]:
    """At most `cap` rows over all splits: a hash-ordered (pseudo-random, deterministic) subset, so
    every split keeps roughly its share; order within a split is preserved."""
    total = sum(len(v) for v in by_split.values())
    if cap is None or total <= cap:
        return by_split
    ranked = sorted((text_hash(f"{seed}:{r['id']}"), split, r["id"]) for split, rows in by_split.items() for r in rows)
    chosen = {(split, rid) for _, split, rid in ranked[:cap]}
    return {s: [r for r in rows if (s, r["id"]) in chosen] for s, rows in by_split.items()}


def _write_split_jsonl(out: Path, by_split: dict[str, list[dict]]) -> None:
    for split in layout.SPLITS:
        with open(out / f"{split}.jsonl", "w", encoding="utf-8") as f:
            write_jsonl(f, by_split.get(split, []))


def run(settings: Settings, check: Check | None = None) -> dict:
    """Build tokens/, sft/ and preference/ under data/processed; `check(tmp_paths)` may raise DataError
    to abort before anything is renamed into place. Returns stats."""
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(settings)
    by_split = read_corpus(settings)
    if not by_split["train"]:
        raise DataError(f"{layout.corpus_path(settings)}: the train split is empty")
    block_size = int(resolve_model_shape(settings, vocab_size=len(tokenizer))["block_size"])

    finals = {"tokens": layout.tokens_dir(settings), "sft": layout.sft_dir(settings),
              "preference": layout.preference_dir(settings)}
    tmps: dict[str, Path] = {}
    try:
        for key, final in finals.items():
            tmps[key] = temp_dir_for(final)
        meta = token_arrays(tokenizer, by_split, tmps["tokens"])
        t_tokens = time.perf_counter() - t0

        d = settings.data
        sft, pref, n_functions = ({}, {}, 0) if d.sft_jsonl and d.preference_jsonl else _corpus_pairs(settings, by_split)
        if settings.data.sft_jsonl:
            sft = _user_pairs(settings, "sft_jsonl", ("prompt", "response"))
        if settings.data.preference_jsonl:
            pref = _user_pairs(settings, "preference_jsonl", ("prompt", "chosen", "rejected"))
        too_long = {"sft": 0, "preference": 0}
        cut = 0
        lengths: dict[str, int] = {}
        for split in layout.SPLITS:
            if settings.data.sft_jsonl:
                sft[split], n = _trim(tokenizer, sft[split], block_size)
                cut += n
            sft[split], n = _fit(tokenizer, sft[split], ("response",), block_size, lengths)
            too_long["sft"] += n
            pref[split], n = _fit(tokenizer, pref[split], ("chosen", "rejected"), block_size, lengths)
            too_long["preference"] += n
        sft = _cap(sft, settings.data.max_sft_pairs, settings.data.seed)
        pref = _cap(pref, settings.data.max_sft_pairs, settings.data.seed)
        _write_split_jsonl(tmps["sft"], sft)
        _write_split_jsonl(tmps["preference"], pref)

        if check is not None:
            check(dict(tmps))
        replace_dirs({tmps[k]: finals[k] for k in finals})
    except BaseException:
        remove_dirs(list(tmps.values()))
        raise

    kinds = Counter(r["kind"] for rows in pref.values() for r in rows)
    return {
        "paths": {k: str(v) for k, v in finals.items()},
        "dtype": meta["dtype"],
        "vocab_size": meta["vocab_size"],
        "block_size": block_size,
        "tokens": meta["tokens"],
        "documents": meta["documents"],
        "functions": n_functions,
        "sft": {s: len(sft[s]) for s in layout.SPLITS},
        "preference": {s: len(pref[s]) for s in layout.SPLITS},
        "preference_kinds": dict(sorted(kinds.items())),
        "dropped_too_long": too_long,
        "sft_cut_to_fit": cut,
        "seconds_tokens": round(t_tokens, 3),
        "seconds": round(time.perf_counter() - t0, 3),
    }
