"""Tiny, deterministic Python corpora for tests: real code with functions and docstrings.

Each module is distinct (no near duplicates), parses, and has a few documented functions, so the
ingest, dedup, split, tokenizer and SFT/preference builders all have something real to chew on.
"""
from __future__ import annotations

import random
from pathlib import Path

_VERBS = ["compute", "parse", "load", "merge", "filter", "render", "count", "split", "encode", "check",
          "scale", "format", "collect", "resolve", "sort", "index", "reduce", "expand", "clean", "match"]
_NOUNS = ["items", "tokens", "records", "paths", "values", "lines", "words", "blocks", "pairs", "names",
          "chunks", "rows", "keys", "nodes", "fields", "events", "users", "files", "ranges", "scores"]
_BODIES = [
    "    result = []\n    for item in {arg}:\n        if item:\n            result.append(item)\n    return result\n",
    "    total = 0\n    for value in {arg}:\n        total += len(str(value))\n    return total\n",
    "    seen = set()\n    out = []\n    for x in {arg}:\n        if x not in seen:\n            seen.add(x)\n            out.append(x)\n    return out\n",
    "    if not {arg}:\n        return None\n    return sorted({arg}, key=str)[0]\n",
    "    mapping = {{}}\n    for i, x in enumerate({arg}):\n        mapping[str(x)] = i\n    return mapping\n",
    "    parts = [str(x).strip() for x in {arg}]\n    return ', '.join(p for p in parts if p)\n",
    "    count = 0\n    for x in {arg}:\n        if isinstance(x, int) and x % 2 == 0:\n            count += 1\n    return count\n",
    "    return [x for x in reversed(list({arg})) if x is not None]\n",
]


def make_module(rng: random.Random, index: int, n_funcs: int = 4) -> str:
    lines = [f'"""Utilities for module number {index}: {rng.choice(_VERBS)} and {rng.choice(_NOUNS)}."""', "",
             "import os", ""]
    used: set[str] = set()
    for j in range(n_funcs):
        verb, noun = rng.choice(_VERBS), rng.choice(_NOUNS)
        name = f"{verb}_{noun}_{index}_{j}"
        if name in used:
            continue
        used.add(name)
        arg = rng.choice(["data", "seq", "values", "items"])
        body = rng.choice(_BODIES).format(arg=arg)
        summary = f"{verb.capitalize()} the {noun} in {arg} and return the result (variant {index}.{j})."
        lines += ["", f"def {name}({arg}, limit={rng.randint(1, 99)}):",
                  f'    """{summary}\n\n    The limit is kept for compatibility with caller number {rng.randint(100, 999)}.\n    """',
                  body.rstrip("\n"), ""]
    lines.append(f"CONSTANT_{index} = {rng.randint(0, 10_000)}")
    return "\n".join(lines) + "\n"


def write_corpus_dir(root: Path, n_modules: int = 40, seed: int = 0) -> Path:
    """Write n_modules distinct .py files under root/pkg (and one test dir that must be excluded)."""
    rng = random.Random(seed)
    pkg = root / "pkg"
    pkg.mkdir(parents=True, exist_ok=True)
    for i in range(n_modules):
        (pkg / f"mod_{i:03d}.py").write_text(make_module(rng, i), encoding="utf-8")
    tests = pkg / "tests"
    tests.mkdir(exist_ok=True)
    (tests / "test_skip.py").write_text("def test_x():\n    assert True\n", encoding="utf-8")
    return pkg


def write_corpus_jsonl(path: Path, n_docs: int = 40, seed: int = 0) -> Path:
    import json
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for i in range(n_docs):
            f.write(json.dumps({"text": make_module(rng, i)}) + "\n")
    return path
