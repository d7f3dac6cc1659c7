"""Documented Python functions as SFT pairs and preference pairs (chosen = real, rejected = corrupted).

Extraction uses `ast`: top-level and class-level functions with a docstring (dunder methods are
skipped: "write a function `__repr__(self)`" is not a standalone task). Corruptions are
deterministic per function id and seed: `truncated` (cut until it no longer parses), `other_body`
(this signature + docstring over another function's body, which still parses: a hard negative),
`shuffled` (body statements reordered). The verifiable scores live in components/evaluation/scorers.py.
"""
from __future__ import annotations

import ast
import random
import re
from dataclasses import dataclass

KINDS = ("truncated", "other_body", "shuffled")
_SENTENCE = re.compile(r"^(.+?[.!?])(?:\s|$)")


@dataclass(frozen=True)
class Function:
    id: str          # "<doc_id>::<qualname>" (a "#2" suffix on a repeated qualname, e.g. property setters)
    doc_id: str
    name: str
    qualname: str
    signature: str   # name(args) as written (annotations and defaults kept, return annotation dropped)
    summary: str     # first sentence of the docstring, first letter lower-cased
    source: str      # the function from `def` to its last statement, dedented to column 0

    @property
    def prompt(self) -> str:
        return sft_prompt(self.signature, self.summary)


def is_valid_python(code: str) -> bool:
    """Does `code` parse as Python, exactly as written? (Building corruptions; completions are judged by
    components.evaluation.scorers.parses, which also asks for a function definition.)"""
    try:
        ast.parse(code)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    return True


def sft_prompt(signature: str, summary: str) -> str:
    return f"Write a Python function `{signature}` that {summary}"


def summarize(docstring: str) -> str:
    """First sentence of the first paragraph, on one line, first letter lower-cased (not acronyms)."""
    para = docstring.strip().split("\n\n", 1)[0]
    text = " ".join(line.strip() for line in para.splitlines() if line.strip())
    m = _SENTENCE.match(text)
    text = m.group(1) if m else text
    if text and not (len(text) > 1 and text[1].isupper()):
        text = text[0].lower() + text[1:]
    return text


def _dedent_node(lines: list[str], node: ast.AST) -> str | None:
    """The node's source lines with its own indentation removed (lines inside multi-line strings that
    sit further left are kept as they are, so string contents do not change)."""
    first = lines[node.lineno - 1]
    prefix = first[: node.col_offset]
    if prefix.strip():
        return None          # something else precedes `def` on its line (e.g. `class A: def f...`)
    out = []
    for line in lines[node.lineno - 1: node.end_lineno]:
        if line.startswith(prefix):
            out.append(line[len(prefix):])
        else:
            out.append(line if line.strip() else "\n")
    return "".join(out).rstrip()


