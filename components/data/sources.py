"""Where raw documents come from: the running interpreter's stdlib, a folder (dir:PATH) or a JSONL file.

Each source yields RawDoc records with a stable id (source kind + relative path, or the JSONL line /
given id) and the payload as bytes (files: decoding is cleaning's job) or str (JSONL `text`).
Excluded directory names are pruned during the walk, so a large tests/ tree costs nothing.
fingerprint() hashes what a source holds (relative paths + contents; for stdlib also the interpreter
version) so DVC can see a changed source: reading it costs about what ingest's own read costs.
"""
from __future__ import annotations

import hashlib
import os
import platform
import re
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from components.config import Settings
from components.data.io import read_jsonl
from components.errors import ConfigError, DataError

STDLIB_GLOB = "**/*.py"


@dataclass(frozen=True)
class Source:
    kind: str          # stdlib | dir | jsonl
    path: Path         # absolute root folder or JSONL file
    spec: str          # the data.source value, for messages


@dataclass(frozen=True)
class RawDoc:
    id: str            # stable: "<kind>:<relative path>" or "jsonl:line-N" / "jsonl:<given id>"
    payload: bytes | str
    where: str         # file (or file:line) for messages


def resolve_source(settings: Settings, key: str = "data.source", spec: str | None = None) -> Source:
    """Parse data.source; relative paths resolve against the project root. Missing path -> ConfigError."""
    spec = settings.data.source if spec is None else spec
    if spec == "stdlib":
        return Source("stdlib", Path(sysconfig.get_paths()["stdlib"]).resolve(), spec)
    kind, _, raw = spec.partition(":")
    if kind not in ("dir", "jsonl") or not raw:
        raise ConfigError(f"{key}: must be stdlib, dir:PATH or jsonl:PATH, got {spec!r}")
    path = settings.path(Path(raw).expanduser()).resolve()
    if not path.exists():
        raise ConfigError(f"{key}: path does not exist: {path} (from {spec!r})")
    if kind == "dir" and not path.is_dir():
        raise ConfigError(f"{key}: {path} is not a directory (use jsonl:PATH for a file)")
    if kind == "jsonl" and not path.is_file():
        raise ConfigError(f"{key}: {path} is not a file")
    return Source(kind, path, spec)


@lru_cache(maxsize=32)
def glob_regex(pattern: str) -> re.Pattern[str]:
    """Translate a path glob ("**/*.py", "src/*.txt") to a regex over POSIX relative paths.

    Python 3.11's PurePath.match anchors from the right and treats ** like *, so "**/*.py" would
    miss top-level files; this gives the usual shell semantics: ** spans directories, * does not.
    """
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[" and "]" in pattern[i + 1:]:
            j = pattern.index("]", i + 1)
            body = pattern[i + 1:j]
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
            i = j + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def list_files(root: Path, pattern: str, exclude_dirs: list[str] | tuple[str, ...]) -> list[Path]:
    """Files under root whose relative path matches `pattern`, skipping excluded dir names; sorted."""
    rx = glob_regex(pattern)
    excluded = set(exclude_dirs)
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Prune in place so os.walk never descends into excluded trees (tests, site-packages).
        dirnames[:] = sorted(d for d in dirnames if d not in excluded)
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        prefix = "" if rel_dir == "." else rel_dir + "/"
        for name in filenames:
            if rx.match(prefix + name):
                found.append(Path(dirpath) / name)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _iter_files(source: Source, pattern: str, exclude_dirs: list[str]) -> Iterator[RawDoc]:
    for path in list_files(source.path, pattern, exclude_dirs):
        rel = path.relative_to(source.path).as_posix()
        try:
            payload = path.read_bytes()
        except OSError as exc:
            raise DataError(f"{path}: cannot read ({exc.strerror})") from None
        yield RawDoc(f"{source.kind}:{rel}", payload, str(path))


def _iter_jsonl(source: Source) -> Iterator[RawDoc]:
    seen: dict[str, int] = {}
    for line_no, obj in read_jsonl(source.path):
        text = obj.get("text")
        if not isinstance(text, str):
            what = "no 'text' field" if text is None else f"'text' is {type(text).__name__}, not a string"
            raise DataError(f"{source.path}:{line_no}: {what}")
        given = obj.get("id")
        if given is not None and not isinstance(given, (str, int)):
            raise DataError(f"{source.path}:{line_no}: 'id' must be a string or integer")
        doc_id = f"jsonl:{given}" if given is not None else f"jsonl:line-{line_no}"
        if doc_id in seen:
            raise DataError(f"{source.path}:{line_no}: id {doc_id!r} already used on line {seen[doc_id]}")
        seen[doc_id] = line_no
        yield RawDoc(doc_id, text, f"{source.path}:{line_no}")


def iter_raw(source: Source, settings: Settings) -> Iterator[RawDoc]:
    """Every raw document of the source, in a deterministic order."""
    if source.kind == "jsonl":
        return _iter_jsonl(source)
    pattern = STDLIB_GLOB if source.kind == "stdlib" else settings.data.glob
    return _iter_files(source, pattern, settings.data.exclude_dirs)


def file_sha256(path: Path) -> str:
    try:
        with path.open("rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})") from None


def fingerprint(source: Source, settings: Settings) -> dict:
    """What the source holds, as a stable hash: the files ingest would read (relative path + content).

    No absolute paths and no mtimes: the same corpus gives the same fingerprint in another clone, venv
    or after a `touch`, so only a real change reruns ingest (and changes the data hash).
    """
    if source.kind == "jsonl":
        files, root = [source.path], source.path.parent
    else:
        pattern = STDLIB_GLOB if source.kind == "stdlib" else settings.data.glob
        files, root = list_files(source.path, pattern, settings.data.exclude_dirs), source.path
    h = hashlib.sha256()
    for path in files:
        h.update(f"{path.relative_to(root).as_posix()}\0{file_sha256(path)}\n".encode())
    out = {"kind": source.kind, "files": len(files), "sha256": h.hexdigest()}
    if source.kind == "stdlib":
        # A new interpreter brings a new stdlib; the version also names it for a reader of dvc.lock.
        out["python"] = f"{sys.implementation.name} {platform.python_version()}"
    return out
