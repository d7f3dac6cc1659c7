"""Prompt profiles for the traffic simulator: stdlib (held-out, no drift), tests (stdlib `test/`, drift), jsonl.

Prompts take the SFT form the model was trained on (components/data/functions.sft_prompt). `stdlib`
reads the data stage's held-out SFT pairs (val + test: the prompts the monitor's reference is built
from) and, when those hold fewer than asked, tops up from held-out stdlib modules (same hash split as
ingest). Every profile draws without replacement: a window with duplicated prompts makes the drift
classifier false-alarm (TRAPS.md), so asking for more prompts than a profile holds is an error.
"""
from __future__ import annotations

import random
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from components.config import Settings
from components.data import layout
from components.data.cleaning import split_of
from components.data.functions import extract_functions
from components.data.io import read_jsonl
from components.data.sources import list_files
from components.errors import ConfigError, DataError

PROFILES = ("stdlib", "tests", "jsonl:<path>")
MAX_PROMPT_CHARS = 400      # a signature longer than this is rare and would not fit the tiny model's context
HELD_OUT = ("val", "test")


@dataclass(frozen=True)
class Prompt:
    prompt: str
    name: str = ""           # the function the prompt asks for ("" when unknown): scores the completion
    reference: str = ""      # the real function ("" when unknown): the correction / the chosen answer
    id: str = ""


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"]).resolve()


def _draw(items: Iterable[Prompt], n: int, profile: str, seen: set[str] | None = None) -> Iterator[Prompt]:
    """Yield at most n prompts, skipping repeats (by prompt text) and over-long ones."""
    seen = set() if seen is None else seen
    left = n
    for p in items:
        if left <= 0:
            return
        if p.prompt in seen or len(p.prompt) > MAX_PROMPT_CHARS:
            continue
        seen.add(p.prompt)
        left -= 1
        yield p


def _from_files(root: Path, files: list[Path], rng: random.Random, id_prefix: str) -> Iterator[Prompt]:
    """Documented functions of the files, in a seeded random file order (only as many files are parsed
    as the draw needs: the stdlib `test/` tree is large)."""
    order = files[:]
    rng.shuffle(order)
    for path in order:
        rel = path.relative_to(root).as_posix()
        try:
            source = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        fns = extract_functions(source, f"{id_prefix}:{rel}")
        rng.shuffle(fns)
        for fn in fns:
            yield Prompt(fn.prompt, fn.name, fn.source, fn.id)


def _need(got: list[Prompt], n: int, profile: str, where: str) -> list[Prompt]:
    if len(got) < n:
        raise ConfigError(f"profile {profile}: only {len(got)} distinct prompts in {where}; ask for --n {len(got)} "
                          "or fewer (prompts are drawn without replacement)")
    return got


def stdlib_prompts(settings: Settings, n: int, seed: int = 0, exact: bool = True) -> list[Prompt]:
    """n distinct held-out stdlib function prompts: the SFT val/test pairs first (shuffled by seed), then
    functions of held-out stdlib modules (split_of on the ingest id "stdlib:<relative path>"). exact=False
    returns as many as there are, up to n, instead of a ConfigError when there are fewer."""
    rng = random.Random(f"stdlib:{seed}")
    rows: list[Prompt] = []
    if settings.data.source == "stdlib":
        for split in HELD_OUT:
            path = layout.sft_dir(settings) / f"{split}.jsonl"
            if path.is_file():
                rows += [Prompt(r["prompt"], str(r.get("name", "")), str(r.get("response", "")), str(r.get("id", "")))
                         for _, r in read_jsonl(path) if isinstance(r.get("prompt"), str) and r["prompt"]]
    rng.shuffle(rows)
    seen: set[str] = set()
    got = list(_draw(rows, n, "stdlib", seen))
    if len(got) < n:
        root, d = stdlib_root(), settings.data
        files = [p for p in list_files(root, "**/*.py", d.exclude_dirs)
                 if split_of(f"stdlib:{p.relative_to(root).as_posix()}", d.split.val, d.split.test) in HELD_OUT]
        got += _draw(_from_files(root, files, rng, "stdlib"), n - len(got), "stdlib", seen)
    return _need(got, n if exact else 0, "stdlib", "the held-out SFT pairs and held-out stdlib modules")


def stdlib_test_prompts(n: int, seed: int = 0) -> list[Prompt]:
    """n distinct function prompts from the standard library's `test/` tree (the drifted domain)."""
    root = stdlib_root() / "test"
    if not root.is_dir():
        raise ConfigError(f"profile tests: this interpreter has no stdlib test tree at {root}")
    files = list_files(root, "**/*.py", ["__pycache__"])
    got = list(_draw(_from_files(root, files, random.Random(f"tests:{seed}"), "stdlib-test"), n, "tests"))
    return _need(got, n, "tests", str(root))


def jsonl_prompts(settings: Settings, path_spec: str, n: int, seed: int = 0) -> list[Prompt]:
    """n distinct prompts from a JSONL file: one object a line with a non-empty string `prompt`; optional
    `name` (the asked function) and `reference` (or `response`: the right answer, for feedback)."""
    path = settings.path(Path(path_spec).expanduser())
    if not path.is_file():
        raise ConfigError(f"profile jsonl:{path_spec}: file does not exist: {path}")
    rows: list[Prompt] = []
    for line_no, obj in read_jsonl(path):
        if not isinstance(obj.get("prompt"), str) or not obj["prompt"].strip():
            raise DataError(f"{path}:{line_no}: missing or empty string field 'prompt'")
        ref = obj.get("reference", obj.get("response", ""))
        rows.append(Prompt(obj["prompt"], str(obj.get("name") or ""), ref if isinstance(ref, str) else "",
                           f"{path.name}:{line_no}"))
    random.Random(f"jsonl:{seed}").shuffle(rows)
    seen: set[str] = set()
    got = [p for p in rows if not (p.prompt in seen or seen.add(p.prompt))][:n]
    return _need(got, n, f"jsonl:{path_spec}", str(path))


def profile_prompts(settings: Settings, profile: str, n: int, seed: int = 0) -> list[Prompt]:
    """The prompts of a named profile; ConfigError (exit 2) for an unknown profile."""
    if n < 1:
        raise ConfigError(f"--n must be at least 1, got {n}")
    if profile == "stdlib":
        return stdlib_prompts(settings, n, seed)
    if profile == "tests":
        return stdlib_test_prompts(n, seed)
    if profile.startswith("jsonl:") and profile[len("jsonl:"):].strip():
        return jsonl_prompts(settings, profile[len("jsonl:"):].strip(), n, seed)
    raise ConfigError(f"--profile: expected one of {', '.join(PROFILES)}, got {profile!r}")
