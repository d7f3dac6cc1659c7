"""Feedback -> a new data version: the drifted window and the served feedback become SFT and DPO pairs.

Ratings name a completion of the request log by its `id`; a completion rated up, or a correction,
is an SFT pair, and so is an explicit preference's chosen answer; up (or corrected) vs down completions
of one prompt, and explicit preferences, are DPO pairs. Every bad feedback row (corrupt JSON, wrong types, empty text, unknown completion id) is
named file:line with its reason and dropped. Unrated completions are never trained on (the model's
own outputs are no reference), and no continued-pretraining text is built from the window.

Why `data.sft_jsonl` / `data.preference_jsonl` and the existing DVC pipeline, not a new DVC stage:
training, evaluation, the gate's scorecards and the lineage hash all read data/processed and the root
dvc.lock. Merged files under data/retrain/ passed with --set make the unchanged `datasets` stage
rebuild data/processed through the same GE suites, and dvc.lock (so data_hash) gets new hashes.
A new stage would need per-run inputs (a monitor run's window) in a static dvc.yaml.
Every merged row carries its `split` (the datasets stage honours it): base rows stay where they were,
so the gate's test set stays whole; new prompts get the stage's prompt-hash split. A slice of the new
SFT rows (retrain.holdout_share, plus those in test) is held out of training as the drifted-domain set:
test rows of domain `drifted` in the new version, the set the retrain's gate must improve. New training
rows carry a sampling `weight` so that they make up retrain.new_data_share of the challenger's draws.
Compromise: data/retrain/ itself is git-ignored; what it made is cached by DVC in data/processed.
"""
from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from components.config import Settings
from components.data import io, layout
from components.data.cleaning import split_of, text_hash
from components.errors import ConfigError
from components.monitoring.descriptors import user_text

SFT_FIELDS = ("prompt", "response")
DRIFTED = "drifted"     # the domain of the held-out slice in the new data version's test split
PREF_FIELDS = ("prompt", "chosen", "rejected")
# Prefixes components.data.datasets puts on user pair ids; stripped so ids stay stable over retrains.
ID_PREFIXES = ("sft:", "preference_jsonl:", "preference:")


@dataclass
class Dropped:
    where: str          # file:line
    reason: str


@dataclass
class Pairs:
    """New pairs from one window + feedback, and what was dropped on the way."""
    sft: list[dict] = field(default_factory=list)
    preference: list[dict] = field(default_factory=list)
    dropped: list[Dropped] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)

    @property
    def usable(self) -> int:
        return len(self.sft) + len(self.preference)


# ----------------------------------------------------------------------------- reading
def read_lenient(path: Path, dropped: list[Dropped]) -> list[tuple[int, dict]]:
    """(line, object) of each good line; a corrupt line is recorded in `dropped`, not raised.

    io.read_jsonl stops at the first bad line, which is right for a data set and wrong for feedback
    that anyone with an API key can write: one bad row must not hide the others.
    """
    out = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                dropped.append(Dropped(f"{path}:{n}", "not UTF-8"))
                continue
            except json.JSONDecodeError as exc:
                dropped.append(Dropped(f"{path}:{n}", f"not valid JSON ({exc.msg})"))
                continue
            if not isinstance(obj, dict):
                dropped.append(Dropped(f"{path}:{n}", f"expected a JSON object, got {type(obj).__name__}"))
                continue
            out.append((n, obj))
    return out


def completion_index(files: list[Path], dropped: list[Dropped]) -> dict[str, dict]:
    """Request-log records by completion id (choice 0: feedback names a response, not one of its choices)."""
    index: dict[str, dict] = {}
    for path in files:
        for _, rec in read_lenient(path, dropped):
            rid = rec.get("id")
            if isinstance(rid, str) and rec.get("index", 0) == 0 and isinstance(rec.get("prompt"), str):
                index.setdefault(rid, rec)
    return index


def _text(obj: dict, key: str, required: bool = True) -> tuple[str | None, str | None]:
    """(value, problem): a non-empty string, or why not."""
    value = obj.get(key)
    if value is None:
        return None, (f"missing {key}" if required else None)
    if not isinstance(value, str):
        return None, f"{key} must be a string, got {type(value).__name__}"
    if not value.strip():
        return None, f"empty {key}"
    return value, None


