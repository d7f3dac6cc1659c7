"""End-of-stage reporting shared by the training stages: loss-curve plot and sample-generation table.

The curve is drawn from the metric history MLflow already holds for the run (what the UI shows),
so no stage keeps its own copy of the metrics. Samples are greedy completions of held-out prompts
with the verifiable checks (parses, defines the asked name) next to them. Call inside the stage run.
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


def plot_curves(history: dict[str, list[tuple[int, float]]], path: Path, title: str) -> Path:
    """One line per metric against the step; written to path (PNG)."""
    import matplotlib
    matplotlib.use("Agg")  # headless: training runs on servers and in CI
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for key, points in history.items():
        steps, values = zip(*points)
        ax.plot(steps, values, marker="o" if len(points) < 20 else None, label=key)
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if history:
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def log_loss_curve(run_id: str, keys: Iterable[str], stage: str, out_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Plot the run's logged curves for keys into out_dir/<stage>_loss_curve.png and log it under plots/."""
    import mlflow

    history = metric_history(run_id, keys)
    path = plot_curves(history, out_dir / f"{stage}_loss_curve.png", f"{stage}: training curves")
    mlflow.log_artifact(str(path), artifact_path="plots")
    return history


def sample_rows(model, tokenizer, rows: list[dict[str, Any]], max_new_tokens: int) -> list[dict[str, Any]]:
    """Greedy completions of rows' prompts with the checks the gate uses (parses, defines_name)."""
    from components.data import layout
    from components.data.functions import defines_name, parses
    from components.model.generation import generate

    was_training = model.training
    model.eval()
    try:
        outs = generate(model, tokenizer, [r["prompt"] for r in rows], max_new_tokens=max_new_tokens,
                        temperature=0.0, stop=[layout.END_OF_TURN])
    finally:
        model.train(was_training)
    table = []
    for row, completion in zip(rows, outs):
        name = row.get("name") or ""
        table.append({"prompt": row["prompt"], "completion": completion, "reference": row.get("response", ""),
                      "parses": bool(parses(completion)),
                      "defines_name": bool(name) and bool(defines_name(completion, name))})
    return table


def log_samples(model, tokenizer, rows: list[dict[str, Any]], max_new_tokens: int,
                artifact_file: str = "samples.json") -> list[dict[str, Any]]:
    """Generate, log the table with mlflow.log_table, and log the share that parses as a metric."""
    import mlflow

    table = sample_rows(model, tokenizer, rows, max_new_tokens)
    if table:
        mlflow.log_table({k: [r[k] for r in table] for k in table[0]}, artifact_file=artifact_file)
        mlflow.log_metric("samples_parse_rate", sum(r["parses"] for r in table) / len(table))
    return table
