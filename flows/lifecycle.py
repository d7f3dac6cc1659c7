"""The lifecycle flow: `llmcycle run`. One `lifecycle` MLflow run with a nested run per stage.

scope -> data (dvc repro) -> pretrain -> finetune (sft -> dpo | sft -> reward -> ppo) -> evaluate -> gate.
Stages pass references (paths, run ids, model URIs), never models. A stage that fails fails the flow
(exit 1); a gate that rejects is a decision, not a failure.
"""
from __future__ import annotations

from pydantic import BaseModel, Field
from prefect import flow

from components import tracking
from components.config import Settings
from flows.data import data_flow
from flows.scope import scope_task


class LifecycleParams(BaseModel):
    config: str = Field("params.yaml", description="params.yaml to read")
    overrides: list[str] = Field(default_factory=list, description="dotted.key=value overrides")


@flow(name="lifecycle", log_prints=True)
def lifecycle(config: str = "params.yaml", overrides: list[str] | None = None) -> dict:
    from components import config as cfg

    params = LifecycleParams(config=config, overrides=overrides or [])
    settings = cfg.load(params.config, params.overrides)
    result: dict = {}
    with tracking.lifecycle_run(settings) as run:
        result["lifecycle_run_id"] = run.info.run_id
        result["scoping"] = scope_task(params.config, params.overrides)
        result["data"] = data_flow(params.config, params.overrides)
        result.update(_training(params))
    result["tracking_uri"] = tracking.tracking_uri(settings)
    return result


def _training(params: LifecycleParams) -> dict:
    """Pretrain and fine-tune subflows (flows/train.py), when the training stages are installed."""
    try:
        from flows.train import finetune_flow, pretrain_flow
    except ImportError:  # the training stages are not part of this build yet
        return {}
    out = {"pretrain": pretrain_flow(params.config, params.overrides)}
    out["finetune"] = finetune_flow(params.config, params.overrides)
    return out


def print_summary(settings: Settings, result: dict) -> None:
    """Where to look after `llmcycle run`: the scoping table, data figures, models and the UI command."""
    from flows.cli import print_table

    scoping = result.get("scoping") or {}
    if scoping.get("rows"):
        print_table("scoping report", [tuple(r) for r in scoping["rows"]])
    stats = (result.get("data") or {}).get("stats") or {}
    rows = []
    if "ingest" in stats:
        rows.append(("documents", f"{stats['ingest'].get('documents')} ({stats['ingest'].get('chars')} chars)"))
    if "datasets" in stats:
        d = stats["datasets"]
        rows += [("tokens", str(d.get("tokens"))), ("SFT pairs", str(d.get("sft"))),
                 ("preference pairs", str(d.get("preference")))]
    rows.append(("data hash (dvc.lock)", (result.get("data") or {}).get("data_hash", "")))
    for stage in ("pretrain", "finetune"):
        if stage in result:
            rows.append((f"{stage} model", str(result[stage].get("model_uri", ""))))
    rows += [("lifecycle run", result.get("lifecycle_run_id", "")),
             ("MLflow store", result.get("tracking_uri", "")),
             ("look at it", "make ui  (MLflow UI at http://127.0.0.1:5000)")]
    print_table("lifecycle done", rows)