def _pair_id(kind: str, *texts: str) -> str:
    return f"fb-{kind}-" + hashlib.sha256("\x00".join(texts).encode("utf-8")).hexdigest()[:16]


# ----------------------------------------------------------------------------- building
def build_pairs(window: list[dict], feedback_files: list[Path], log_files: list[Path] | None = None) -> Pairs:
    """SFT and DPO pairs from ratings, corrections and preferences; bad rows go to Pairs.dropped.

    window: the drifted window's request records; log_files: further request logs a rating may refer to
    (feedback on a completion outside the window is still good feedback).
    """
    out = Pairs()
    known = {r["id"]: r for r in window if isinstance(r.get("id"), str) and r.get("index", 0) == 0
             and isinstance(r.get("prompt"), str)}
    for rid, rec in completion_index(list(log_files or []), []).items():
        known.setdefault(rid, rec)
    chosen: dict[str, list[str]] = defaultdict(list)     # prompt -> good answers (up or corrected)
    rejected: dict[str, list[str]] = defaultdict(list)   # prompt -> down-rated completions
    for path in feedback_files:
        for n, obj in read_lenient(path, out.dropped):
            where = f"{path}:{n}"
            kind = obj.get("kind")
            problem = (_rating(obj, known, out, chosen, rejected) if kind == "rating"
                       else _preference(obj, out) if kind == "preference"
                       else f"unknown kind {kind!r} (expected rating or preference)")
            if problem:
                out.dropped.append(Dropped(where, problem))
            else:
                out.counts[kind] += 1
    for prompt, downs in rejected.items():
        for good in chosen.get(prompt, []):
            for bad in downs:
                if good != bad:
                    out.preference.append({"id": _pair_id("pref", prompt, good, bad), "prompt": prompt,
                                           "chosen": good, "rejected": bad, "source": "rating"})
    out.sft = _unique(out.sft, SFT_FIELDS)
    out.preference = _unique(out.preference, PREF_FIELDS)
    return out


def _rating(obj: dict, known: dict[str, dict], out: Pairs, chosen: dict, rejected: dict) -> str | None:
    """Record one rating row; returns the reason it is bad, or None."""
    cid = obj.get("completion_id")
    if not isinstance(cid, str) or not cid:
        return "completion_id must be a non-empty string"
    if obj.get("rating") not in ("up", "down"):
        return f"rating must be up or down, got {obj.get('rating')!r}"
    corrected, problem = _text(obj, "corrected", required=False)
    if problem:
        return problem
    rec = known.get(cid)
    if rec is None:
        return f"unknown completion id {cid!r} (not in the window or the request log)"
    # The log holds what the model read (a chat request's rendered template); training formats the user's text.
    prompt, completion = user_text(rec["prompt"]), rec.get("completion")
    if not prompt.strip():
        return f"completion {cid!r} has an empty prompt in the request log"
    if corrected is not None:
        out.sft.append({"id": _pair_id("sft", prompt, corrected), "prompt": prompt, "response": corrected,
                        "source": "corrected", "completion_id": cid})
        chosen[prompt].append(corrected)
    if not isinstance(completion, str) or not completion.strip():
        # A correction of an empty completion is still a good SFT pair; a bare rating of nothing is not.
        return None if corrected is not None else f"completion {cid!r} is empty: nothing to rate"
    if obj["rating"] == "up" and corrected is None:
        out.sft.append({"id": _pair_id("sft", prompt, completion), "prompt": prompt, "response": completion,
                        "source": "rated_up", "completion_id": cid})
        chosen[prompt].append(completion)
    elif obj["rating"] == "down":
        rejected[prompt].append(completion)
    return None


def _preference(obj: dict, out: Pairs) -> str | None:
    texts = {}
    for key in PREF_FIELDS:
        texts[key], problem = _text(obj, key)
        if problem:
            return problem
    if texts["chosen"] == texts["rejected"]:
        return "chosen and rejected are the same text"
    out.preference.append({"id": _pair_id("pref", *texts.values()), **texts, "source": "preference"})
    # The preferred answer is a good answer: an SFT pair too (its prompt's only one, often: a correction).
    out.sft.append({"id": _pair_id("sft", texts["prompt"], texts["chosen"]), "prompt": texts["prompt"],
                    "response": texts["chosen"], "source": "preferred"})
    return None


