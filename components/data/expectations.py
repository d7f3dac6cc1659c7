"""Suite definitions for the data stage: JSONL -> pandas frames with derived columns, and the checks on them.

Pure pandas, no Great Expectations import: each Check names a GX expectation by its snake_case type
and also knows how to find its offending rows itself, because GX's unexpected lists are partial.
Raw texts stay out of the fine-tuning frames so GX results and Data Docs stay small.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from components.data.layout import SPLITS
from components.errors import DataError

PREFERENCE_KINDS = ("truncated", "other_body", "shuffled", "user")
# Whitespace that source code legitimately holds; everything else that str.isprintable() rejects counts.
_LAYOUT_WS = ("\n", "\t", "\r", "\f", "\v")


@dataclass(frozen=True)
class Check:
    """One expectation: GX type + kwargs, and how to explain a failure without GX's partial lists."""

    type: str
    kwargs: dict[str, Any]
    # Row-wise checks: frame -> Series of short value descriptions, indexed by the offending rows.
    offenders: Callable[[pd.DataFrame], pd.Series] | None = None
    # Table-level checks: (frame, GX result dict) -> one phrase saying what was observed.
    explain: Callable[[pd.DataFrame, dict], str] | None = None

    @property
    def column(self) -> str | None:
        return self.kwargs.get("column")


# ----------------------------------------------------------------------------- reading
def read_jsonl(path: Path) -> list[dict]:
    """Records of a JSONL file, each with `_line` (1-based) and `_utf8` (the line decoded strictly)."""
    rows = []
    with Path(path).open("rb") as f:
        for n, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                line, utf8 = raw.decode("utf-8"), True
            except UnicodeDecodeError:
                # Keep the row so the utf8 expectation reports it instead of one opaque crash.
                line, utf8 = raw.decode("utf-8", errors="replace"), False
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
            if not isinstance(rec, dict):
                raise DataError(f"{path}:{n}: expected a JSON object, got {type(rec).__name__}")
            rec["_line"], rec["_utf8"] = n, utf8
            rows.append(rec)
    return rows


def _str_or_none(value: Any) -> str | None:
    # A number or list where text belongs is not text: treat it as missing so not-null checks name it.
    return value if isinstance(value, str) else None


def _encodes(text: str) -> bool:
    try:
        text.encode("utf-8")  # lone surrogates from JSON escapes ("\ud800") fail here
        return True
    except UnicodeEncodeError:
        return False


def non_printable_share(text: str) -> float:
    """Share of characters that are neither printable nor layout whitespace."""
    if not text:
        return 0.0
    stripped = text
    for ws in _LAYOUT_WS:
        stripped = stripped.replace(ws, "")
    if stripped.isprintable():  # C-speed fast path: nearly every real document
        return 0.0
    return sum(not c.isprintable() for c in stripped) / len(text)


# ----------------------------------------------------------------------------- corpus
def corpus_frame(path: Path) -> pd.DataFrame:
    """One row per document: id, split, text, line + length, has_nul, non_printable_share, utf8_valid, text_hash."""
    rows = []
    for rec in read_jsonl(path):
        text = _str_or_none(rec.get("text"))
        encodes = text is None or _encodes(text)
        if not encodes:
            # GX hashes the whole frame (pandas, UTF-8) for its batch id; lone surrogates would crash it.
            text = text.encode("utf-8", "replace").decode("utf-8")
        rows.append({
            "id": None if rec.get("id") is None else str(rec["id"]),
            # GX set checks skip nulls: a missing split must still fail the split check.
            "split": rec.get("split") if isinstance(rec.get("split"), str) else "",
            "text": text,
            "line": rec["_line"],
            "length": None if text is None else len(text),
            "has_nul": text is not None and "\x00" in text,
            "non_printable_share": 0.0 if text is None else non_printable_share(text),
            "utf8_valid": rec["_utf8"] and encodes,
            "text_hash": None if text is None
            else hashlib.sha1(text.encode("utf-8")).hexdigest(),
        })
    cols = ["id", "split", "text", "line", "length", "has_nul", "non_printable_share", "utf8_valid", "text_hash"]
    df = pd.DataFrame(rows, columns=cols)
    df["length"] = df["length"].astype("Int64")  # nullable: a missing text has no length
    df["has_nul"] = df["has_nul"].astype(bool)
    df["utf8_valid"] = df["utf8_valid"].astype(bool)
    df["is_duplicate"] = df["text_hash"].notna() & df["text_hash"].duplicated(keep="first")
    return df


