"""The current window: the newest served requests, read from the server's rotated request log.

Files are <log_dir>/requests-<date>.jsonl and requests-<date>.<n>.jsonl (components/serving/
request_log.py); they sort by (date, n). The window is the last N records, or those of the last T
minutes. A bad line stops the read with a DataError naming the file and line: a monitor that
skipped it silently would judge a window nobody chose. Records stay exactly as logged (the retrain
flow builds data from them); prompts repeated inside a window are judged once (see unique_prompts).
"""
from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from components.data import io
from components.errors import DataError

REQUIRED = ("prompt", "completion", "ts")
_NAME = re.compile(r"^(?P<prefix>.+)-(?P<date>\d{4}-\d{2}-\d{2})(?:\.(?P<n>\d+))?\.jsonl$")


@dataclass
class Window:
    records: list[dict[str, Any]]
    files: list[Path] = field(default_factory=list)

    @property
    def start(self) -> str | None:
        return self.records[0]["ts"] if self.records else None

    @property
    def end(self) -> str | None:
        return self.records[-1]["ts"] if self.records else None

    def meta(self) -> dict[str, Any]:
        return {"start": self.start, "end": self.end, "n": len(self.records)}


def log_files(folder: Path, prefix: str = "requests") -> list[Path]:
    """The request log's files, oldest first."""
    found = []
    for path in Path(folder).glob(f"{prefix}-*.jsonl"):
        m = _NAME.match(path.name)
        if m and m.group("prefix") == prefix:
            found.append(((m.group("date"), int(m.group("n") or 0)), path))
    return [p for _, p in sorted(found)]


def _parse_ts(value: Any, where: str) -> dt.datetime:
    try:
        ts = dt.datetime.fromisoformat(str(value))
    except ValueError:
        raise DataError(f"{where}: field ts {value!r} is not an ISO timestamp") from None
    return ts if ts.tzinfo else ts.replace(tzinfo=dt.timezone.utc)


def _read(path: Path) -> list[dict[str, Any]]:
    rows = []
    for line_no, row in io.read_jsonl(path):
        missing = [k for k in REQUIRED if k not in row]
        if missing:
            raise DataError(f"{path}:{line_no}: request record lacks field(s) {', '.join(missing)}")
        if not isinstance(row["prompt"], str) or not isinstance(row["completion"], str):
            raise DataError(f"{path}:{line_no}: prompt and completion must be strings")
        _parse_ts(row["ts"], f"{path}:{line_no}")
        rows.append(row)
    return rows


def read_window(folder: Path, n: int | None = None, minutes: float | None = None,
                now: dt.datetime | None = None, prefix: str = "requests") -> Window:
    """The last n records (n given), else those stamped within the last `minutes` before now.

    Reads newest files first and stops once n records are in hand. DataError when there is no log.
    """
    if (n is None) == (minutes is None):
        raise ValueError("read_window: give exactly one of n or minutes")
    files = log_files(folder, prefix)
    if not files:
        raise DataError(f"no request log at {Path(folder) / (prefix + '-*.jsonl')}: serve some traffic first "
                        "(`llmcycle serve`, then `llmcycle traffic`)")
    since = None if minutes is None else (now or dt.datetime.now(dt.timezone.utc)) - dt.timedelta(minutes=minutes)
    chunks, used, total = [], [], 0
    for path in reversed(files):
        rows = _read(path)
        if since is not None:
            rows = [r for r in rows if _parse_ts(r["ts"], str(path)) >= since]
        chunks.append(rows)
        used.append(path)
        total += len(rows)
        if n is not None and total >= n:
            break
    records = [r for rows in reversed(chunks) for r in rows]
    records.sort(key=lambda r: _parse_ts(r["ts"], "ts"))     # one file's writer appends in time order; files interleave
    if n is not None:
        records = records[-n:]
    return Window(records, list(reversed(used)))


def unique_prompts(records: list[dict[str, Any]], key) -> list[int]:
    """Indices of the first record of each distinct key(record): a window of repeats would let the text
    classifier memorise rows and false-alarm (TRAPS.md), and n > 1 choices share one prompt."""
    seen: set = set()
    keep = []
    for i, r in enumerate(records):
        k = key(r)
        if k not in seen:
            seen.add(k)
            keep.append(i)
    return keep
