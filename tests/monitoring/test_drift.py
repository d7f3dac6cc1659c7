"""Drift decisions on constructed windows (same distribution, clearly different text, too small) and the
request-log window reader (rotation order, last N, last T minutes, a corrupt line named by file:line)."""
from __future__ import annotations

import datetime as dt
import json

import numpy as np
import pytest

from components.config import MonitoringConfig
from components.errors import DataError
from components.monitoring import drift
from components.monitoring.descriptors import NUMERIC_COLUMNS
from components.monitoring.window import log_files, read_window, unique_prompts

VERBS = ["compute", "parse", "load", "merge", "filter", "render", "count", "split", "encode", "resolve"]
NOUNS = ["items", "tokens", "records", "paths", "values", "lines", "words", "blocks", "pairs", "names"]
TEST_WORDS = ["assertEqual", "setUp", "tearDown", "mock", "raises", "fixture", "subTest", "skipIf", "TestCase"]


def rows(rng, n: int, kind: str = "code", shift: float = 0.0) -> list[dict]:
    out = []
    for i in range(n):
        if kind == "code":
            text = f"Write a Python function `{rng.choice(VERBS)}_{rng.choice(NOUNS)}(x)` that {rng.choice(VERBS)}s {rng.choice(NOUNS)}"
        else:
            text = f"Write a unittest `test_{rng.choice(TEST_WORDS)}` using {rng.choice(TEST_WORDS)} and {rng.choice(TEST_WORDS)}"
        out.append({"prompt": f"{text} #{i}", **{c: float(rng.normal(shift, 1.0)) for c in NUMERIC_COLUMNS}})
    return out


CFG = MonitoringConfig(window=60, min_window=20)


def test_same_distribution_is_no_drift():
    rng = np.random.default_rng(0)
    res = drift.compare(rows(rng, 150), rows(rng, 60), CFG)
    assert res.decision == drift.NO_DRIFT, res.summary()
    assert res.drift_share < CFG.drift_share_threshold and "prompt" not in res.drifted_columns
    assert set(res.scores) == {"prompt", *NUMERIC_COLUMNS}
    assert res.scores["prompt"]["method"] == "abs_text_content_drift" and res.scores["prompt"]["threshold"] == 0.6


def test_different_text_is_drift_through_the_named_column(tmp_path):
    rng = np.random.default_rng(1)
    named = CFG.model_copy(update={"drift_columns": ["prompt"]})
    res = drift.compare(rows(rng, 150), rows(rng, 60, kind="tests"), named)   # numbers unchanged, text changed
    assert res.decision == drift.DRIFT and "prompt" in res.drifted_columns
    assert res.scores["prompt"]["score"] > 0.9
    assert "named column(s) prompt" in res.reason
    html = res.save_html(tmp_path / "report.html")
    assert html.stat().st_size > 10_000 and "<html" in html.read_text()[:2000].lower()
    # Without the named column, one drifted column of ten is below the share threshold.
    res = drift.compare(rows(rng, 150), rows(rng, 60, kind="tests"), CFG)
    assert res.decision == drift.NO_DRIFT and "prompt" in res.drifted_columns


def test_shifted_descriptors_are_drift_by_share():
    rng = np.random.default_rng(2)
    res = drift.compare(rows(rng, 150), rows(rng, 60, shift=1.5), CFG)
    assert res.decision == drift.DRIFT and res.drift_share >= 0.5
    assert set(NUMERIC_COLUMNS) <= set(res.drifted_columns)


def test_small_window_is_insufficient_never_no_drift():
    rng = np.random.default_rng(3)
    res = drift.compare(rows(rng, 150), rows(rng, 19), CFG)
    assert res.decision == drift.INSUFFICIENT and res.drift_share is None and res.snapshot is None
    assert "19 distinct prompts" in res.reason and "min_window (20)" in res.reason


def test_a_column_without_values_is_skipped_not_compared():
    rng = np.random.default_rng(4)
    cur = rows(rng, 40)
    for r in cur:
        r["completion_mean_logprob"] = None
    res = drift.compare(rows(rng, 100), cur, CFG)
    assert "completion_mean_logprob" in res.skipped and "completion_mean_logprob" not in res.scores


def test_decide_rules_by_hand():
    s = {c: {"drifted": d} for c, d in [("prompt", False), ("a", True), ("b", True), ("c", False)]}
    cfg = CFG
    assert drift.decide(s, cfg, 30, 100).decision == drift.DRIFT                    # 2 of 4 = 0.5
    assert drift.decide(s, cfg.model_copy(update={"drift_share_threshold": 0.6}), 30, 100).decision == drift.NO_DRIFT
    assert drift.decide(s, cfg.model_copy(update={"drift_share_threshold": 0.6, "drift_columns": ["a"]}),
                        30, 100).decision == drift.DRIFT


