"""Function extraction, SFT prompts, and each preference corruption kind on real Python source."""
from __future__ import annotations

import random
from collections import Counter

from components.data.functions import (KINDS, extract_functions, is_valid_python, make_pairs, other_body,
                                       shuffled, summarize, truncated)
from tests.corpus_factory import make_module

MODULE = '''"""A module."""
import os


def area(width: float, height: float = 1.0) -> float:
    """Compute the area of a rectangle.

    More words that are not part of the summary.
    """
    w = abs(width)
    h = abs(height)
    # the product
    return w * h


def undocumented(x):
    return x


class Store:
    """A store."""

    def __init__(self):
        """Dunder: skipped."""
        self.items = []

    def add(self, item, *, key=None):
        """Add an item to the store. Then some more."""
        text = """
a string at column zero
"""
        self.items.append((key, item, text))
        return len(self.items)

    def error(self, message):
        """error(message: string)"""
        raise ValueError(message)


async def fetch(url):
    """HTTP fetch of url."""
    data = await os.read(url)
    parts = data.split()
    return parts
'''


def test_extracts_documented_top_level_and_class_functions():
    fns = extract_functions(MODULE, "dir:m.py")
    assert [f.qualname for f in fns] == ["area", "Store.add", "fetch"]   # undocumented, dunder, restated skipped
    area, add, fetch = fns
    assert area.id == "dir:m.py::area" and area.doc_id == "dir:m.py" and area.name == "area"
    assert area.signature == "area(width: float, height: float=1.0)"
    assert area.summary == "compute the area of a rectangle."
    assert area.prompt == "Write a Python function `area(width: float, height: float=1.0)` that compute the area of a rectangle."
    assert area.source.startswith("def area(") and area.source.endswith("return w * h")
    # methods are dedented to column 0; a string literal at column zero keeps its content
    assert add.source.startswith("def add(self, item, *, key=None):\n    \"\"\"Add")
    assert "\na string at column zero\n" in add.source and is_valid_python(add.source)
    assert add.summary == "add an item to the store." and add.signature == "add(self, item, *, key=None)"
    assert fetch.summary == "HTTP fetch of url."          # acronyms keep their case
    assert extract_functions("def broken(:\n", "x") == []


def test_summarize():
    assert summarize("Return the thing.\nIt is big.") == "return the thing."
    assert summarize("  Two lines\n  joined together\n\n  Rest.") == "two lines joined together"


def test_is_valid_python_is_exact_syntax():
    assert is_valid_python("def f(x):\n    return x\n") and not is_valid_python("def f(x):\n    return (")
    assert not is_valid_python("x = 1\x00")
    assert is_valid_python("x")  # any valid Python: judging completions is scorers.parses' job


def test_truncated_does_not_parse():
    area = extract_functions(MODULE, "m")[0]
    for seed in range(10):
        bad = truncated(area.source, random.Random(seed))
        assert not is_valid_python(bad) and area.source.startswith(bad)
        assert len(bad) > area.source.index("w = abs")   # cut in the code, past the docstring
    assert not is_valid_python(truncated("def f():\n    'doc'\n    return 1", random.Random(0)))


def test_shuffled_differs_and_keeps_statements():
    area = extract_functions(MODULE, "m")[0]
    out = shuffled(area.source, random.Random(0))
    assert out is not None and out != area.source and is_valid_python(out)
    assert Counter(out.splitlines()) == Counter(area.source.splitlines())
    assert out.split("\n")[0] == area.source.split("\n")[0]   # signature stays first
    one_stmt = "def f(x):\n    'doc'\n    return x"
    assert shuffled(one_stmt, random.Random(0)) is None


def test_other_body_keeps_signature_and_docstring():
    fns = extract_functions(MODULE, "m")
    area = fns[0]
    out = other_body(area, fns, random.Random(0))
    assert out is not None and is_valid_python(out) and out != area.source
    head = area.source[: area.source.index("    w = abs")]
    assert out.startswith(head)
    assert "w = abs" not in out and ("self.items.append" in out or "await os.read" in out)
    assert other_body(area, [area], random.Random(0)) is None    # nothing else to borrow from


def test_make_pairs_deterministic_with_every_kind():
    rng = random.Random(5)
    fns = [f for i in range(12) for f in extract_functions(make_module(rng, i), f"dir:mod_{i}.py")]
    sft, pref = make_pairs(fns, seed=1337)
    assert len(sft) == len(fns) and len(pref) == len(fns)
    assert make_pairs(fns, seed=1337) == (sft, pref)
    assert make_pairs(fns, seed=1) != (sft, pref)
    assert set(r["kind"] for r in pref) == set(KINDS)
    for s, p in zip(sft, pref):
        assert s["response"] == p["chosen"] and p["rejected"] != p["chosen"]
        assert s["prompt"].startswith(f"Write a Python function `{s['name']}(")
        if p["kind"] == "truncated":
            assert not is_valid_python(p["rejected"])
        else:
            assert is_valid_python(p["rejected"])
            assert p["rejected"].split("\n")[0] == p["chosen"].split("\n")[0]
