"""Great Expectations gates for the corpus and the SFT/preference sets: result.json + Data Docs, or DataError.

One file-mode GX context per call, rebuilt from scratch in <out_dir>/gx so suites never clash with a
previous run and the docs show this run only; the DataFrame goes in at run time. GX's unexpected lists
are partial, so offending rows are recomputed from the frame (components.data.expectations).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from components.config import Settings, resolve_model_shape
from components.data import layout
from components.data.expectations import Check, corpus_checks, corpus_frame, pairs_checks, pairs_frame
from components.errors import DataError

log = logging.getLogger(__name__)

MAX_OFFENDERS = 5


def validate_corpus(settings: Settings, corpus_path: str | Path | None = None,
                    out_dir: str | Path | None = None) -> dict:
    """Run the "corpus" suite on data/raw/corpus.jsonl. Returns the summary; raises DataError on failure.

    result.json goes to out_dir (default data/validation/corpus, a DVC output); the GX context and
    Data Docs go to out_dir itself when given, else to data/gx/corpus (see layout.docs_dir).
    """
    path = Path(corpus_path) if corpus_path is not None else layout.corpus_path(settings)
    out = Path(out_dir) if out_dir is not None else layout.validation_dir(settings, "corpus")
    work = Path(out_dir) if out_dir is not None else layout.docs_dir(settings, "corpus")
    if not path.is_file():
        raise DataError(f"corpus validation: {path} not found (run `llmcycle data ingest` first)")
    d = settings.data
    checks = corpus_checks(d.min_chars, d.max_chars, d.min_total_chars, d.max_duplicate_share,
                           d.max_non_printable_share)
    suite = _run_suites(work, [("corpus", corpus_frame(path), checks)])[0]
    summary = {**suite, "source": _rel(settings, path), "docs": _rel(settings, work / "docs" / "index.html")}
    out.mkdir(parents=True, exist_ok=True)
    _write_json_atomic(out / "result.json", summary)
    _raise_on_failure("corpus", [suite], out, work)
    return summary


def validate_finetune(settings: Settings, sft_dir: str | Path | None = None,
                      preference_dir: str | Path | None = None, out_dir: str | Path | None = None, *,
                      max_tokens_fn: Callable[[str], int] | None = None) -> dict:
    """Run the "sft" and "preference" suites; one summary holds both. Raises DataError if either fails.

    max_tokens_fn counts the tokens of a text; with it, prompt + answer must fit block_size tokens,
    without it block_size * 6 characters.
    """
    sft = Path(sft_dir) if sft_dir is not None else layout.sft_dir(settings)
    pref = Path(preference_dir) if preference_dir is not None else layout.preference_dir(settings)
    out = Path(out_dir) if out_dir is not None else layout.validation_dir(settings, "finetune")
    work = Path(out_dir) if out_dir is not None else layout.docs_dir(settings, "finetune")
    block = resolve_model_shape(settings)["block_size"]
    in_tokens = max_tokens_fn is not None
    runs = [(kind, pairs_frame(where, kind, max_tokens_fn), pairs_checks(where, kind, block, in_tokens))
            for kind, where in (("sft", sft), ("preference", pref))]
    suites = _run_suites(work, runs)
    if out_dir is None:
        # The datasets stage validates temp dirs before renaming them: record where they land.
        sft, pref = layout.sft_dir(settings), layout.preference_dir(settings)
    sources = {"sft": _rel(settings, sft), "preference": _rel(settings, pref)}
    summary = {
        "suite": "finetune",
        "success": all(s["success"] for s in suites),
        "statistics": _add_statistics([s["statistics"] for s in suites]),
        "suites": {s["suite"]: {**s, "source": sources[s["suite"]]} for s in suites},
        "docs": _rel(settings, work / "docs" / "index.html"),
    }
    out.mkdir(parents=True, exist_ok=True)
    _write_json_atomic(out / "result.json", summary)
    _raise_on_failure("finetune", suites, out, work)
    return summary


# ----------------------------------------------------------------------------- GX
def _import_gx():
    # Analytics would try the network on every run; the flag is read at import time.
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    return gx


def _expectation(gx, check: Check):
    # snake_case type -> GX 1.x class, e.g. expect_column_values_to_be_between -> ExpectColumnValuesToBeBetween
    cls = getattr(gx.expectations, "".join(p.capitalize() for p in check.type.split("_")))
    return cls(**check.kwargs)


def _run_suites(out: Path, runs: list[tuple[str, pd.DataFrame, list[Check]]]) -> list[dict]:
    """Validate each (name, frame, checks) through one checkpoint each in one fresh file context."""
    gx = _import_gx()
    from great_expectations.data_context.types.base import ProgressBarsConfig

    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / "gx", ignore_errors=True)
    context = gx.get_context(mode="file", project_root_dir=str(out))
    context.variables.progress_bars = ProgressBarsConfig(globally=False)  # tqdm bars would flood the logs
    source = context.data_sources.add_pandas("llmcycle")
    summaries = []
    for name, df, checks in runs:
        batch = source.add_dataframe_asset(name).add_batch_definition_whole_dataframe("all")
        suite = context.suites.add(gx.ExpectationSuite(name=name))
        by_id = {suite.add_expectation(_expectation(gx, c)).id: (i, c) for i, c in enumerate(checks)}
        definition = context.validation_definitions.add(gx.ValidationDefinition(name=name, data=batch, suite=suite))
        checkpoint = context.checkpoints.add(gx.Checkpoint(
            name=name, validation_definitions=[definition],
            actions=[gx.checkpoint.UpdateDataDocsAction(name="docs")],
            # Row ids in GX's own results make the Data Docs readable; the lists stay short.
            result_format={"result_format": "SUMMARY", "partial_unexpected_count": MAX_OFFENDERS,
                           "unexpected_index_column_names": ["id"]},
        ))
        result = checkpoint.run(batch_parameters={"dataframe": df})
        (validation,) = result.run_results.values()
        summaries.append(_summarize(name, df, by_id, validation))
    _publish_docs(out)
    return summaries


def _publish_docs(out: Path) -> None:
    """Copy GX's local_site to out/docs so the stable path never shows a half-written site."""
    site = out / "gx" / "uncommitted" / "data_docs" / "local_site"
    tmp, docs = out / "docs.tmp", out / "docs"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(site, tmp)
    shutil.rmtree(docs, ignore_errors=True)
    tmp.rename(docs)


