"""Datasets stage: token arrays vs meta, split-respecting pairs, context limits, user JSONL, check/abort."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from components import config as cfg
from components.data import datasets, ingest, layout, tokenizer
from components.data.io import read_jsonl
from components.errors import ConfigError, DataError


def _prepared(root: Path, *overrides: str) -> cfg.Settings:
    s = cfg.load(root / "params.yaml", overrides=list(overrides))
    ingest.run(s)
    tokenizer.run(s)
    return s


def _rows(directory: Path) -> dict[str, list[dict]]:
    return {sp: [r for _, r in read_jsonl(directory / f"{sp}.jsonl")] for sp in layout.SPLITS}


def test_token_arrays_match_meta(tiny_root):
    s = _prepared(tiny_root)
    stats = datasets.run(s)
    out = layout.tokens_dir(s)
    meta = json.loads((out / "meta.json").read_text())
    tok = tokenizer.load_tokenizer(s)
    corpus = datasets.read_corpus(s)
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == len(tok) <= 400
    assert meta["eot_id"] == tok.eos_token_id and meta["pad_id"] == tok.pad_token_id
    for split in layout.SPLITS:
        arr = np.fromfile(out / f"{split}.bin", dtype=meta["dtype"])
        docs = corpus[split]
        assert arr.size == meta["tokens"][split] == stats["tokens"][split]
        assert meta["documents"][split] == len(docs) == stats["documents"][split]
        assert int((arr == meta["eot_id"]).sum()) == len(docs)              # one EOT closes each document
        if docs:
            first = tok.encode(docs[0]["text"])
            assert arr[: len(first)].tolist() == first and arr[len(first)] == meta["eot_id"]
            assert tok.decode(arr[: len(first)].tolist()) == docs[0]["text"]


def test_pairs_stay_in_their_documents_split_and_fit_context(tiny_root):
    s = _prepared(tiny_root, "model.block_size=512")
    stats = datasets.run(s)
    doc_split = {d["id"]: sp for sp, docs in datasets.read_corpus(s).items() for d in docs}
    sft, pref = _rows(layout.sft_dir(s)), _rows(layout.preference_dir(s))
    assert sum(stats["sft"].values()) > 50 and stats["sft"] == {k: len(v) for k, v in sft.items()}
    assert stats["preference"] == {k: len(v) for k, v in pref.items()}
    assert sum(stats["preference_kinds"].values()) == sum(stats["preference"].values())
    assert set(stats["preference_kinds"]) == {"truncated", "other_body", "shuffled"}
    for rows in (sft, pref):
        seen: dict[str, str] = {}
        for split, items in rows.items():
            for r in items:
                assert doc_split[r["doc_id"]] == split                       # no test function in train
                assert seen.setdefault(r["doc_id"], split) == split
    assert set(sft["train"][0]) == {"id", "doc_id", "name", "prompt", "response"}
    assert set(pref["train"][0]) == {"id", "doc_id", "name", "prompt", "chosen", "rejected", "kind"}
    for split, items in pref.items():         # other_body borrows a body from the same split only
        for r in items:
            if r["kind"] == "other_body":
                borrowed = r["rejected"].split('"""')[-1].strip()
                assert any(borrowed in t["response"] and t["id"] != r["id"] for t in sft[split])

    # A smaller context drops the longer pairs, and every kept pair fits in tokens.
    s.model.block_size = 128
    small = datasets.run(s)
    assert small["dropped_too_long"]["sft"] > 0
    tok = tokenizer.load_tokenizer(s)
    for r in (row for rows in _rows(layout.sft_dir(s)).values() for row in rows):
        assert len(tok.encode(tokenizer.format_pair(tok, r["prompt"], r["response"]))) <= 128
    for r in (row for rows in _rows(layout.preference_dir(s)).values() for row in rows):
        for answer in (r["chosen"], r["rejected"]):
            assert len(tok.encode(tokenizer.format_pair(tok, r["prompt"], answer))) <= 128


def test_max_sft_pairs_and_determinism(tiny_root):
    s = _prepared(tiny_root, "model.block_size=512", "data.max_sft_pairs=20")
    stats = datasets.run(s)
    assert sum(stats["sft"].values()) == 20 and sum(stats["preference"].values()) == 20
    first = (layout.sft_dir(s) / "train.jsonl").read_bytes()
    datasets.run(s)
    assert (layout.sft_dir(s) / "train.jsonl").read_bytes() == first


def test_check_raising_leaves_no_outputs(tiny_root):
    s = _prepared(tiny_root, "model.block_size=512")
    seen: dict[str, Path] = {}

    def check(paths: dict[str, Path]) -> None:
        seen.update(paths)
        assert (paths["tokens"] / "meta.json").is_file() and (paths["sft"] / "train.jsonl").is_file()
        assert (paths["preference"] / "test.jsonl").is_file()
        raise DataError("expectations failed")

    processed = layout.tokens_dir(s).parent
    with pytest.raises(DataError, match="expectations failed"):
        datasets.run(s, check=check)
    assert set(seen) == {"tokens", "sft", "preference"}
    assert [p.name for p in processed.iterdir()] == ["tokenizer"]          # nothing renamed, temps gone

    # With previous outputs in place, an aborted run keeps them as they were.
    datasets.run(s, check=lambda paths: None)
    before = (layout.sft_dir(s) / "train.jsonl").read_bytes()
    s.data.max_sft_pairs = 3
    with pytest.raises(DataError):
        datasets.run(s, check=check)
    assert (layout.sft_dir(s) / "train.jsonl").read_bytes() == before
    assert sorted(p.name for p in processed.iterdir()) == ["preference", "sft", "tokenizer", "tokens"]


