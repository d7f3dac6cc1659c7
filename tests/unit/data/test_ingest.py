"""Ingest stage on tiny real corpora: sources, exclusions, normalization, dedup, splits, errors, atomicity."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from components import config as cfg
from components.data import ingest, layout
from components.data.cleaning import NearDupIndex, choose_bands, estimate_jaccard, exact_jaccard, split_of
from components.data.io import atomic_file, read_jsonl
from components.data.sources import glob_regex
from components.errors import ConfigError, DataError
from tests.conftest import write_params
from tests.corpus_factory import make_module, write_corpus_jsonl


def _settings(root: Path, source: str, **data) -> cfg.Settings:
    write_params(root, {"data": {"source": source, **data}})
    return cfg.load(root / "params.yaml")


def _corpus(s: cfg.Settings) -> list[dict]:
    return [row for _, row in read_jsonl(layout.corpus_path(s))]


def _words(rng: random.Random, n: int) -> list[str]:
    vocab = [f"w{i}" for i in range(500)]
    return [rng.choice(vocab) for _ in range(n)]


def test_dir_corpus_excludes_tests_and_splits_deterministically(tiny_settings):
    stats = ingest.run(tiny_settings)
    rows = _corpus(tiny_settings)
    ids = [r["id"] for r in rows]
    assert stats["documents"] == len(rows) == 40
    assert stats["chars"] == sum(len(r["text"]) for r in rows)
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert all(i.startswith("dir:mod_") and "tests/" not in i for i in ids)
    assert {r["source"] for r in rows} == {"dir"}
    assert sum(stats["splits"].values()) == 40 and stats["splits"]["train"] > 0
    for r in rows:   # the split is a function of the id alone
        assert r["split"] == split_of(r["id"], 0.1, 0.1)
        assert r["text"] == r["text"].rstrip() and "\r" not in r["text"]
    assert stats["dropped"] == dict.fromkeys(ingest.DROP_REASONS, 0)

    first = layout.corpus_path(tiny_settings).read_bytes()
    ingest.run(tiny_settings)
    assert layout.corpus_path(tiny_settings).read_bytes() == first   # ids, order, splits stable


def test_max_documents_takes_first_ids(tiny_settings):
    tiny_settings.data.max_documents = 5
    stats = ingest.run(tiny_settings)
    assert stats["documents"] == 5 and stats["capped"]
    assert [r["id"] for r in _corpus(tiny_settings)] == [f"dir:mod_{i:03d}.py" for i in range(5)]


def test_normalizes_and_drops_by_reason(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    rng = random.Random(1)
    (src / "crlf.py").write_bytes(("\ufeff" + make_module(rng, 1).replace("\n", "\r\n") + "   \r\n\r\n").encode())
    (src / "ok.py").write_text(make_module(rng, 2), encoding="utf-8")
    (src / "latin1.py").write_bytes("# caf\xe9\n".encode("latin-1") * 20)
    (src / "short.py").write_text("x = 1\n", encoding="utf-8")
    (src / "long.py").write_text("y = 2\n" * 2000, encoding="utf-8")
    (src / "notes.txt").write_text("not matched by the glob " * 10, encoding="utf-8")
    s = _settings(tmp_path, "dir:src", max_chars=5000)     # modules are ~1-2k chars, long.py 12k
    stats = ingest.run(s)
    rows = {r["id"]: r["text"] for r in _corpus(s)}
    assert set(rows) == {"dir:crlf.py", "dir:ok.py"}
    assert rows["dir:crlf.py"] == make_module(random.Random(1), 1).rstrip()   # BOM, \r\n, trailing ws gone
    assert stats["dropped"]["not_utf8"] == 1 and stats["dropped"]["too_short"] == 1
    assert stats["dropped"]["too_long"] == 1 and stats["read"] == 5


def test_jsonl_source_and_bad_lines(tmp_path):
    path = write_corpus_jsonl(tmp_path / "in" / "docs.jsonl", n_docs=12)
    s = _settings(tmp_path, "jsonl:in/docs.jsonl")
    stats = ingest.run(s)
    assert stats["documents"] == 12
    assert [r["id"] for r in _corpus(s)][:2] == ["jsonl:line-1", "jsonl:line-10"]   # sorted ids
    good = path.read_text()

    path.write_text(good + "{not json\n")
    with pytest.raises(DataError, match=r"docs\.jsonl:13: not valid JSON"):
        ingest.run(s)
    path.write_text(good + json.dumps({"id": "x", "content": "no text here"}) + "\n")
    with pytest.raises(DataError, match=r"docs\.jsonl:13: no 'text' field"):
        ingest.run(s)
    path.write_text(good + json.dumps({"text": 42}) + "\n")
    with pytest.raises(DataError, match=r"docs\.jsonl:13: 'text' is int"):
        ingest.run(s)


def test_jsonl_given_ids(tmp_path):
    rng = random.Random(3)
    lines = [json.dumps({"id": f"doc-{i}", "text": make_module(rng, i)}) for i in range(3)]
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n")
    s = _settings(tmp_path, "jsonl:c.jsonl")
    ingest.run(s)
    assert [r["id"] for r in _corpus(s)] == ["jsonl:doc-0", "jsonl:doc-1", "jsonl:doc-2"]


def test_missing_source_path_is_config_error(tmp_path):
    s = _settings(tmp_path, "dir:does/not/exist")
    with pytest.raises(ConfigError, match=r"data\.source.*does/not/exist"):
        ingest.run(s)
    s = _settings(tmp_path, "jsonl:missing.jsonl")
    with pytest.raises(ConfigError, match=r"data\.source.*missing\.jsonl"):
        ingest.run(s)


def test_empty_and_binary_corpora(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty corpus.*\*\*/\*\.py"):
        ingest.run(_settings(tmp_path, "dir:empty"))

    binary = tmp_path / "bin"
    binary.mkdir()
    rng = random.Random(0)
    for i in range(6):
        (binary / f"blob_{i}.py").write_bytes(bytes(rng.randrange(256) for _ in range(400)) + b"\x00")
    (binary / "real.py").write_text(make_module(rng, 0), encoding="utf-8")
    with pytest.raises(DataError, match=r"6 of 7 documents are binary or not UTF-8"):
        ingest.run(_settings(tmp_path, "dir:bin"))

    tiny = tmp_path / "tiny"
    tiny.mkdir()
    (tiny / "a.py").write_text("pass\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"read 1 documents but none remain.*too_short=1"):
        ingest.run(_settings(tmp_path, "dir:tiny"))


def test_exact_and_near_duplicates_dropped(tmp_path):
    rng = random.Random(7)
    src = tmp_path / "src"
    src.mkdir()
    base = _words(rng, 400)
    near = list(base)
    near[200] = "changed"
    lines = lambda ws: "\n".join(" ".join(ws[i:i + 10]) for i in range(0, len(ws), 10)) + "\n"  # noqa: E731
    (src / "a.py").write_text(lines(base))
    (src / "b.py").write_text(lines(base))                   # exact copy
    (src / "c.py").write_text(lines(near).replace("\n", "\r\n"))   # one word changed (+ CRLF)
    (src / "d.py").write_text(lines(_words(rng, 400)))       # unrelated
    stats = ingest.run(_settings(tmp_path, "dir:src"))
    assert stats["dropped"]["exact_dup"] == 1 and stats["dropped"]["near_dup"] == 1
    assert stats["documents"] == 2
    assert [r["id"] for r in _corpus(cfg.load(tmp_path / "params.yaml"))] == ["dir:a.py", "dir:d.py"]


def test_minhash_estimates_track_exact_jaccard():
    rng = random.Random(11)
    a = _words(rng, 600)
    b = a[:450] + _words(rng, 150)
    ta, tb = " ".join(a), " ".join(b)
    assert abs(estimate_jaccard(ta, tb) - exact_jaccard(ta, tb)) < 0.1
    assert choose_bands(0.85) == 4          # 16 bands of 4 rows: 99.5% recall at J=0.85
    index = NearDupIndex(0.85)
    assert index.add(ta) and index.add(" ".join(_words(rng, 600))) and not index.add(ta + " extra")


def test_glob_semantics():
    rx = glob_regex("**/*.py")
    assert rx.match("a.py") and rx.match("x/y/a.py") and not rx.match("a.pyc")
    assert glob_regex("src/*.txt").match("src/a.txt") and not glob_regex("src/*.txt").match("src/d/a.txt")


def test_failed_run_leaves_previous_corpus_untouched(tiny_settings, tiny_root):
    ingest.run(tiny_settings)
    path = layout.corpus_path(tiny_settings)
    before = path.read_bytes()
    bad = tiny_root / "bad.jsonl"
    bad.write_text(json.dumps({"text": "x" * 100}) + "\n" + "{oops\n")
    tiny_settings.data.source = "jsonl:bad.jsonl"
    with pytest.raises(DataError, match="bad.jsonl:2"):
        ingest.run(tiny_settings)
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["corpus.jsonl"]


def test_atomic_file_rolls_back_mid_write(tmp_path):
    target = tmp_path / "out.jsonl"
    target.write_text("old\n")
    with pytest.raises(RuntimeError):
        with atomic_file(target) as f:
            f.write("half a line")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]