def test_config_rejects_unknown_columns_and_a_window_below_min():
    with pytest.raises(ValueError, match="unknown drift column"):
        MonitoringConfig(drift_columns=["prompt_lenght"])
    with pytest.raises(ValueError, match="http:// or https:// URL"):
        MonitoringConfig(webhook_url="hooks.example.com/x")
    with pytest.raises(ValueError, match="below min_window"):
        MonitoringConfig(window=10, min_window=20)


# ----------------------------------------------------------------------------- the request-log window
def _write(path, recs):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))


def _rec(i, t0=dt.datetime(2026, 11, 30, 12, tzinfo=dt.timezone.utc)):
    ts = (t0 + dt.timedelta(minutes=i)).isoformat(timespec="milliseconds")
    return {"id": f"cmpl-{i}", "index": 0, "prompt": f"p{i}", "completion": f"c{i}", "ts": ts}


def test_window_spans_rotated_files_in_order(tmp_path):
    _write(tmp_path / "requests-2026-11-29.jsonl", [_rec(i) for i in range(0, 3)])
    _write(tmp_path / "requests-2026-11-30.jsonl", [_rec(i) for i in range(3, 6)])
    _write(tmp_path / "requests-2026-11-30.1.jsonl", [_rec(i) for i in range(6, 8)])
    _write(tmp_path / "requests-2026-11-30.10.jsonl", [_rec(i) for i in range(8, 10)])   # numeric, not lexical order
    (tmp_path / "other-2026-11-30.jsonl").write_text("not json\n")
    assert [p.name for p in log_files(tmp_path)][-2:] == ["requests-2026-11-30.1.jsonl", "requests-2026-11-30.10.jsonl"]
    win = read_window(tmp_path, n=5)
    assert [r["id"] for r in win.records] == [f"cmpl-{i}" for i in range(5, 10)]
    assert win.meta() == {"start": _rec(5)["ts"], "end": _rec(9)["ts"], "n": 5}
    assert len(win.files) == 3 and "2026-11-29" not in win.files[0].name   # the oldest file was not read
    assert len(read_window(tmp_path, n=100).records) == 10
    now = dt.datetime(2026, 11, 30, 12, 9, 30, tzinfo=dt.timezone.utc)
    assert [r["id"] for r in read_window(tmp_path, minutes=2.5, now=now).records] == ["cmpl-7", "cmpl-8", "cmpl-9"]


def test_window_errors_name_the_file_and_line(tmp_path):
    with pytest.raises(DataError, match="no request log at"):
        read_window(tmp_path, n=5)
    path = tmp_path / "requests-2026-11-30.jsonl"
    path.write_text(json.dumps(_rec(0)) + "\n{not json\n")
    with pytest.raises(DataError, match=r"requests-2026-11-30.jsonl:2: not valid JSON"):
        read_window(tmp_path, n=5)
    path.write_text(json.dumps(_rec(0)) + "\n" + json.dumps({"prompt": "x", "ts": _rec(1)["ts"]}) + "\n")
    with pytest.raises(DataError, match=r"jsonl:2: request record lacks field\(s\) completion"):
        read_window(tmp_path, n=5)


def test_unique_prompts_keeps_the_first_of_each():
    recs = [{"prompt": p} for p in ["a", "b", "a", "c", "b"]]
    assert unique_prompts(recs, lambda r: r["prompt"]) == [0, 1, 3]


def test_embedding_drift_when_enabled():
    rng = np.random.default_rng(5)
    cfg = CFG.model_copy(update={"embeddings": True})

    def with_emb(rs, shift):
        for r in rs:
            r["embedding"] = [float(x) for x in rng.normal(shift, 1.0, 8)]
        return rs
    same = drift.compare(with_emb(rows(rng, 150), 0.0), with_emb(rows(rng, 60), 0.0), cfg)
    moved = drift.compare(with_emb(rows(rng, 150), 0.0), with_emb(rows(rng, 60), 1.0), cfg)
    assert not same.scores["embedding"]["drifted"] and moved.scores["embedding"]["drifted"]
    assert moved.scores["embedding"]["threshold"] == cfg.text_threshold and len(moved.scores) == 11
    missing = drift.compare(rows(rng, 150), rows(rng, 60), cfg)       # rows without embeddings: said, not hidden
    assert "embedding" in missing.skipped and "embedding" not in missing.scores
