"""Training flows: pretrain, then fine-tune (sft -> dpo, or sft -> reward -> ppo per finetune.method).

Each task runs one stage (components.training) and returns references: run id, model URI, metrics.
Stages hand models on through checkpoints/<stage>/hf, so a task never carries a model object.
"""
from __future__ import annotations

from prefect import flow, task

from components import config as cfg
from components.training.stages import finetune_stages


@task(name="train-stage", task_run_name="{stage}")
def stage_task(stage: str, config: str, overrides: list[str], resume: bool = False) -> dict:
    from components.training.stages import run_stage

    result = run_stage(cfg.load(config, overrides), stage, resume=resume)
    return {k: result.get(k) for k in ("run_id", "model_uri", "metrics", "wall_s")}


@flow(name="pretrain", log_prints=True)
def pretrain_flow(config: str = "params.yaml", overrides: list[str] | None = None, resume: bool = False) -> dict:
    result = stage_task("pretrain", config, overrides or [], resume)
    print(f"pretrain: {result['model_uri']} in {result['wall_s']:.0f} s")
    return result


@flow(name="finetune", log_prints=True)
def finetune_flow(config: str = "params.yaml", overrides: list[str] | None = None) -> dict:
    settings = cfg.load(config, overrides or [])
    results: dict[str, dict] = {}
    for stage in finetune_stages(settings.finetune.method):
        results[stage] = stage_task(stage, config, overrides or [])
        print(f"{stage}: {results[stage]['model_uri']} in {results[stage]['wall_s']:.0f} s")
    final = results[finetune_stages(settings.finetune.method)[-1]]
    return {"stages": results, "model_uri": final["model_uri"], "run_id": final["run_id"]}
