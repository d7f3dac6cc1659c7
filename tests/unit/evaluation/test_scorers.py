"""Code scorers: parse/defines checks, fence stripping, pass@k against hand values, and the same
scorers run through a real (SQLite, offline) `mlflow.genai.evaluate`.
"""
import math

import pytest

from components.evaluation.scorers import (defines_name, extract_code, mlflow_scorers, parses, pass_at_k,
                                           score_completions)

GOOD = "def add(a, b):\n    return a + b\n"


def test_parses():
    assert parses(GOOD)
    assert parses("class C:\n    def m(self):\n        return 1\n")
    # Valid Python that is not a function completion: a bare name, an expression, an assignment.
    assert not parses("x = 1") and not parses("foo") and not parses("1 + 2")
    assert not parses("# just a comment\n")
    assert not parses("")
    assert not parses("   \n")
    assert not parses("def f(:\n    pass")
    assert not parses("def f(x):\n    return x +")  # cut before the body had one full statement


def test_parses_tolerates_a_cut_off_last_line():
    truncated = "def f(x):\n    y = x * 2\n    return y +"
    assert parses(truncated)
    assert defines_name(truncated, "f")


def test_defines_name():
    assert defines_name(GOOD, "add")
    assert defines_name("async def fetch():\n    pass", "fetch")
    assert not defines_name(GOOD, "sub")
    assert not defines_name("def outer():\n    def add():\n        pass", "add")  # nested, not top level
    assert not defines_name("add = lambda a, b: a + b", "add")
    assert not defines_name("def add(:", "add")
    assert defines_name("class C:\n    def m(self):\n        pass", "C.m")


def test_extract_code():
    assert extract_code(f"Here:\n```python\n{GOOD}```\nDone.") == GOOD
    assert extract_code(f"```\n{GOOD}```") == GOOD
    assert extract_code(f"```python\n{GOOD}") == GOOD  # unclosed fence: generation stopped
    assert extract_code(GOOD) == GOOD


@pytest.mark.parametrize("n,c,k,expected", [
    (5, 2, 1, 0.4),                   # c/n for k=1
    (5, 2, 2, 1 - 3 / 10),            # 1 - C(3,2)/C(5,2)
    (4, 1, 2, 1 - 3 / 6),             # 1 - C(3,2)/C(4,2)
    (10, 0, 3, 0.0),
    (3, 2, 2, 1.0),                   # n - c < k: every k-subset holds a correct sample
    (200, 13, 10, 1 - math.comb(187, 10) / math.comb(200, 10)),
])
def test_pass_at_k(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected)


def test_pass_at_k_rejects_bad_arguments():
    for args in [(3, 4, 1), (3, 1, 0), (3, 1, 4)]:
        with pytest.raises(ValueError):
            pass_at_k(*args)


def test_score_completions():
    rows = score_completions(["add", "add", "mul"], [GOOD, "```python\n" + GOOD + "```", "def mul(:"])
    assert [r["syntax_valid"] for r in rows] == [True, True, False]
    assert [r["defines_name"] for r in rows] == [True, True, False]
    with pytest.raises(ValueError):
        score_completions(["a"], [])


def test_mlflow_genai_evaluate_offline(tiny_settings):
    import pandas as pd
    import mlflow
    from components.tracking import configure

    configure(tiny_settings)
    df = pd.DataFrame({
        "inputs": [{"prompt": "def add(a, b):", "name": "add"}, {"prompt": "def mul(a, b):", "name": "mul"},
                   {"prompt": "def neg(a):", "name": "neg"}],
        "outputs": [GOOD, "def other(a, b):\n    return a * b\n", "def neg(a:"],
    })
    with mlflow.start_run(run_name="evaluate") as run:
        result = mlflow.genai.evaluate(data=df, scorers=mlflow_scorers())
    assert result.run_id == run.info.run_id  # logs into the active stage run, not a new one
    assert result.metrics["syntax_valid/mean"] == pytest.approx(2 / 3)
    assert result.metrics["defines_name/mean"] == pytest.approx(1 / 3)
    # Per-row verdicts are assessments on traces in the store (the UI's Traces tab shows them).
    table = result.tables["eval_results"]
    assert table["syntax_valid/value"].tolist() == [True, True, False]
    assert table["defines_name/value"].tolist() == [True, False, False]
    logged = mlflow.get_run(run.info.run_id).data.metrics
    assert logged["syntax_valid/mean"] == pytest.approx(2 / 3)


def test_comments_only_is_not_code():
    from components.evaluation.scorers import parses

    assert not parses("#\n#\n#\n")
    assert not parses("# just a comment\n\n")
    assert parses("def f():\n    return 1\n# trailing comment\n")
