"""Feedback -> SFT and DPO pairs on hand-made records: good rows become the pairs worked out here by hand,
each kind of bad row is named file:line and dropped; the merge keeps splits leak-free; the single-flight lock."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from components.data.cleaning import split_of, text_hash
from components.monitoring import feedback
from components.monitoring.retrain import RetrainLock

WINDOW = [
    {"id": "c1", "index": 0, "prompt": "P1", "completion": "good1"},
    {"id": "c1", "index": 1, "prompt": "P1", "completion": "other choice"},
    {"id": "c2", "index": 0, "prompt": "P1", "completion": "bad1"},
    {"id": "c3", "index": 0, "prompt": "P2", "completion": "bad2"},
    {"id": "c4", "index": 0, "prompt": "P3", "completion": ""},
]

# (line, why it is bad) for the bad rows of FEEDBACK below.
BAD = {
    5: "not valid JSON",
    6: "unknown completion id 'c99'",
    7: "rating must be up or down",
    8: "empty corrected",
    9: "chosen must be a string",
    10: "completion 'c4' is empty",
    11: "chosen and rejected are the same text",
    12: "unknown kind 'other'",
    13: "expected a JSON object",
    14: "completion_id must be a non-empty string",
}


def _feedback_lines() -> list[str]:
    rows = [
        {"kind": "rating", "completion_id": "c1", "rating": "up"},
        {"kind": "rating", "completion_id": "c2", "rating": "down"},
        {"kind": "rating", "completion_id": "c3", "rating": "down", "corrected": "fix2"},
        {"kind": "preference", "prompt": "P4", "chosen": "a", "rejected": "b"},
    ]
    lines = [json.dumps(r) for r in rows]
    lines += [
        '{"kind": "rating", "completion_id": ',                                         # 5 corrupt
        json.dumps({"kind": "rating", "completion_id": "c99", "rating": "up"}),         # 6
        json.dumps({"kind": "rating", "completion_id": "c1", "rating": "meh"}),         # 7
        json.dumps({"kind": "rating", "completion_id": "c3", "rating": "down", "corrected": "   "}),  # 8
        json.dumps({"kind": "preference", "prompt": "P4", "chosen": 5, "rejected": "b"}),  # 9
        json.dumps({"kind": "rating", "completion_id": "c4", "rating": "up"}),          # 10
        json.dumps({"kind": "preference", "prompt": "P5", "chosen": "x", "rejected": "x"}),  # 11
        json.dumps({"kind": "other"}),                                                   # 12
        "[1, 2]",                                                                        # 13
        json.dumps({"kind": "rating", "completion_id": 7, "rating": "up"}),             # 14
    ]
    return lines


def test_feedback_rows_become_pairs_and_bad_rows_are_named(tmp_path: Path):
    fb = tmp_path / "feedback-2026-11-30.jsonl"
    fb.write_text("\n".join(_feedback_lines()) + "\n\n")
    pairs = feedback.build_pairs(WINDOW, [fb])

    assert [(r["prompt"], r["response"], r["source"]) for r in pairs.sft] == [
        ("P1", "good1", "rated_up"), ("P2", "fix2", "corrected"), ("P4", "a", "preferred")]
    assert sorted((r["prompt"], r["chosen"], r["rejected"]) for r in pairs.preference) == [
        ("P1", "good1", "bad1"), ("P2", "fix2", "bad2"), ("P4", "a", "b")]
    assert pairs.usable == 6
    assert pairs.counts == {"rating": 3, "preference": 1}
    named = {int(d.where.rsplit(":", 1)[1]): d.reason for d in pairs.dropped}
    assert set(named) == set(BAD)
    for line, why in BAD.items():
        assert why in named[line], (line, named[line])
    assert all(d.where.startswith(str(fb)) for d in pairs.dropped)
    # Nothing from a dropped row reached the pairs.
    texts = {t for r in pairs.sft for t in r.values()} | {t for r in pairs.preference for t in r.values()}
    assert not {"x", "   ", "other choice"} & texts


def test_rating_of_a_completion_outside_the_window_is_found_in_the_request_log(tmp_path: Path):
    log = tmp_path / "requests-2026-11-29.jsonl"
    log.write_text(json.dumps({"id": "old", "index": 0, "prompt": "Q", "completion": "ans"}) + "\n{broken\n")
    fb = tmp_path / "feedback-1.jsonl"
    fb.write_text(json.dumps({"kind": "rating", "completion_id": "old", "rating": "up"}) + "\n")
    assert [(r["prompt"], r["response"]) for r in feedback.build_pairs([], [fb], [log]).sft] == [("Q", "ans")]
    assert feedback.build_pairs([], [fb]).dropped[0].reason.startswith("unknown completion id 'old'")


def test_chat_markup_is_stripped_from_logged_prompts(tmp_path: Path):
    """A chat request is logged as the rendered template; the pair keeps the user's text (training formats it)."""
    chat = "<|system|>\nBe brief.<|end|>\n<|user|>\nWrite a test for f.<|end|>\n<|assistant|>\n"
    fb = tmp_path / "feedback-1.jsonl"
    fb.write_text(json.dumps({"kind": "rating", "completion_id": "c", "rating": "down", "corrected": "def t(): pass"})
                  + "\n")
    pairs = feedback.build_pairs([{"id": "c", "prompt": chat, "completion": "oops"}], [fb])
    assert [(r["prompt"], r["response"]) for r in pairs.sft] == [("Write a test for f.", "def t(): pass")]
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in pairs.preference] == [
        ("Write a test for f.", "def t(): pass", "oops")]


