"""Deterministic code scorers for completions: does it parse, does it define the asked name, pass@k.

Plain functions for the evaluation stage, plus the same checks wrapped as MLflow GenAI code
scorers (`mlflow_scorers`) so `mlflow.genai.evaluate` shows per-row verdicts in the UI, offline.
Parsing is ast-only (never exec): a completion that parses is not a completion that runs.
"""
from __future__ import annotations

import ast
import math
import re
from typing import Any

_FENCE = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)


def extract_code(completion: str) -> str:
    """The code inside the first ``` / ```python fence, or the completion itself when unfenced.

    An unclosed fence (generation stopped mid-block) keeps everything after the opening line.
    """
    match = _FENCE.search(completion or "")
    return match.group(1) if match else (completion or "")


FUNCS = (ast.FunctionDef, ast.AsyncFunctionDef)


def _parse(code: str) -> ast.Module | None:
    """ast of the code as-is; failing that, of the code without its last line.

    Generation stops at max_new_tokens, often mid-line: dropping the cut-off last line keeps a
    function whose earlier body is sound, while a body cut before its first statement still fails.
    """
    if not code or not code.strip():
        return None
    for candidate in (code, code.rstrip("\n").rsplit("\n", 1)[0] if "\n" in code.strip() else None):
        if candidate is None or not candidate.strip():
            continue
        try:
            return ast.parse(candidate)
        except (SyntaxError, ValueError, RecursionError, MemoryError):  # ValueError: null bytes in the source
            continue
    return None


def _defines_function(tree: ast.Module) -> bool:
    """A top-level def, or a top-level class holding one: what a function completion must contain."""
    return any(isinstance(n, FUNCS) or (isinstance(n, ast.ClassDef) and any(isinstance(m, FUNCS) for m in n.body))
               for n in tree.body)


def parses(code: str) -> bool:
    """True when the code (or the code minus a cut-off last line) parses AND defines a function.

    The one syntax check of completions, for evaluation, the gate and training samples alike. A bare
    name, an expression or comments parse as Python but are not a function completion: False.
    """
    tree = _parse(code)
    return tree is not None and _defines_function(tree)


def defines_name(code: str, name: str) -> bool:
    """True when a top-level def/async def of exactly `name` is in the (parsable) code.

    A method's prompt name may be 'Class.method': then the method inside that top-level class counts.
    """
    tree = _parse(code)
    if tree is None or not name:
        return False
    if "." in name:
        cls_name, meth = name.rsplit(".", 1)
        return any(isinstance(n, ast.ClassDef) and n.name == cls_name
                   and any(isinstance(m, FUNCS) and m.name == meth for m in n.body) for n in tree.body)
    return any(isinstance(n, FUNCS) and n.name == name for n in tree.body)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n-c, k) / C(n, k), as a stable product.

    n samples, c of them correct; the product form avoids huge binomials for large n.
    """
    if not 0 <= c <= n or k < 1:
        raise ValueError(f"need 0 <= c <= n and k >= 1, got n={n}, c={c}, k={k}")
    if k > n:
        raise ValueError(f"k ({k}) cannot exceed the number of samples n ({n})")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def score_completions(names: list[str], completions: list[str]) -> list[dict[str, Any]]:
    """One dict per completion: name, syntax_valid, defines_name (fences stripped first)."""
    if len(names) != len(completions):
        raise ValueError(f"{len(names)} names but {len(completions)} completions")
    rows = []
    for name, completion in zip(names, completions):
        code = extract_code(completion)
        rows.append({"name": name, "syntax_valid": parses(code), "defines_name": defines_name(code, name)})
    return rows


def _output_text(outputs: Any) -> str:
    """The completion text from a row's outputs: a string, or a dict/list holding one."""
    if isinstance(outputs, str):
        return outputs
    if isinstance(outputs, dict):
        for key in ("completion", "text", "response", "content"):
            if isinstance(outputs.get(key), str):
                return outputs[key]
    if isinstance(outputs, list) and outputs and isinstance(outputs[0], str):
        return outputs[0]
    return "" if outputs is None else str(outputs)


def mlflow_scorers() -> list[Any]:
    """[syntax_valid, defines_name] as MLflow GenAI code scorers (no LLM judge, no key, offline).

    Rows: inputs={"prompt": ..., "name": ...}, outputs=<completion>. Built on call so importing this
    module does not import mlflow (CLI start-up time).
    """
    from mlflow.entities import Feedback
    from mlflow.genai.scorers import scorer

    @scorer(name="syntax_valid", description="the completion is a function definition that parses (ast)")
    def syntax_valid(outputs: Any) -> bool:
        return parses(extract_code(_output_text(outputs)))

    @scorer(name="defines_name", description="the completion defines the asked function at top level")
    def defines_name_scorer(inputs: dict, outputs: Any) -> Feedback:
        name = (inputs or {}).get("name", "")
        ok = defines_name(extract_code(_output_text(outputs)), name)
        return Feedback(value=ok, rationale=f"{'defines' if ok else 'does not define'} {name!r}")

    return [syntax_valid, defines_name_scorer]
