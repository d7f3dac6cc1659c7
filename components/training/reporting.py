"""End of a training stage, shared by every stage: loss-curve plot, sample table, HF folder, logged model.

The curve is drawn from the metric history MLflow already holds for the run (so a resumed run plots
whole and no stage keeps its own copy). Samples are greedy completions of held-out prompts with the
gate's verifiable checks next to them. Everything here runs inside the stage's active MLflow run.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable


def metric_history(run_id: str, keys: Iterable[str]) -> dict[str, list[tuple[int, float]]]:
    """{key: [(step, value), ...]} for the keys the run logged (missing keys are left out)."""
    import mlflow

    client = mlflow.MlflowClient()
    out = {}
    for key in keys:
        points = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        if points:
            out[key] = points
    return out


def plot_curves(history: dict[str, list[tuple[int, float]]], title: str, ylabel: str = "") -> Any:
    """A matplotlib figure: one line per metric against the step (caller closes it)."""
    import matplotlib
    matplotlib.use("Agg")  # headless: training runs on servers and in CI
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for key, points in history.items():
        steps, values = zip(*points)
        ax.plot(steps, values, marker="." if len(points) < 30 else None, label=key)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if history:
        ax.legend()
    fig.tight_layout()
    return fig


def log_loss_curve(run_id: str, keys: Iterable[str], title: str, ylabel: str = "",
                   artifact_file: str = "plots/loss_curve.png") -> dict[str, list[tuple[int, float]]]:
    """Plot the run's whole logged history of keys (resumed runs plot whole) and log it as a figure."""
    import matplotlib.pyplot as plt
    import mlflow

    history = metric_history(run_id, keys)
    fig = plot_curves(history, title, ylabel)
    mlflow.log_figure(fig, artifact_file)
    plt.close(fig)
    return history


def sample_rows(model, tokenizer, rows: list[dict[str, Any]], max_new_tokens: int) -> list[dict[str, Any]]:
    """Greedy completions of rows' prompts with the checks the gate uses (parses, defines_name).

    Prompts go through the chat template (a fine-tuned model answers an assistant turn); generation
    ends at <|end|> by token id, so no stop string is needed.
    """
    from components.data.tokenizer import format_prompt
    from components.evaluation.scorers import defines_name, extract_code, parses
    from components.model.generation import generate

    was_training = model.training
    model.eval()
    try:
        outs = generate(model, tokenizer, [format_prompt(tokenizer, r["prompt"]) for r in rows],
                        max_new_tokens=max_new_tokens, temperature=0.0)
    finally:
        model.train(was_training)
    table = []
    for row, completion in zip(rows, outs):
        name = row.get("name") or ""
        table.append({"prompt": row["prompt"], "completion": completion, "reference": row.get("response", ""),
                      "parses": parses(extract_code(completion)),
                      "defines_name": bool(name) and defines_name(extract_code(completion), name)})
    return table


def log_samples(model, tokenizer, rows: list[dict[str, Any]], max_new_tokens: int,
                artifact_file: str = "samples/generations.json") -> list[dict[str, Any]]:
    """Generate, log the table with mlflow.log_table, and log the share that parses as a metric."""
    import mlflow

    table = sample_rows(model, tokenizer, rows, max_new_tokens)
    if table:
        mlflow.log_table({k: [r[k] for r in table] for k in table[0]}, artifact_file=artifact_file)
        mlflow.log_metrics({"samples_parse_rate": sum(r["parses"] for r in table) / len(table),
                            "samples_defines_name_rate": sum(r["defines_name"] for r in table) / len(table)})
    return table


def save_hf(model, tokenizer, dst: Path) -> Path:
    """save_pretrained model + tokenizer into dst, replacing it whole (a half-written folder never stays)."""
    import shutil

    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)
    return dst


def finish_stage(run_id: str, hf_dir: Path, model, tokenizer, curve_keys: Iterable[str], title: str,
                 parent_uri: str | None, *, task: str = "text-generation", sample_prompts: list[dict] | None = None,
                 max_new_tokens: int = 64) -> str:
    """End of a training stage inside its run: curve, samples, HF folder, logged model. Returns the model URI."""
    from components import tracking

    model.eval()
    log_loss_curve(run_id, curve_keys, title)
    if sample_prompts:
        log_samples(model, tokenizer, sample_prompts, max_new_tokens)
    save_hf(model, tokenizer, hf_dir)
    return tracking.log_hf_model(model, tokenizer, task=task, name="model", parent_uri=parent_uri)