def extract_functions(source: str, doc_id: str = "") -> list[Function]:
    """Documented top-level and class-level functions of a module; [] when it does not parse."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return []
    defs = (ast.FunctionDef, ast.AsyncFunctionDef)
    found: list[tuple[ast.AST, str]] = []
    for node in tree.body:
        if isinstance(node, defs):
            found.append((node, node.name))
        elif isinstance(node, ast.ClassDef):
            found += [(sub, f"{node.name}.{sub.name}") for sub in node.body if isinstance(sub, defs)]
    lines = source.splitlines(keepends=True)
    out: list[Function] = []
    used: dict[str, int] = {}
    for node, qualname in found:
        if node.name.startswith("__") and node.name.endswith("__"):
            continue
        doc = ast.get_docstring(node)
        summary = summarize(doc) if doc else ""
        # "error(message: string)"-style docstrings restate the signature: no task to describe.
        if not summary or summary.startswith(node.name + "("):
            continue
        text = _dedent_node(lines, node)
        if text is None or not is_valid_python(text):
            continue
        used[qualname] = used.get(qualname, 0) + 1
        suffix = f"#{used[qualname]}" if used[qualname] > 1 else ""
        out.append(Function(id=f"{doc_id}::{qualname}{suffix}", doc_id=doc_id, name=node.name, qualname=qualname,
                            signature=f"{node.name}({ast.unparse(node.args)})", summary=summary, source=text))
    return out


# ----------------------------------------------------------------------------- corruptions
def _start_line(stmt: ast.stmt) -> int:
    # A decorated nested def starts at its first decorator, not at `def`.
    decorators = getattr(stmt, "decorator_list", None) or []
    return min([stmt.lineno] + [d.lineno for d in decorators])


def _parts(source: str) -> tuple[list[str], ast.AST] | None:
    try:
        node = ast.parse(source).body[0]
    except (SyntaxError, ValueError, RecursionError, MemoryError, IndexError):
        return None
    return source.splitlines(keepends=True), node


def _body(source: str) -> tuple[str, list[str], str] | None:
    """(head, statement chunks, indent): head is `def` + docstring, chunks are the other body
    statements (each with any comments/blank lines that follow it). None for one-liners."""
    parts = _parts(source)
    if parts is None:
        return None
    lines, node = parts
    body = node.body
    start = 1 if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
        and isinstance(body[0].value.value, str) else 0
    rest = body[start:]
    if not rest or body[0].lineno == node.lineno:
        return None
    starts = [_start_line(s) - 1 for s in rest] + [len(lines)]
    head = "".join(lines[: starts[0]])
    chunks = ["".join(lines[starts[i]: starts[i + 1]]) for i in range(len(rest))]
    chunks = [c if c.endswith("\n") else c + "\n" for c in chunks]
    indent = re.match(r"[ \t]*", lines[body[0].lineno - 1]).group(0)
    return head, chunks, indent


def truncated(source: str, rng: random.Random) -> str:
    """Cut the function part-way through its code (after the docstring when there is code after it,
    30-90% of the way) so that it no longer parses."""
    parts = _parts(source)
    if parts is None:
        return source[: max(1, len(source) // 2)]
    lines, node = parts
    split = _body(source)
    code_start = len(split[0]) if split else len("".join(lines[: node.body[0].lineno - 1]))
    span = len(source) - code_start
    lo = code_start + max(1, int(span * 0.3))
    hi = max(lo, code_start + int(span * 0.9))
    for _ in range(20):
        cut = source[: rng.randint(lo, hi)].rstrip()
        if cut and cut != source and not is_valid_python(cut):
            return cut
    # The signature alone never parses ("expected an indented block"): a guaranteed fallback.
    head = "".join(lines[: node.body[0].lineno - 1]).rstrip()
    return head or source.split("\n", 1)[0].rstrip()


def other_body(fn: Function, pool: list[Function], rng: random.Random) -> str | None:
    """This function's signature and docstring over the body of another function from `pool`."""
    mine = _body(fn.source)
    if mine is None:
        return None
    head, chunks, indent = mine
    own = "".join(chunks)
    # A few random candidates (rng.sample on a range is O(k), a full shuffle would be O(len(pool))).
    for i in rng.sample(range(len(pool)), min(20, len(pool))):
        other = pool[i]
        if other.id == fn.id or other.source == fn.source:
            continue
        theirs = _body(other.source)
        if theirs is None or "".join(theirs[1]) == own:
            continue
        _, their_chunks, their_indent = theirs
        lines = "".join(their_chunks).splitlines(keepends=True)
        moved = "".join(indent + line[len(their_indent):] if line.startswith(their_indent) and line.strip()
                        else line for line in lines)
        code = (head + moved).rstrip()
        if code != fn.source and is_valid_python(code):
            return code
    return None


def shuffled(source: str, rng: random.Random) -> str | None:
    """The body statements (docstring kept first) in a different order; None when nothing can move."""
    parts = _body(source)
    if parts is None:
        return None
    head, chunks, _ = parts
    if len(set(chunks)) < 2:
        return None
    original = "".join(chunks)
    for _ in range(10):
        order = chunks[:]
        rng.shuffle(order)
        if "".join(order) != original:
            code = (head + "".join(order)).rstrip()
            return code if is_valid_python(code) else None
    order = chunks[1:] + chunks[:1]     # rotation: differs because at least two chunks differ
    code = (head + "".join(order)).rstrip()
    return code if code != source and is_valid_python(code) else None


def corrupt(fn: Function, kind: str, pool: list[Function], rng: random.Random) -> str | None:
    if kind == "truncated":
        return truncated(fn.source, rng)
    if kind == "other_body":
        return other_body(fn, pool, rng)
    if kind == "shuffled":
        return shuffled(fn.source, rng)
    raise ValueError(f"unknown corruption kind {kind!r}; expected one of {KINDS}")


def make_pairs(functions: list[Function], seed: int) -> tuple[list[dict], list[dict]]:
    """SFT rows and preference rows for a set of functions (one split: `other_body` borrows only
    from this same list, so no other split's code leaks in). Deterministic given seed and ids."""
    sft: list[dict] = []
    pref: list[dict] = []
    for fn in functions:
        prompt = fn.prompt
        base = {"id": fn.id, "doc_id": fn.doc_id, "name": fn.name, "prompt": prompt}
        sft.append({**base, "response": fn.source})
        # A string seed is hashed with sha512 by random.Random: stable across processes and runs.
        rng = random.Random(f"{seed}:{fn.id}")
        first = rng.randrange(len(KINDS))
        for k in range(len(KINDS)):
            kind = KINDS[(first + k) % len(KINDS)]
            rejected = corrupt(fn, kind, functions, rng)
            if rejected is not None and rejected != fn.source:
                pref.append({**base, "chosen": fn.source, "rejected": rejected, "kind": kind})
                break
    return sft, pref
