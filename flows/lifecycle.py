"""The lifecycle flow: `llmcycle run`. One `lifecycle` MLflow run with a nested run per stage.

scope -> data (dvc repro) -> pretrain -> finetune (sft -> dpo | sft -> reward -> ppo) -> evaluate -> gate.
Stages pass references (paths, run ids, model URIs), never models. A stage that fails fails the flow
(exit 1); a gate that rejects is a decision, not a failure. One lifecycle per project at a time
(data/lifecycle.lock): a second one refuses at once, naming the first.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

from pydantic import BaseModel, Field
from prefect import flow

from components import tracking
from components.config import Settings
from components.errors import BusyError
from components.single_flight import SingleFlightLock, describe
from flows.data import data_flow
from flows.deploy import deploy_flow
from flows.evaluate import evaluate_flow
from flows.scope import scope_task
from flows import artifacts, run_names


class LifecycleParams(BaseModel):
    config: str = Field("params.yaml", description="params.yaml to read")
    overrides: list[str] = Field(default_factory=list, description="dotted.key=value overrides")


@flow(name="lifecycle", log_prints=True, flow_run_name=run_names.lifecycle_name)
def lifecycle(config: str = "params.yaml", overrides: list[str] | None = None) -> dict:
    from components import config as cfg

    params = LifecycleParams(config=config, overrides=overrides or [])
    settings = cfg.load(params.config, params.overrides)
    with lifecycle_lock(settings):
        return _lifecycle(params, settings)


@contextlib.contextmanager
def lifecycle_lock(settings: Settings) -> Iterator[None]:
    """One lifecycle per project at a time: two would race on data/processed, dvc.lock and the gate.
    BusyError (exit 1) names the holder; `llmcycle run` takes it before any flow starts."""
    lock = SingleFlightLock(settings.path("data", "lifecycle.lock"), reentrant=True)
    if not lock.acquire(flow="lifecycle"):
        raise BusyError(f"another lifecycle is running in {settings.root} ({describe(lock.holder)}); "
                        "wait for it to finish (this run started nothing)")
    try:
        yield
    finally:
        lock.release()


def _lifecycle(params: LifecycleParams, settings: Settings) -> dict:
    result: dict = {}
    with tracking.lifecycle_run(settings) as run:
        result["lifecycle_run_id"] = run.info.run_id
        result["scoping"] = scope_task(params.config, params.overrides)
        result["data"] = data_flow(params.config, params.overrides)
        train_params = _with_scoped_steps(params, settings, result["scoping"])
        duplicate = _registered_already(train_params)
        if duplicate is not None:
            # Same clean commit, data and params as a registered version: nothing new to train or gate.
            result["deploy"] = duplicate
            result["lifecycle_run_id"] = run.info.run_id
            result["tracking_uri"] = tracking.tracking_uri(settings)
            return result
        result.update(_training(train_params))
        _log_budget_check(run.info.run_id, result, planned=train_params is not params)
        # The same overrides as training, so the evaluation reads the data the model was trained on.
        ev = evaluate_flow(train_params.config, train_params.overrides, model_uri=result["finetune"]["model_uri"])
        result["evaluate"] = ev
        result["deploy"] = deploy_flow(train_params.config, train_params.overrides, ev["model_uri"],
                                       ev["metrics"], eval_run_id=ev["run_id"])
    result["tracking_uri"] = tracking.tracking_uri(settings)
    artifacts.publish(artifacts.LIFECYCLE, "Lifecycle", *artifacts.lifecycle_body(result))
    return result


def _with_scoped_steps(params: LifecycleParams, settings: Settings, scoping: dict) -> LifecycleParams:
    """With scoping.apply, pretraining trains the tokens scoping planned for the budget (unless --set)."""
    if not settings.scoping.apply or any(o.startswith("pretrain.max_steps=") for o in params.overrides):
        return params
    steps = f"pretrain.max_steps={scoping['pretrain_steps']}"
    return LifecycleParams(config=params.config, overrides=[*params.overrides, steps])


def _log_budget_check(run_id: str, result: dict, planned: bool) -> None:
    """Pretrain wall time against scoping's plan (when the plan set pretrain.max_steps), on the lifecycle run."""
    plan_s = (result.get("scoping") or {}).get("planned_pretrain_seconds")
    wall_s = (result.get("pretrain") or {}).get("wall_s")
    if not (planned and plan_s and wall_s):
        return
    import mlflow

    client = mlflow.MlflowClient()
    for key, value in {"pretrain_wall_seconds": wall_s, "pretrain_planned_seconds": plan_s,
                       "pretrain_wall_over_planned": wall_s / plan_s}.items():
        client.log_metric(run_id, key, value)
    print(f"pretrain: {wall_s:.0f} s of {plan_s:.0f} s planned ({wall_s / plan_s:.2f}x)")


def _registered_already(params: LifecycleParams) -> dict | None:
    """The registered version built from exactly this commit, data and params, gated (again if need be).

    A version registered but never gated (the last run died between register and gate) is gated now;
    one whose decision took effect keeps it (promotion.promote reuses it).
    """
    from components import config as cfg
    from components.evaluation.promotion import find_duplicate

    settings = cfg.load(params.config, params.overrides)
    mv = find_duplicate(settings)
    if mv is None:
        return None
    name = settings.registry.model_name
    print(f"up to date: version {mv.version} was built from this commit, data and params; not retrained")
    result = deploy_flow(params.config, params.overrides, f"models:/{name}/{mv.version}", {},
                         eval_run_id=(mv.tags or {}).get("eval_run_id"))
    if not result.get("reused"):
        print(f"version {mv.version} had no gate decision in effect: gated now ({result['decision']})")
    return result


def _training(params: LifecycleParams) -> dict:
    """Pretrain and fine-tune subflows (flows/train.py); any failure fails the lifecycle."""
    from flows.train import finetune_flow, pretrain_flow

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
    ev = result.get("evaluate")
    if ev:
        m = ev["metrics"]
        nan = float("nan")
        rows.append(("evaluation", f"SFT bits/byte {m.get('sft_bits_per_byte', nan):.3f} vs KN-trigram "
                                   f"{m.get('baseline_kn3_sft_bits_per_byte', nan):.3f}; test bits/byte "
                                   f"{m.get('test_bits_per_byte', nan):.3f} vs "
                                   f"{m.get('baseline_kn3_test_bits_per_byte', nan):.3f}; syntax-valid "
                                   f"{m.get('syntax_valid_rate', nan):.2f}"))
    d = result.get("deploy")
    if d:
        rows += [("gate", f"{d['decision']} v{d['version']}: {d['reason']}"),
                 ("champion", f"models:/{settings.registry.model_name}@champion (v{d['champion']})")]
    rows += [("lifecycle run", result.get("lifecycle_run_id", "")),
             ("MLflow store", result.get("tracking_uri", "")),
             ("look at it", "make ui  (MLflow UI at http://127.0.0.1:5000)")]
    print_table("lifecycle done", rows)
