"""The data flow: `dvc repro` (one at a time, retried on a lock), then the `data` stage run in MLflow.

The run's `--set` overrides reach the DVC stages through the `resolve` stage: the config path and the
overrides go into DVC's environment, `resolve` writes params.resolved.yaml, and every other stage reads
that file and declares its params deps on it (components/data/resolve.py says why not `dvc exp run`).
So dvc.lock, and the data hash built from it, name the data really used; after repro the flow checks
that the stages read this run's params.
The run carries the dvc.lock hashes as tags, the Great Expectations results and Data Docs as artifacts,
and the stage statistics (data/reports/*.json) as metrics. A failed suite still logs its results,
marks the run FAILED and stops the lifecycle.
"""
from __future__ import annotations

import json
from pathlib import Path

from prefect import flow, task

from components import tracking
from components.config import Settings
from components.data import dvc, layout, resolve
from components.data.sources import resolve_source


@task(name="dvc-repro", retries=2, retry_delay_seconds=3,
      retry_condition_fn=lambda task, run, state: "locked" in str(state.message or "").lower())
def repro_task(config: str, overrides: list[str]) -> str:
    from components import config as cfg

    settings = cfg.load(config, overrides)
    dvc.ensure_repo(settings)
    output = dvc.repro(settings, overrides=overrides)
    resolve.check_used(settings)
    return output


def _flat_metrics(prefix: str, obj: object, out: dict[str, float]) -> None:
    if isinstance(obj, bool):
        out[prefix] = float(obj)
    elif isinstance(obj, (int, float)):
        out[prefix] = float(obj)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _flat_metrics(f"{prefix}.{k}" if prefix else str(k), v, out)


def log_data_run(settings: Settings) -> dict:
    """Log what the data stage produced (or the failed suite) to the active MLflow run."""
    import mlflow

    mlflow.set_tags(tracking.lineage_tags(settings, "data"))
    stats: dict = {}
    for report in sorted(settings.path("data", "reports").glob("*.json")):  # deterministic stats (DVC metrics)
        stats[report.stem] = json.loads(report.read_text())
        mlflow.log_artifact(str(report), "reports")
    metrics: dict[str, float] = {}
    _flat_metrics("", stats, metrics)
    if metrics:
        mlflow.log_metrics({k.replace("/", "_")[:250]: v for k, v in metrics.items()})
    for suite in ("corpus", "finetune"):
        folder = layout.validation_dir(settings, suite)
        if (folder / "result.json").exists():
            mlflow.log_artifact(str(folder / "result.json"), f"validation/{suite}")
        docs = layout.docs_dir(settings, suite) / "docs"
        if docs.exists():
            mlflow.log_artifacts(str(docs), f"validation/{suite}/data_docs")
    for timing in sorted(settings.path("data", "reports", "timings").glob("*.json")):
        mlflow.log_artifact(str(timing), "reports/timings")
    for used in (layout.resolved_params_path(settings), layout.fingerprint_path(settings, "corpus"),
                 layout.fingerprint_path(settings, "finetune")):
        if used.exists():  # what the stages read: the params after --set, the source fingerprints
            mlflow.log_artifact(str(used), "dvc")
    if (settings.root / "dvc.lock").exists():
        mlflow.log_artifact(str(settings.root / "dvc.lock"), "dvc")
    return stats


@flow(name="data", log_prints=True)
def data_flow(config: str = "params.yaml", overrides: list[str] | None = None) -> dict:
    """dvc repro, then record hashes, validation results and statistics in the `data` run."""
    from components import config as cfg

    overrides = overrides or []
    settings = cfg.load(config, overrides)
    resolve_source(settings)  # a missing source path is a usage error (exit 2), before DVC wraps it
    with tracking.stage_run(settings, "data", params=settings.data.model_dump(mode="json")) as run:
        try:
            output = repro_task(config, overrides)
        finally:
            stats = log_data_run(settings)
        print(output.strip().splitlines()[-1] if output.strip() else "dvc repro: done")
    return {"run_id": run.info.run_id, "stats": stats, "data_hash": tracking.data_hash(Path(settings.root))}