def _nulls(col: str) -> Callable[[pd.DataFrame], pd.Series]:
    return lambda df: pd.Series("null", index=df.index[df[col].isna()], dtype=object)


def _dupes(col: str, ref: Callable[[pd.DataFrame], pd.Series], fmt: str) -> Callable[[pd.DataFrame], pd.Series]:
    """Rows whose `col` repeats; each described by `fmt` filled with ref() of another row in its group."""
    def find(df: pd.DataFrame) -> pd.Series:
        sub = df[df[col].notna() & df[col].duplicated(keep=False)]
        refs = ref(sub)
        groups = refs.groupby(sub[col])
        first, second = groups.transform("first"), groups.transform(lambda s: s.iloc[1])
        other = first.where(first != refs, second)
        return other.map(lambda o: fmt.format(o))
    return find


def _outside(col: str, lo: float | None, hi: float | None, fmt: Callable[[Any], str]) -> Callable[[pd.DataFrame], pd.Series]:
    def find(df: pd.DataFrame) -> pd.Series:
        values = pd.to_numeric(df[col], errors="coerce")
        bad = values.notna() & (((values < lo) if lo is not None else False) | ((values > hi) if hi is not None else False))
        return values[bad].map(fmt)
    return find


def _not_in(col: str, allowed: list, fmt: Callable[[Any], str]) -> Callable[[pd.DataFrame], pd.Series]:
    def find(df: pd.DataFrame) -> pd.Series:
        values = df[col]
        return values[values.notna() & ~values.isin(allowed)].map(fmt)
    return find


def _observed(phrase: str) -> Callable[[pd.DataFrame, dict], str]:
    return lambda df, result: f"{phrase} {result.get('observed_value')}"


def corpus_checks(min_chars: int, max_chars: int, min_total_chars: int,
                  max_duplicate_share: float, max_non_printable_share: float) -> list[Check]:
    return [
        Check("expect_table_row_count_to_be_between", {"min_value": 1}, explain=_observed("rows:")),
        Check("expect_column_values_to_not_be_null", {"column": "id"}, _nulls("id")),
        Check("expect_column_values_to_not_be_null", {"column": "text"}, _nulls("text")),
        Check("expect_column_values_to_be_unique", {"column": "id"}, _dupes("id", lambda d: d["line"], "id also on line {}")),
        Check("expect_column_values_to_be_between", {"column": "length", "min_value": min_chars, "max_value": max_chars},
              _outside("length", min_chars, max_chars, lambda v: f"{int(v)} chars")),
        Check("expect_column_values_to_be_in_set", {"column": "has_nul", "value_set": [False]},
              _not_in("has_nul", [False], lambda v: "contains NUL")),
        Check("expect_column_values_to_be_between", {"column": "non_printable_share", "max_value": max_non_printable_share},
              _outside("non_printable_share", None, max_non_printable_share, lambda v: f"{v:.1%} non-printable")),
        Check("expect_column_values_to_be_in_set", {"column": "utf8_valid", "value_set": [True]},
              _not_in("utf8_valid", [True], lambda v: "invalid UTF-8")),
        # Every copy of a repeated text is unexpected, so mostly bounds the share of duplicated documents.
        Check("expect_column_values_to_be_unique", {"column": "text_hash", "mostly": 1.0 - max_duplicate_share},
              _dupes("text_hash", lambda d: d["id"], "same text as id={}")),
        Check("expect_column_values_to_be_in_set", {"column": "split", "value_set": list(SPLITS)},
              _not_in("split", list(SPLITS), lambda v: f"split={v!r}")),
        Check("expect_column_sum_to_be_between", {"column": "length", "min_value": min_total_chars},
              explain=_observed("total chars:")),
    ]


# ----------------------------------------------------------------------------- SFT / preference
def _chars(value: Any) -> int:
    # Characters after stripping, so a whitespace-only prompt counts as empty.
    return len(value.strip()) if isinstance(value, str) else 0


