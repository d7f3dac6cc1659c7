"""What the evaluation stage shows in MLflow: the completions table and the plots (matplotlib Agg).

The table goes in twice: through mlflow.genai.evaluate with the code scorers (per-row verdicts in
the GenAI UI) and through mlflow.log_table (a plain artifact that survives GenAI API changes).
Plots: loss curves of the lifecycle's training runs, champion vs candidate bars, attention heads.
Call everything inside the active evaluate run; a missing input skips its plot, never the stage.
"""
from __future__ import annotations

import copy
import logging
import math
import os
from typing import Any

from components import tracking
from components.config import Settings

log = logging.getLogger(__name__)

TRAINING_STAGES = ("pretrain", "sft", "reward", "dpo", "ppo")
# Metrics drawn in the champion-vs-candidate bars (those present on both sides).
BAR_METRICS = ("sft_bits_per_byte", "test_bits_per_byte", "baseline_kn3_sft_bits_per_byte", "syntax_valid_rate",
               "defines_name_rate", "test_perplexity",
               "pass_at_1", "dpo_reward_accuracy", "mean_reward", "generation_ms_per_token")
ATTENTION_HEADS = 4
ATTENTION_TOKENS = 32


def _plt() -> Any:
    import matplotlib
    matplotlib.use("Agg")  # headless: evaluation runs on servers and in CI
    import matplotlib.pyplot as plt
    return plt


# ----------------------------------------------------------------------------- table
def log_completions(table: list[dict[str, Any]]) -> None:
    """Log (prompt, name, completion, syntax_valid, defines_name) rows to the active run, twice."""
    import mlflow
    import pandas as pd

    from components.evaluation.scorers import mlflow_scorers

    if not table:
        return
    mlflow.log_table(pd.DataFrame(table), artifact_file="evaluation/completions.json")
    data = pd.DataFrame({"inputs": [{"prompt": r["prompt"], "name": r["name"]} for r in table],
                         "outputs": [r["completion"] for r in table]})
    # The harness's default thread pools write traces faster than a SQLite store's SQLAlchemy pool
    # (5 + 10 connections) serves them: `make run` saw "QueuePool limit ... reached", a 30 s stall and
    # lost traces. Two workers keep up with these code scorers on a small machine; a user's setting wins.
    workers_unset = "MLFLOW_GENAI_EVAL_MAX_WORKERS" not in os.environ
    if workers_unset:
        os.environ["MLFLOW_GENAI_EVAL_MAX_WORKERS"] = "2"
    try:
        mlflow.genai.evaluate(data=data, scorers=mlflow_scorers())
    except Exception as exc:  # noqa: BLE001 - the log_table copy above already holds the same rows
        log.warning("mlflow.genai.evaluate failed (%s); the table is still in evaluation/completions.json", exc)
        mlflow.set_tag("genai_evaluate_error", str(exc).splitlines()[0][:500] if str(exc) else type(exc).__name__)
    finally:
        if workers_unset:
            os.environ.pop("MLFLOW_GENAI_EVAL_MAX_WORKERS", None)


# ----------------------------------------------------------------------------- plots
def log_plots(settings: Settings, run_id: str, model: Any, tokenizer: Any, prompt: str,
              metrics: dict[str, float], label: str) -> list[str]:
    """Draw and log every plot whose inputs exist; returns the artifact paths logged under plots/."""
    import mlflow

    plt = _plt()
    logged = []
    for name, draw in (("lifecycle_losses.png", lambda: lifecycle_losses(settings, run_id)),
                       ("champion_vs_candidate.png", lambda: champion_bars(settings, metrics, label)),
                       ("attention.png", lambda: attention_heatmap(model, tokenizer, prompt))):
        fig = draw()
        if fig is None:
            continue
        mlflow.log_figure(fig, f"plots/{name}")
        plt.close(fig)
        logged.append(f"plots/{name}")
    return logged


