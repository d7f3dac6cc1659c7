"""Small file helpers for the data stage: atomic files, atomic directory swaps, strict JSONL reading.

A stage either leaves its previous outputs untouched or replaces them whole: everything is written
into a temp sibling (same filesystem, so os.replace/rename is atomic) and moved into place last.
A process killed with SIGKILL can still leave a `.NAME.*.tmp` sibling behind; nothing reads those.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from components.errors import DataError


def _sibling(path: Path, tag: str) -> Path:
    # A unique dot-name next to the target: same directory means same filesystem, so rename is atomic.
    return path.parent / f".{path.name}.{uuid.uuid4().hex[:10]}.{tag}"


@contextmanager
def atomic_file(path: Path, mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temp sibling of `path` for writing; on clean exit it replaces `path`, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, "tmp")
    # "x" mode (not mkstemp) so the file gets the usual umask permissions instead of 0600.
    encoding = None if "b" in mode else "utf-8"
    try:
        with open(tmp, mode.replace("w", "x"), encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_file(path) as f:
        f.write(text)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def temp_dir_for(final: Path) -> Path:
    """A fresh, empty temp sibling directory of `final` (to be moved into place by replace_dirs)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(final, "tmp")
    tmp.mkdir()
    return tmp


def replace_dirs(moves: dict[Path, Path]) -> None:
    """Move each temp dir onto its final path (tmp -> final). Old contents are kept until all moves
    succeed, and restored if one fails, so readers see either the old set or the new set."""
    done: list[tuple[Path, Path, Path | None]] = []
    try:
        for tmp, final in moves.items():
            backup = None
            if final.exists():
                backup = _sibling(final, "old")
                os.rename(final, backup)
            os.rename(tmp, final)
            done.append((tmp, final, backup))
    except BaseException:
        for tmp, final, backup in reversed(done):
            os.rename(final, tmp)
            if backup is not None:
                os.rename(backup, final)
        raise
    for _, _, backup in done:
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)


def remove_dirs(paths: list[Path] | tuple[Path, ...]) -> None:
    for p in paths:
        shutil.rmtree(p, ignore_errors=True)


def read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """Yield (line_no, object) for each non-blank line; DataError names file:line on a bad line."""
    path = Path(path)
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{path}:{line_no}: not UTF-8") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{line_no}: not valid JSON ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{line_no}: expected a JSON object, got {type(obj).__name__}")
            yield line_no, obj


def write_jsonl(f: IO[str], rows: list[dict] | Iterator[dict]) -> int:
    """Write rows as JSONL (UTF-8, not ASCII-escaped); return how many were written."""
    n = 0
    for row in rows:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
        n += 1
    return n