def _len(value: Any) -> int:
    return len(value) if isinstance(value, str) else 0


def pairs_frame(directory: Path, kind: str, tokens: Callable[[str], int] | None = None) -> pd.DataFrame:
    """Rows of {train,val,test}.jsonl under directory (kind "sft" or "preference") with derived columns.

    context_* is prompt + answer (the longer of chosen/rejected), in tokens when `tokens` is given.
    """
    answers = ["response"] if kind == "sft" else ["chosen", "rejected"]
    rows = []
    for split in SPLITS:
        path = Path(directory) / f"{split}.jsonl"
        if not path.exists():
            continue  # a missing file shows up as a file with no rows, named by the file check
        for rec in read_jsonl(path):
            prompt = _str_or_none(rec.get("prompt")) or ""
            row = {"file": path.name, "line": rec["_line"],
                   "id": None if rec.get("id") is None else str(rec["id"]),
                   "prompt_chars": _chars(rec.get("prompt"))}
            for a in answers:
                row[f"{a}_chars"] = _chars(rec.get(a))
            texts = [_str_or_none(rec.get(a)) or "" for a in answers]
            if tokens is not None:
                row["context_tokens"] = tokens(prompt) + max(tokens(t) for t in texts)
            else:
                row["context_chars"] = len(prompt) + max(len(t) for t in texts)
            if kind == "preference":
                row["chosen_differs"] = rec.get("chosen") != rec.get("rejected")
                row["kind"] = rec.get("kind") if isinstance(rec.get("kind"), str) else ""
            rows.append(row)
    cols = ["file", "line", "id", "prompt_chars"] + [f"{a}_chars" for a in answers]
    cols += ["context_tokens" if tokens is not None else "context_chars"]
    cols += ["chosen_differs", "kind"] if kind == "preference" else []
    df = pd.DataFrame(rows, columns=cols)
    for c in cols:
        if c.endswith(("_chars", "_tokens")) or c == "line":
            df[c] = df[c].astype("int64")
    if kind == "preference":
        df["chosen_differs"] = df["chosen_differs"].astype(bool)
    return df


def pairs_checks(directory: Path, kind: str, block_size: int, in_tokens: bool) -> list[Check]:
    """Expectations of the SFT ("sft") or preference ("preference") set at directory."""
    files = [f"{s}.jsonl" for s in SPLITS]

    def missing_files(df: pd.DataFrame, result: dict) -> str:
        present = set(df["file"])
        return "no rows in " + ", ".join(str(Path(directory) / f) for f in files if f not in present)

    answers = ["response"] if kind == "sft" else ["chosen", "rejected"]
    checks = [
        Check("expect_column_distinct_values_to_contain_set", {"column": "file", "value_set": files},
              explain=missing_files),
        Check("expect_column_values_to_not_be_null", {"column": "id"}, _nulls("id")),
        Check("expect_column_values_to_be_unique", {"column": "id"},
              _dupes("id", lambda d: d["file"] + ":" + d["line"].astype(str), "id also at {}")),
    ]
    for col in ["prompt"] + answers:
        checks.append(Check("expect_column_values_to_be_between", {"column": f"{col}_chars", "min_value": 1},
                            _outside(f"{col}_chars", 1, None, lambda v, c=col: f"empty {c}")))
    # Tokenization lives in another stage: with a token counter bound tokens by the context, else
    # bound characters at ~6 per token (dense code averages 3-4, so this only catches gross overruns).
    col, bound, unit = ("context_tokens", block_size, "tokens") if in_tokens else ("context_chars", block_size * 6, "chars")
    checks.append(Check("expect_column_values_to_be_between", {"column": col, "max_value": bound},
                        _outside(col, None, bound, lambda v: f"{int(v)} {unit} > {bound}")))
    if kind == "preference":
        checks += [
            Check("expect_column_values_to_be_in_set", {"column": "chosen_differs", "value_set": [True]},
                  _not_in("chosen_differs", [True], lambda v: "chosen == rejected")),
            Check("expect_column_values_to_be_in_set", {"column": "kind", "value_set": list(PREFERENCE_KINDS)},
                  _not_in("kind", list(PREFERENCE_KINDS), lambda v: f"kind={v!r}")),
        ]
    return checks