def _unique(rows: list[dict], fields: tuple[str, ...]) -> list[dict]:
    seen, keep = set(), []
    for row in rows:
        key = tuple(row[f] for f in fields)
        if key not in seen:
            seen.add(key)
            keep.append(row)
    return keep


# ----------------------------------------------------------------------------- the data version
def retrain_dir(settings: Settings) -> Path:
    """data/retrain/: the merged pair files the DVC datasets stage reads, the held-out slice, the report."""
    return settings.path("data", "retrain")


def data_overrides(settings: Settings) -> list[str]:
    """--set overrides that make the DVC pipeline build data/processed from the merged files."""
    d = retrain_dir(settings)
    # Relative to the project root when possible: the value lands in params.resolved.yaml, hence in dvc.lock,
    # and an absolute path would make the data hash differ between checkouts of the same data.
    try:
        d = d.resolve().relative_to(settings.root.resolve())
    except ValueError:
        pass
    return [f"data.sft_jsonl={d / 'sft.jsonl'}", f"data.preference_jsonl={d / 'preference.jsonl'}"]


def feedback_files(settings: Settings) -> list[Path]:
    return sorted(settings.path(settings.retrain.feedback_dir).glob("feedback-*.jsonl"))


def request_logs(settings: Settings) -> list[Path]:
    return sorted(settings.path(settings.serving.log_dir).glob("requests-*.jsonl"))


def _split(settings: Settings, prompt: str) -> str:
    # The rule components.data.datasets applies to user pairs: a hash of the prompt alone.
    return split_of(text_hash(prompt), settings.data.split.val, settings.data.split.test)


def _held_out(settings: Settings, prompt: str, split: str) -> bool:
    """The drifted-domain evaluation slice: prompts the datasets stage puts in test (split), plus a salted share."""
    bucket = int(hashlib.sha256(f"holdout:{prompt}".encode("utf-8")).hexdigest(), 16) % 10_000
    return split == "test" or bucket < settings.retrain.holdout_share * 10_000


def _base_rows(settings: Settings, folder: Path, fields: tuple[str, ...]) -> list[dict]:
    """The current processed pairs, each with the split it is in (the datasets stage keeps a row's `split`),
    so the gate's test set stays whole and nothing trained on moves into test."""
    rows = []
    for split in layout.SPLITS:
        path = folder / f"{split}.jsonl"
        if not path.is_file():
            raise ConfigError(f"retrain: no {path}; run the lifecycle (`llmcycle run`) first")
        for _, row in io.read_jsonl(path):
            rid = str(row.get("id", ""))
            for prefix in ID_PREFIXES:
                rid = rid.removeprefix(prefix)
            rows.append({"id": rid, "name": row.get("name", ""), "split": split, **{f: row[f] for f in fields}})
    return rows


def new_row_weight(n_base: int, n_new: int, share: float) -> float:
    """The sampling weight w of each new row (base rows weigh 1) that gives the new rows `share` of the draws:

        n_new * w / (n_base + n_new * w) = share   =>   w = share / (1 - share) * n_base / n_new

    never below 1 (new rows never count less than old ones); 1 when there are no new rows.
    """
    if n_new == 0:
        return 1.0
    return max(1.0, share / (1.0 - share) * n_base / n_new)