def test_user_pair_jsonl(tiny_root):
    s = _prepared(tiny_root, "model.block_size=512")
    sft_path = tiny_root / "my_sft.jsonl"
    pref_path = tiny_root / "my_pref.jsonl"
    sft_path.write_text("".join(json.dumps({"prompt": f"Say {i}", "response": f"print({i})"}) + "\n" for i in range(30)))
    pref_path.write_text("".join(json.dumps({"id": i, "prompt": f"Say {i}", "chosen": f"print({i})",
                                             "rejected": "print("}) + "\n" for i in range(30)))
    s.data.sft_jsonl = "my_sft.jsonl"
    s.data.preference_jsonl = str(pref_path)
    stats = datasets.run(s)
    assert sum(stats["sft"].values()) == 30 and stats["preference_kinds"] == {"user": 30}
    sft, pref = _rows(layout.sft_dir(s)), _rows(layout.preference_dir(s))
    # Split by a hash of the prompt: the same prompt lands in the same split in both sets.
    where = {r["prompt"]: sp for sp, rows in sft.items() for r in rows}
    assert all(where[r["prompt"]] == sp for sp, rows in pref.items() for r in rows)
    assert sft["train"][0]["id"].startswith("sft:line-") and pref["train"][0]["id"].startswith("preference:")

    # A row's own `split` wins over the hash (a retrain keeps the splits it was given); a bad one is named.
    sft_path.write_text("".join(json.dumps({"prompt": f"Say {i}", "response": f"print({i})", "split": "test"})
                                + "\n" for i in range(30)))
    datasets.run(s)
    assert [len(rows) for rows in _rows(layout.sft_dir(s)).values()].count(30) == 1
    assert len(_rows(layout.sft_dir(s))["test"]) == 30
    sft_path.write_text(json.dumps({"prompt": "x", "response": "y", "split": "dev"}) + "\n")
    with pytest.raises(DataError, match=r"my_sft\.jsonl:1: field 'split' must be one of train, val, test, got 'dev'"):
        datasets.run(s)

    sft_path.write_text("".join(json.dumps({"prompt": f"Say {i}", "response": f"print({i})"}) + "\n" for i in range(30))
                        + json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(DataError, match=r"my_sft\.jsonl:31: missing or empty string field 'response'"):
        datasets.run(s)
    sft_path.write_text("{bad\n")
    with pytest.raises(DataError, match=r"my_sft\.jsonl:1: not valid JSON"):
        datasets.run(s)
    # A retrain's `weight` (sampling) and `domain` (a gated slice of test) pass through, checked.
    sft_path.write_text("".join(json.dumps({"prompt": f"Say {i}", "response": f"print({i})", "weight": 2.5,
                                            "domain": "drifted", "split": "test"}) + "\n" for i in range(30)))
    datasets.run(s)
    assert {(r["weight"], r["domain"]) for r in _rows(layout.sft_dir(s))["test"]} == {(2.5, "drifted")}
    for bad, why in (({"weight": 0}, "field 'weight' must be a positive finite number, got 0"),
                     ({"weight": "x"}, "field 'weight' must be a positive finite number, got 'x'"),
                     ({"domain": "a b"}, "field 'domain' must be a name")):
        sft_path.write_text(json.dumps({"prompt": "x", "response": "y", **bad}) + "\n")
        with pytest.raises(DataError, match=r"my_sft\.jsonl:1: " + re.escape(why)):
            datasets.run(s)
    s.data.sft_jsonl = "nope.jsonl"
    with pytest.raises(ConfigError, match=r"data\.sft_jsonl"):
        datasets.run(s)
    assert sorted(p.name for p in layout.tokens_dir(s).parent.iterdir()) == \
        ["preference", "sft", "tokenizer", "tokens"]


def test_a_long_user_sft_pair_is_cut_at_a_line_to_fit_and_a_long_corpus_pair_is_dropped(tiny_root):
    """A feedback correction longer than the context keeps its longest whole-line head that fits (the retrain
    learns its domain from it); the corpus's own too-long pairs are still dropped."""
    s = _prepared(tiny_root, "model.block_size=64")
    lines = [f"    value_{i} = compute_{i}(value_{i - 1})" for i in range(1, 40)]
    long_body = "def long_one():\n" + "\n".join(lines)
    (tiny_root / "my_sft.jsonl").write_text(
        json.dumps({"prompt": "def long_one():", "response": long_body, "split": "train"}) + "\n"
        + json.dumps({"prompt": "def short():", "response": "return 1", "split": "train"}) + "\n")
    s.data.sft_jsonl = "my_sft.jsonl"
    s.data.preference_jsonl = None
    stats = datasets.run(s)
    assert stats["sft_cut_to_fit"] == 1
    rows = {r["prompt"]: r["response"] for r in _rows(layout.sft_dir(s))["train"]}
    tok = tokenizer.load_tokenizer(s)
    n_tokens = lambda response: len(tok.encode(tokenizer.format_pair(tok, "def long_one():", response)))  # noqa: E731
    cut = rows["def long_one():"]
    kept = cut.count("\n")
    assert long_body.startswith(cut + "\n") and kept >= 1      # a head of whole lines, never the whole
    assert n_tokens(cut) <= 64 < n_tokens("\n".join(long_body.split("\n")[:kept + 2]))   # the longest that fits
    assert rows["def short():"] == "return 1"
    # The corpus pairs at this context: too long ones dropped, none cut.
    s.data.sft_jsonl = None
    corpus = datasets.run(s)
    assert corpus["dropped_too_long"]["sft"] > 0 and corpus["sft_cut_to_fit"] == 0