# ----------------------------------------------------------------------------- summaries
def _summarize(name: str, df: pd.DataFrame, by_id: dict[str, tuple[int, Check]], validation) -> dict:
    """The compact per-suite record of result.json (GX's full result stays in gx/uncommitted)."""
    expectations = []
    # GX reorders results; the suite's own order reads better in result.json and messages.
    for res in sorted(validation.results, key=lambda r: by_id[r.expectation_config.id][0]):
        config = res.expectation_config
        check = by_id[config.id][1]
        result = _plain(res.result or {})
        entry = {
            "type": config.type,
            "column": check.column,
            "kwargs": {k: v for k, v in _plain(config.kwargs).items() if k != "batch_id"},
            "success": bool(res.success),
            "observed": result.get("observed_value"),
            "unexpected_count": result.get("unexpected_count"),
            "unexpected_percent": result.get("unexpected_percent"),
            "offending": _offending(df, check),
            "exception": (res.exception_info or {}).get("exception_message")
            if (res.exception_info or {}).get("raised_exception") else None,
        }
        if check.explain is not None:
            entry["detail"] = check.explain(df, result)
        expectations.append(entry)
    return {"suite": name, "success": bool(validation.success), "rows": int(len(df)),
            "statistics": _plain(validation.statistics), "expectations": expectations}


def _offending(df: pd.DataFrame, check: Check) -> list[dict]:
    """Up to MAX_OFFENDERS rows as {id, value}; the id falls back to the row's file:line when missing."""
    if check.offenders is None or df.empty:
        return []
    found = check.offenders(df).head(MAX_OFFENDERS)
    rows = []
    for idx, value in found.items():
        row = df.loc[idx]
        where = f"{row['file']}:{row['line']}" if "file" in row.index else f"line {row['line']}"
        label = row["id"] if isinstance(row["id"], str) else where
        rows.append({"id": label, "value": value})
    return rows


def _plain(obj: Any) -> Any:
    """GX results hold numpy scalars and sets; make them JSON-able."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [_plain(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalar
        return obj.item()
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)


def _add_statistics(stats: list[dict]) -> dict:
    evaluated = sum(s["evaluated_expectations"] for s in stats)
    ok = sum(s["successful_expectations"] for s in stats)
    return {"evaluated_expectations": evaluated, "successful_expectations": ok,
            "unsuccessful_expectations": evaluated - ok,
            "success_percent": 100.0 * ok / evaluated if evaluated else None}


def _bounds(kwargs: dict) -> str:
    lo, hi = kwargs.get("min_value"), kwargs.get("max_value")
    fmt = lambda v: f"{v:g}" if isinstance(v, float) else str(v)  # noqa: E731 - 32.0 reads as 32
    parts = [kwargs["column"]] if kwargs.get("column") else []
    if lo is not None and hi is not None:
        parts.append(f"{fmt(lo)}..{fmt(hi)}")
    elif lo is not None:
        parts.append(f">={fmt(lo)}")
    elif hi is not None:
        parts.append(f"<={fmt(hi)}")
    if "value_set" in kwargs:
        parts.append("{" + ",".join(str(v) for v in kwargs["value_set"]) + "}")
    if kwargs.get("mostly") is not None and kwargs["mostly"] < 1:
        parts.append(f"mostly={kwargs['mostly']:g}")
    return ", ".join(parts)


def failure_line(entry: dict) -> str:
    """One line for a failed expectation, e.g. `expect_...(length, 32..400000): 3 rows, e.g. id=a.py (12 chars)`."""
    head = f"{entry['type']}({_bounds(entry['kwargs'])})"
    if entry.get("exception"):
        return f"{head}: raised {entry['exception']}"
    if entry.get("detail"):
        return f"{head}: {entry['detail']}"
    examples = ", ".join(f"id={o['id']} ({o['value']})" for o in entry["offending"])
    count = entry.get("unexpected_count")
    return f"{head}: {count} row{'s' * (count != 1)}" + (f", e.g. {examples}" if examples else "")


def _raise_on_failure(what: str, suites: list[dict], out: Path, work: Path) -> None:
    failed = [(s["suite"], e) for s in suites for e in s["expectations"] if not e["success"]]
    if not failed:
        return
    total = sum(len(s["expectations"]) for s in suites)
    prefix = (lambda name: f"{name}: ") if len(suites) > 1 else (lambda name: "")
    lines = [f"{what} validation failed ({len(failed)} of {total} expectations):"]
    lines += [f"  {prefix(name)}{failure_line(e)}" for name, e in failed]
    lines.append(f"  details: {out / 'result.json'}, {work / 'docs' / 'index.html'}")
    raise DataError("\n".join(lines))


def _rel(settings: Settings, path: Path) -> str:
    # Paths under the project root are stored relative so result.json reads the same in every checkout.
    try:
        return str(Path(path).resolve().relative_to(settings.root.resolve()))
    except ValueError:
        return str(path)


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)
