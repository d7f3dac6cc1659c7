"""Scoping as a stage run: measure and size (components.scoping), then record it all in MLflow.

`run_scoping` is plain Python (the `llmcycle scope` command calls it); `scope_task` wraps it for flows.
"""
from __future__ import annotations

import tempfile
from dataclasses import asdict
from pathlib import Path

from prefect import task

from components import scoping, tracking
from components.config import Settings


def run_scoping(settings: Settings, reuse: bool = False) -> scoping.ScopingReport:
    with tracking.stage_run(settings, "scoping", params=settings.scoping.model_dump(mode="json")):
        import mlflow

        report = scoping.run(settings, reuse=reuse)
        mlflow.set_tag("plan_reused", str(report.reused).lower())
        mlflow.log_metrics({
            "matmul_gflops": report.matmul_flops / 1e9, "probe_tokens_per_sec": report.train_tokens_per_sec,
            "budget_flops": report.plan["budget_flops"], "n_params": report.n_params,
            "n_params_plan": report.plan["n_params"], "n_tokens": report.plan["n_tokens"],
            "flops": report.plan["flops"], "epochs": report.plan["epochs"],
            "data_limited": float(report.plan["data_limited"]), "pretrain_steps": report.pretrain_steps,
            "train_memory_gb": report.train_memory_gb, "serving_ms_per_token": report.serving_ms_per_token,
            "success_max_val_perplexity": report.success["max_val_perplexity"],
            "success_min_syntax_valid_rate": report.success["min_syntax_valid_rate"],
        })
        mlflow.log_params({f"chosen.{k}": v for k, v in report.model.items()})
        mlflow.log_dict(asdict(report), "scoping/report.json")
        mlflow.log_table({"what": [r[0] for r in scoping.summary_rows(report)],
                          "value": [r[1] for r in scoping.summary_rows(report)]}, "scoping/summary.json")
        with tempfile.TemporaryDirectory() as tmp:
            mlflow.log_artifact(str(scoping.plot_sizing_curve(report, Path(tmp) / "sizing_curve.png")), "scoping")
    return report


@task(name="scoping", retries=1, retry_delay_seconds=5)
def scope_task(config: str, overrides: list[str]) -> dict:
    from components import config as cfg

    report = run_scoping(cfg.load(config, overrides), reuse=True)
    return {"n_params": report.n_params, "model": report.model, "pretrain_steps": report.pretrain_steps,
            "rows": scoping.summary_rows(report)}
