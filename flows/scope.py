"""Scoping as a stage run: measure and size (components.scoping), then record it all in MLflow.

`run_scoping` is plain Python (the `llmcycle scope` command calls it); `scope_task` wraps it for flows.
The run logs `planned_pretrain_seconds` (and `budget_seconds`): the lifecycle compares the pretrain
stage's wall time with it. Success criteria are logged generically (`success_<key>` for every number),
so this flow does not depend on which criteria the gate applies.
"""
from __future__ import annotations

import tempfile
from dataclasses import asdict
from pathlib import Path

from prefect import task

from components import scoping, tracking
from components.config import Settings


def report_metrics(report: scoping.ScopingReport) -> dict[str, float]:
    """The report's numbers as MLflow metrics (success criteria: every numeric entry, as success_<key>)."""
    p, c = report.plan, report.costs
    metrics = {
        "matmul_gflops": report.matmul_flops / 1e9, "probe_tokens_per_sec": report.train_tokens_per_sec,
        "probe_mfu": report.achieved_flops / (report.matmul_flops * report.world_size),
        "budget_flops": p["budget_flops"], "n_params": report.n_params, "n_params_plan": p["n_params"],
        "n_tokens": report.tokens_to_train, "n_tokens_plan": p["n_tokens"], "flops": p["flops"],
        "epochs": report.tokens_to_train / max(p["available_tokens"], 1.0),
        "data_limited": float(p["data_limited"]), "pretrain_steps": report.pretrain_steps,
        "planned_pretrain_seconds": report.planned_pretrain_seconds, "probed_shapes": len(report.probes),
        "step_seconds": c.get("step_s", 0.0), "val_batch_seconds": c.get("val_batch_s", 0.0),
        "checkpoint_seconds": c.get("ckpt_s", 0.0), "stage_overhead_seconds": c.get("fixed_s", 0.0),
        "train_memory_gb": report.train_memory_gb, "serving_ms_per_token": report.serving_ms_per_token,
    }
    if report.assumed_tokens_per_sec:
        metrics["assumed_tokens_per_sec"] = report.assumed_tokens_per_sec
        metrics["assumed_pretrain_seconds"] = report.assumed_pretrain_seconds or 0.0
        metrics["measured_over_assumed_speed"] = report.train_tokens_per_sec / report.assumed_tokens_per_sec
    if report.budget_seconds is not None:
        metrics["budget_seconds"] = report.budget_seconds
        metrics["planned_over_budget"] = report.planned_pretrain_seconds / report.budget_seconds
    for key, value in report.success.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            metrics[f"success_{key}"] = float(value)
    return metrics


def run_scoping(settings: Settings, reuse: bool = False) -> scoping.ScopingReport:
    with tracking.stage_run(settings, "scoping", params=settings.scoping.model_dump(mode="json")):
        import mlflow

        report = scoping.run(settings, reuse=reuse)
        mlflow.set_tags({"plan_reused": str(report.reused).lower(), "plan_key": report.plan_key,
                         "accelerator": report.accelerator, "device_name": report.device_name,
                         "precision": report.precision})
        mlflow.log_metrics(report_metrics(report))
        mlflow.log_params({f"chosen.{k}": v for k, v in report.model.items()})
        mlflow.log_dict(asdict(report), "scoping/report.json")
        rows = scoping.summary_rows(report)
        mlflow.log_table({"what": [r[0] for r in rows], "value": [r[1] for r in rows]}, "scoping/summary.json")
        with tempfile.TemporaryDirectory() as tmp:
            mlflow.log_artifact(str(scoping.plot_sizing_curve(report, Path(tmp) / "sizing_curve.png")), "scoping")
    return report


@task(name="scoping", retries=1, retry_delay_seconds=5)
def scope_task(config: str, overrides: list[str]) -> dict:
    from components import config as cfg

    report = run_scoping(cfg.load(config, overrides), reuse=True)
    return {"n_params": report.n_params, "model": report.model, "pretrain_steps": report.pretrain_steps,
            "planned_pretrain_seconds": report.planned_pretrain_seconds, "budget_seconds": report.budget_seconds,
            "rows": scoping.summary_rows(report)}