def training_runs(settings: Settings, run_id: str) -> dict[str, Any]:
    """{stage: run} of the training runs beside this run under its lifecycle parent.

    Without a parent (a stand-alone `llmcycle evaluate`), the latest run of each stage stands in.
    """
    import mlflow

    client = mlflow.MlflowClient()
    parent = client.get_run(run_id).data.tags.get("mlflow.parentRunId")
    found: dict[str, Any] = {}
    if parent:
        for run in tracking.child_runs(settings, parent):
            name = run.info.run_name
            if name in TRAINING_STAGES and name not in found:  # child_runs is newest first
                found[name] = run
        return found
    for stage in TRAINING_STAGES:
        runs = mlflow.search_runs(experiment_names=[tracking.EXPERIMENT], output_format="list", max_results=1,
                                  filter_string=f"attributes.run_name = '{stage}'", order_by=["start_time DESC"])
        if runs:
            found[stage] = runs[0]
    return found


def lifecycle_losses(settings: Settings, run_id: str) -> Any | None:
    """One panel per training stage with every *loss* curve it logged (train and val)."""
    import mlflow

    client = mlflow.MlflowClient()
    curves: dict[str, dict[str, list]] = {}
    for stage, run in training_runs(settings, run_id).items():
        keys = [k for k in run.data.metrics if "loss" in k and not k.startswith("final")]
        hist = {k: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, k)) for k in keys}
        hist = {k: v for k, v in hist.items() if v}
        if hist:
            curves[stage] = hist
    if not curves:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(curves), figsize=(4 * len(curves), 3.5), squeeze=False)
    for ax, stage in zip(axes[0], [s for s in TRAINING_STAGES if s in curves]):
        for key, points in sorted(curves[stage].items()):
            steps, values = zip(*points)
            ax.plot(steps, values, marker="o" if len(points) < 20 else None, label=key)
        ax.set_title(stage)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("training losses across the lifecycle")
    fig.tight_layout()
    return fig


def champion_bars(settings: Settings, metrics: dict[str, float], label: str) -> Any | None:
    """Candidate vs the registered champion (its metric.* version tags), one small panel per metric."""
    from components.evaluation.gate import CHAMPION
    from components.evaluation.promotion import version_metrics

    if label == CHAMPION:
        return None
    champ = tracking.get_alias_version(settings, settings.registry.model_name, CHAMPION)
    champ_metrics = version_metrics(champ) if champ is not None else {}
    shared = [m for m in BAR_METRICS if m in metrics and m in champ_metrics
              and math.isfinite(metrics[m]) and math.isfinite(champ_metrics[m])]
    if not shared:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(shared), figsize=(2.6 * len(shared), 3.2), squeeze=False)
    for ax, m in zip(axes[0], shared):
        values = [champ_metrics[m], metrics[m]]
        ax.bar([f"champion v{champ.version}", label], values, color=["#888888", "#1f77b4"])
        ax.set_title(m, fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
        for i, v in enumerate(values):
            ax.annotate(f"{v:.3g}", (i, v), ha="center", va="bottom", fontsize=7)
    fig.suptitle("champion vs candidate")
    fig.tight_layout()
    return fig


def attention_heatmap(model: Any, tokenizer: Any, prompt: str) -> Any | None:
    """Attention of the last layer's first heads over a sample prompt's last tokens.

    sdpa does not return attention weights, so an eager copy (on the CPU) draws this plot only;
    the served and evaluated model keeps its fast kernel.
    """
    import torch

    ids = tokenizer.encode(prompt, add_special_tokens=False)[-ATTENTION_TOKENS:]
    if len(ids) < 2:
        return None
    eager = copy.deepcopy(model).to("cpu").eval()
    eager.set_attn_implementation("eager")
    with torch.inference_mode():
        att = eager(input_ids=torch.tensor([ids]), output_attentions=True).attentions[-1][0]  # (H, T, T)
    del eager
    labels = [tokenizer.decode([i]).replace("\n", "\\n")[:8] for i in ids]
    heads = min(ATTENTION_HEADS, att.shape[0])
    plt = _plt()
    fig, axes = plt.subplots(1, heads, figsize=(4.2 * heads, 4.4), squeeze=False)
    for h, ax in enumerate(axes[0]):
        ax.imshow(att[h].float().numpy(), cmap="viridis", vmin=0.0)
        ax.set_title(f"last layer, head {h}", fontsize=9)
        ax.set_xticks(range(len(ids)), labels, rotation=90, fontsize=5)
        ax.set_yticks(range(len(ids)), labels, fontsize=5)
    fig.suptitle("attention (query rows, key columns)")
    fig.tight_layout()
    return fig