def _write_split(folder: Path, rows_by_split: dict[str, list[dict]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val", "test"):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows_by_split.get(split, [])))


def test_merge_keeps_splits_leak_free_and_holds_out_new_prompts(tiny_settings):
    s = tiny_settings
    hashed = lambda p: split_of(text_hash(p), s.data.split.val, s.data.split.test)  # noqa: E731 - datasets' rule
    base = {split: [{"id": f"sft:{split}{i}", "name": "f", "prompt": f"{split} prompt {i}", "response": "r"}
                    for i in range(40)] for split in ("train", "val", "test")}
    _write_split(s.path("data", "processed", "sft"), base)
    pref = {split: [{"id": f"p{split}{i}", "prompt": f"{split} prompt {i}", "chosen": "r", "rejected": "q",
                     "kind": "user"} for i in range(5)] for split in ("train", "val", "test")}
    _write_split(s.path("data", "processed", "preference"), pref)
    new = feedback.Pairs(sft=[{"id": f"fb{i}", "prompt": f"new prompt {i}", "response": "n"} for i in range(60)]
                         + [{"id": "dup", "prompt": "train prompt 0", "response": "r"}])
    files, report = feedback.merge(s, new)

    merged = {r["prompt"] for r in files["sft.jsonl"]}
    split_in_file = {r["prompt"]: r["split"] for r in files["sft.jsonl"]}
    for split in ("train", "val", "test"):   # every base row stays, in the split it was in
        for i in range(40):
            assert split_in_file[f"{split} prompt {i}"] == split
    assert all(not r["id"].startswith("sft:") for r in files["sft.jsonl"])
    assert report["new_sft"] == 60                                     # the duplicate of a base row is not new
    held = [r["prompt"] for r in files["holdout.jsonl"]]
    assert 0 < len(held) < 60
    rows = {r["prompt"]: r for r in files["sft.jsonl"]}
    trained = [p for p in (f"new prompt {i}" for i in range(60)) if p in merged and p not in held]
    assert len(trained) == 60 - len(held)
    # Usable: the new rows that land in train (a new prompt may hash to val: kept, not a reason to retrain).
    assert report["usable"] == sum(split_in_file[p] == "train" for p in trained) > 0
    # Each trained new row weighs what gives the new rows retrain.new_data_share of the draws (base rows weigh 1).
    weight = feedback.new_row_weight(120, len(trained), s.retrain.new_data_share)
    assert weight == pytest.approx(s.retrain.new_data_share / (1 - s.retrain.new_data_share) * 120 / len(trained))
    for prompt in trained:   # new prompts get the datasets stage's own prompt-hash split
        assert split_in_file[prompt] == hashed(prompt) and rows[prompt]["weight"] == pytest.approx(weight)
        assert "domain" not in rows[prompt]
    for prompt in held:   # held out of training: in the test split, as the drifted domain the gate must improve
        assert split_in_file[prompt] == "test" and rows[prompt]["domain"] == "drifted" and "weight" not in rows[prompt]
    assert all("weight" not in r and "domain" not in r for r in files["sft.jsonl"] if not r["prompt"].startswith("new"))
    assert all(hashed(f"new prompt {i}") != "test" or f"new prompt {i}" in held for i in range(60))
    assert len(files["original_test.jsonl"]) == 40

    # New preferences for prompts already in test (an earlier retrain's drifted slice, here the base test
    # split) stay in test and are not usable: the same window again must not start a retrain.
    again = feedback.Pairs(preference=[{"id": f"again{i}", "prompt": f"test prompt {i}", "chosen": "good",
                                        "rejected": "bad"} for i in range(10)])
    files, report = feedback.merge(s, again)
    assert report["new_preference"] == 10 and report["usable"] == 0
    assert {r["split"] for r in files["preference.jsonl"] if r["id"].startswith("again")} == {"test"}


def test_new_row_weight_by_hand():
    assert feedback.new_row_weight(3600, 40, 0.3) == pytest.approx(0.3 / 0.7 * 90)   # 38.57: 30% of the draws
    assert feedback.new_row_weight(10, 40, 0.3) == 1.0       # never below the base rows' weight
    assert feedback.new_row_weight(100, 0, 0.3) == 1.0


def test_lock_is_single_flight_and_released(tmp_path: Path):
    path = tmp_path / "retrain.lock"
    first, second = RetrainLock(path), RetrainLock(path)
    assert first.acquire(monitor_run_id="m1")
    assert not second.acquire()
    assert second.holder["pid"] == os.getpid() and second.holder["monitor_run_id"] == "m1"
    first.release()
    assert second.acquire() and second.taken_over is None
    second.release()


def test_lock_of_a_killed_holder_is_taken_over(tmp_path: Path):
    path = tmp_path / "retrain.lock"
    code = ("import sys, time; from components.monitoring.retrain import RetrainLock; "
            f"l = RetrainLock({str(path)!r}); assert l.acquire(); print('held', flush=True); time.sleep(60)")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                             cwd=Path(__file__).resolve().parents[2])
    try:
        assert child.stdout.readline().strip() == "held"
        waiting = RetrainLock(path)
        assert not waiting.acquire() and waiting.holder["pid"] == child.pid
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    lock = RetrainLock(path)
    assert lock.acquire()
    assert lock.taken_over["pid"] == child.pid
    assert json.loads(path.read_text())["pid"] == os.getpid()
    lock.release()
    assert path.read_text() == ""


def test_retrain_flow_returns_already_running_while_the_lock_is_held(tiny_settings):
    from components.monitoring.retrain import lock_for
    from flows.retrain import retrain_flow

    held = lock_for(tiny_settings)
    assert held.acquire(monitor_run_id="first")
    try:
        out = retrain_flow.fn(str(tiny_settings.path("params.yaml")), [], monitor_run_id="second")
    finally:
        held.release()
    assert out["status"] == "already_running" and out["retrain_run_id"] is None
    assert f"pid {os.getpid()}" in out["reason"] and "monitor run first" in out["reason"]