def merge(settings: Settings, pairs: Pairs, window: dict[str, Any] | None = None) -> tuple[dict[str, list], dict]:
    """(files, report): the new pairs merged with the current processed pairs; nothing written yet.

    Files: sft.jsonl, preference.jsonl (what training may see and the datasets stage splits), holdout.jsonl
    (the held-out drifted slice, never trained on), original_test.jsonl (the SFT test split before this
    version, for the old-vs-new comparison) and dropped.jsonl. report["usable"] counts the new pairs
    training may see: not already in the data (feedback files are read whole on every retrain), not held out.
    """
    base_sft = _base_rows(settings, layout.sft_dir(settings), SFT_FIELDS)
    base_pref = _base_rows(settings, layout.preference_dir(settings), PREF_FIELDS)
    original_test = [row for _, row in io.read_jsonl(layout.sft_dir(settings) / "test.jsonl")]
    have_sft = {(r["prompt"], r["response"]) for r in base_sft}
    have_pref = {(r["prompt"], r["chosen"], r["rejected"]) for r in base_pref}
    new_sft = [r for r in pairs.sft if (r["prompt"], r["response"]) not in have_sft]
    new_pref = [r for r in pairs.preference if (r["prompt"], r["chosen"], r["rejected"]) not in have_pref]
    # Base rows keep the split they are in (the field `split`, which the datasets stage honours), so the
    # gate's test set stays whole. A new prompt already in the data joins that prompt's split (test
    # first: never train on a test prompt); other new prompts get the datasets stage's prompt-hash split.
    split_of_prompt: dict[str, str] = {}
    for r in base_sft + base_pref:
        if split_of_prompt.get(r["prompt"]) != "test":
            split_of_prompt[r["prompt"]] = r["split"]

    def split_for(prompt: str) -> str:
        return split_of_prompt.get(prompt) or _split(settings, prompt)

    holdout = [r for r in new_sft if _held_out(settings, r["prompt"], split_for(r["prompt"]))]
    held = {r["prompt"] for r in holdout}
    # Held-out prompts stay out of training altogether (their preference pairs too); all of them go to the
    # datasets stage as test rows of domain `drifted` (below), never into train.
    train_sft = [r for r in new_sft if r["prompt"] not in held]
    train_pref = [r for r in new_pref if r["prompt"] not in held]

    def clean(rows: list[dict], fields: tuple[str, ...], **extra: Any) -> list[dict]:
        return [{"id": r["id"], "name": r.get("name", ""), **{f: r[f] for f in fields},
                 "split": r.get("split") or split_for(r["prompt"]), **extra} for r in rows]

    share = settings.retrain.new_data_share
    # The whole held-out slice joins the test split as domain `drifted`: versioned with the data, and the
    # retrain's gate must improve it significantly (flows/retrain.py) while the base rows guard the rest.
    drifted = clean(holdout, SFT_FIELDS, domain=DRIFTED)
    for row in drifted:
        row["split"] = "test"
    new_sft_rows = clean(train_sft, SFT_FIELDS, weight=new_row_weight(len(base_sft), len(train_sft), share))
    new_pref_rows = clean(train_pref, PREF_FIELDS, weight=new_row_weight(len(base_pref), len(train_pref), share))
    # Usable: what lands in train. A new pair of a prompt already in val or test (an earlier retrain's held-out
    # drifted slice included) is kept there and is no reason to retrain.
    usable = sum(r["split"] == "train" for r in new_sft_rows + new_pref_rows)
    files = {"sft.jsonl": clean(base_sft, SFT_FIELDS) + new_sft_rows + drifted,
             "preference.jsonl": clean(base_pref, PREF_FIELDS) + new_pref_rows,
             "holdout.jsonl": clean(holdout, SFT_FIELDS), "original_test.jsonl": original_test,
             "dropped.jsonl": [asdict(d) for d in pairs.dropped]}
    report = {"window": window or {}, "feedback_rows": dict(pairs.counts), "dropped": len(pairs.dropped),
              "new_sft": len(new_sft), "new_preference": len(new_pref), "usable": usable,
              "holdout": len(holdout), "train_new_sft": len(train_sft), "train_new_preference": len(train_pref),
              "base_sft": len(base_sft), "base_preference": len(base_pref), "original_test": len(original_test)}
    return files, report


def write_version(settings: Settings, files: dict[str, list], report: dict) -> Path:
    """Write merge()'s files and report.json under data/retrain/ (each file atomically); returns the folder."""
    out = retrain_dir(settings)
    for name, rows in files.items():
        with io.atomic_file(out / name) as f:
            io.write_jsonl(f, rows)
    io.atomic_write_json(out / "report.json", report)
    return out
