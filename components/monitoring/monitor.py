"""One drift check: the newest request window against the champion's reference, recorded as a `monitor` run.

Reads the window, describes its distinct prompts under the champion (the model the server serves),
loads or builds the cached reference, runs the Evidently report and logs everything to MLflow: the
decision, drift_share, per-column scores, the HTML report, and the window's exact records
(`window/requests.jsonl`, what the retrain flow builds data from). Alerts are the flow's job.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from components import tracking
from components.config import Settings
from components.errors import ConfigError
from components.monitoring import descriptors as D
from components.monitoring import drift, reference
from components.monitoring.window import Window, read_window, unique_prompts

CHAMPION = "champion"


def champion(settings: Settings) -> str:
    """The champion's version; ConfigError when there is none yet (nothing is served to monitor)."""
    name = settings.registry.model_name
    mv = tracking.get_alias_version(settings, name, CHAMPION)
    if mv is None:
        raise ConfigError(f"monitor: {name}@{CHAMPION} does not exist in {tracking.tracking_uri(settings)}; "
                          "promote a model first (`llmcycle run` or `llmcycle promote`)")
    return str(mv.version)


def current_window(settings: Settings, window: int | None) -> Window:
    m = settings.monitoring
    folder = settings.path(settings.serving.log_dir)
    if window is None and m.window_minutes is not None:
        return read_window(folder, minutes=m.window_minutes)
    return read_window(folder, n=window or m.window)


def describe_window(win: Window, model: Any, tokenizer: Any, stats: D.TokenStats, embeddings: bool) -> list[dict]:
    """Descriptor rows of the window's distinct user prompts (first record of each)."""
    recs = win.records
    keep = [recs[i] for i in unique_prompts(recs, lambda r: D.user_text(r["prompt"]))]
    return D.describe(model, tokenizer, stats, [D.user_text(r["prompt"]) for r in keep], [r["completion"] for r in keep],
                      mean_logprobs=[r.get("mean_logprob") for r in keep], latencies=[r.get("latency_s") for r in keep],
                      with_embeddings=embeddings)


def description(name: str, version: str, result: drift.DriftResult, win: Window, ref_file: str) -> str:
    """Markdown shown on the run's page in the MLflow UI."""
    cols = ", ".join(f"`{c}`" for c in result.drifted_columns) or "none"
    share = "n/a" if result.drift_share is None else f"{result.drift_share:.2f}"
    w = win.meta()
    return (f"**Monitor: {result.decision}** for [{name} v{version}](#/models/{name}/versions/{version}).\n\n"
            f"{result.reason}.\n\n- window: {w['n']} requests ({result.n_current} distinct prompts), "
            f"{w['start']} .. {w['end']} (artifact `{tracking.WINDOW_ARTIFACT}`)\n- drift share: {share}; "
            f"drifted columns: {cols}\n- reference: {result.n_reference} held-out prompts (`{ref_file}`)\n"
            f"- report: `drift/report.html`")


def run(settings: Settings, window: int | None = None) -> dict[str, Any]:
    """Judge the newest window; returns the flow's result (without event_id)."""
    from components.model.build import load_causal_lm

    m = settings.monitoring
    name = settings.registry.model_name
    version = champion(settings)
    win = current_window(settings, window)     # before the model loads: a bad log fails fast
    model, tokenizer = load_causal_lm(settings, f"models:/{name}/{version}")
    model.eval()
    stats = D.TokenStats.for_tokenizer(settings, tokenizer, m.rare_token_coverage)
    current = describe_window(win, model, tokenizer, stats, m.embeddings)
    if len(current) < m.min_window:
        ref_rows, ref_path, built = [], reference.reference_path(settings, name, version), False
    else:
        ref_rows, ref_path, built = reference.load_or_build(settings, name, version, model, tokenizer, stats)
    result = drift.compare(ref_rows, current, m)
    w = win.meta()
    tags = {"decision": result.decision, "decision_reason": result.reason, "model_name": name,
            "model_version": version, "window_start": w["start"], "window_end": w["end"], "window_n": w["n"],
            "window_files": ",".join(p.name for p in win.files), "reference_file": ref_path.name,
            "reference_built": str(built).lower(), "rare_tokens_from": stats.source,
            "mlflow.note.content": description(name, version, result, win, ref_path.name)}
    metrics = {"drift_detected": float(result.decision == drift.DRIFT), "n_current": result.n_current,
               "n_reference": result.n_reference, "window_n": w["n"],
               "insufficient_data": float(result.decision == drift.INSUFFICIENT), "drift_share": result.drift_share}
    for col, s in result.scores.items():
        metrics[f"score_{col}"] = s["score"]
        metrics[f"drifted_{col}"] = float(s["drifted"])
    params = {"window": window or m.window, "window_minutes": m.window_minutes, "min_window": m.min_window,
              "drift_share_threshold": m.drift_share_threshold, "drift_columns": m.drift_columns,
              "text_threshold": m.text_threshold, "embeddings": m.embeddings}
    with tracking.stage_run(settings, "monitor", params=params, tags={"model_version": version}) as mlrun, \
            tempfile.TemporaryDirectory() as tmp:
        window_file = Path(tmp) / "requests.jsonl"
        window_file.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in win.records))
        files = {"window": window_file}
        html = result.save_html(Path(tmp) / "report.html")
        if html:
            files["drift"] = html
        summary = {**result.summary(), "model_version": version, "window": w}
        texts = {"drift/decision.json": json.dumps(summary, indent=2, default=str),
                 "window/descriptors.jsonl": "".join(json.dumps(r, default=str) + "\n" for r in current)}
        tracking.log_outputs(metrics=metrics, tags=tags, files=files, texts=texts)
    return {"decision": result.decision, "reason": result.reason, "monitor_run_id": mlrun.info.run_id,
            "drift_share": result.drift_share, "drifted_columns": result.drifted_columns,
            "n_current": result.n_current, "model_version": version, "window": w}
