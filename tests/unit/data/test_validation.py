"""Data tests for the GE gates: a clean corpus and clean pairs pass; each kind of corruption fails by name.

GX costs seconds to import, so one module-scoped project root and settings serve every test;
each test writes its own tiny JSONL and validates into its own folder.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from components import config as cfg
from components.data import layout
from components.data.expectations import non_printable_share, read_jsonl
from components.data.validation import validate_corpus, validate_finetune
from components.errors import DataError
from tests.conftest import write_params
from tests.corpus_factory import make_module


@pytest.fixture(scope="module")
def settings(tmp_path_factory) -> cfg.Settings:
    root = tmp_path_factory.mktemp("validation")
    return cfg.load(write_params(root))


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _docs(n: int = 12) -> list[dict]:
    rng = random.Random(0)
    return [{"id": f"mod_{i}.py", "source": "test", "split": ("train", "val", "test")[i % 3],
             "text": make_module(rng, i)} for i in range(n)]


def _pairs(tmp: Path, kind: str, edit=None) -> Path:
    for split in layout.SPLITS:
        rows = []
        for i in range(3):
            row = {"id": f"{split}-{i}", "doc_id": f"mod_{i}.py", "name": f"f{i}",
                   "prompt": f"def f{i}(x):\n    \"\"\"Return x plus {i}.\"\"\"\n"}
            if kind == "sft":
                row["response"] = f"    return x + {i}\n"
            else:
                row.update(chosen=f"    return x + {i}\n", rejected=f"    return x - {i}\n", kind="other_body")
            rows.append(edit(split, i, row) if edit else row)
        _write_jsonl(tmp / kind / f"{split}.jsonl", rows)
    return tmp / kind


def test_clean_corpus_passes_and_writes_result_and_docs(settings, tmp_path):
    _write_jsonl(layout.corpus_path(settings), _docs())
    summary = validate_corpus(settings)  # default paths: data/raw/corpus.jsonl -> data/validation/corpus
    out = layout.validation_dir(settings, "corpus")
    assert summary["success"] and summary["rows"] == 12
    saved = json.loads((out / "result.json").read_text())
    assert saved["suite"] == "corpus" and saved["success"] is True and saved["source"] == "data/raw/corpus.jsonl"
    assert saved["statistics"]["unsuccessful_expectations"] == 0
    assert {e["type"] for e in saved["expectations"]} >= {
        "expect_column_values_to_be_unique", "expect_column_sum_to_be_between", "expect_column_values_to_be_in_set"}
    # Data Docs live outside the DVC output (GX timestamps them): data/gx/corpus/docs.
    assert (layout.docs_dir(settings, "corpus") / "docs" / "index.html").stat().st_size > 0
    assert saved["docs"] == "data/gx/corpus/docs/index.html"


def test_corrupt_corpus_names_each_failed_expectation(settings, tmp_path):
    docs = _docs()
    docs[1]["text"] = ""                                    # empty
    docs[2]["text"] = docs[2]["text"].replace("import os", "import\x00os")  # NUL
    docs[3]["text"] = docs[4]["text"]                       # duplicate of mod_4.py
    docs[5]["text"] = "x = 1\n"                             # too short
    out = tmp_path / "val"
    with pytest.raises(DataError) as err:
        validate_corpus(settings, _write_jsonl(tmp_path / "corpus.jsonl", docs), out)
    msg = str(err.value)
    assert msg.startswith("corpus validation failed (3 of ")
    length = next(line for line in msg.splitlines() if "(length, 32..400000)" in line)
    assert "2 rows" in length and "id=mod_1.py (0 chars)" in length and "id=mod_5.py (6 chars)" in length
    assert "expect_column_values_to_be_in_set(has_nul, {False})" in msg and "id=mod_2.py (contains NUL)" in msg
    assert "expect_column_values_to_be_unique(text_hash)" in msg and "id=mod_3.py (same text as id=mod_4.py)" in msg
    saved = json.loads((out / "result.json").read_text())
    assert saved["success"] is False and (out / "docs" / "index.html").exists()
    failed = [e for e in saved["expectations"] if not e["success"]]
    assert sorted(e["column"] for e in failed) == ["has_nul", "length", "text_hash"]
    dup = next(e for e in failed if e["column"] == "text_hash")
    assert dup["unexpected_count"] == 2 and {o["id"] for o in dup["offending"]} == {"mod_3.py", "mod_4.py"}


def test_finetune_passes_on_good_pairs(settings, tmp_path):
    summary = validate_finetune(settings, _pairs(tmp_path, "sft"), _pairs(tmp_path, "preference"), tmp_path / "out")
    assert summary["success"] and set(summary["suites"]) == {"sft", "preference"}
    assert summary["suites"]["preference"]["rows"] == 9
    assert (tmp_path / "out" / "result.json").exists() and (tmp_path / "out" / "docs" / "index.html").exists()


def test_finetune_fails_on_identical_pair_and_empty_prompt(settings, tmp_path):
    def same(split, i, row):
        return {**row, "rejected": row["chosen"]} if (split, i) == ("val", 1) else row

    def blank(split, i, row):
        return {**row, "prompt": "  "} if (split, i) == ("train", 2) else row

    with pytest.raises(DataError) as err:
        validate_finetune(settings, _pairs(tmp_path, "sft", blank), _pairs(tmp_path, "preference", same),
                          tmp_path / "out")
    msg = str(err.value)
    assert msg.startswith("finetune validation failed (2 of ")
    assert "sft: expect_column_values_to_be_between(prompt_chars, >=1): 1 row, e.g. id=train-2 (empty prompt)" in msg
    assert "preference: expect_column_values_to_be_in_set(chosen_differs, {True}): 1 row, e.g. id=val-1" in msg
    assert json.loads((tmp_path / "out" / "result.json").read_text())["success"] is False


def test_finetune_empty_file_and_token_bound(settings, tmp_path):
    sft = _pairs(tmp_path, "sft")
    (sft / "val.jsonl").write_text("")
    with pytest.raises(DataError) as err:
        # block_size is 256 in the tiny config; ~55-char pairs at ten "tokens" per character overflow it.
        validate_finetune(settings, sft, _pairs(tmp_path, "preference"), tmp_path / "out",
                          max_tokens_fn=lambda text: 10 * len(text))
    msg = str(err.value)
    assert f"no rows in {sft / 'val.jsonl'}" in msg and str(sft / "train.jsonl") not in msg
    assert "(context_tokens, <=256)" in msg and "tokens > 256" in msg


def test_reader_and_derived_columns(tmp_path):
    assert non_printable_share("def f():\n\treturn 1\n") == 0.0
    assert non_printable_share("ab\x01\x02") == 0.5
    path = tmp_path / "corpus.jsonl"
    path.write_text('{"id": "a"}\n{oops\n')
    with pytest.raises(DataError, match=r"corpus.jsonl:2: not valid JSON"):
        read_jsonl(path)
