"""The deploy flow: register the evaluated candidate, gate it against the champion, move the aliases.

One `deploy` MLflow run holds the registration and the decision. A rejecting gate is a decision,
not a failure: the flow completes and returns {"decision": "reject", "reason": ...}. Alias moves
are not retried blindly (a half-applied gate is re-decided by the next run, see promotion.promote).
"""
from __future__ import annotations

from prefect import flow, task

from components import config as cfg
from components import tracking
from flows.evaluate import retry_transient
from flows import run_names


@task(name="register-candidate", retries=2, retry_delay_seconds=5, retry_condition_fn=retry_transient)
def register_task(config: str, overrides: list[str], model_uri: str, metrics: dict[str, float],
                  eval_run_id: str | None = None) -> str:
    from components.evaluation import promotion

    return promotion.register_candidate(cfg.load(config, overrides), model_uri, metrics=metrics,
                                        eval_run_id=eval_run_id)


@task(name="gate")
def gate_task(config: str, overrides: list[str], version: str) -> dict:
    from components.evaluation import promotion

    result = promotion.promote(cfg.load(config, overrides), version)
    return {k: result.get(k) for k in ("decision", "reason", "version", "champion", "previous", "challenger",
                                       "reused", "scored")}


@task(name="notify-server")
def notify_task(config: str, overrides: list[str]) -> dict:
    """Reload the running server, or start one (serving.start_on_promote); see serving.notify.after_promotion."""
    from components.serving.notify import after_promotion

    return after_promotion(cfg.load(config, overrides), config, overrides)


@flow(name="deploy", log_prints=True, flow_run_name=run_names.deploy_name)
def deploy_flow(config: str = "params.yaml", overrides: list[str] | None = None, model_uri: str | None = None,
                eval_metrics: dict[str, float] | None = None, eval_run_id: str | None = None,
                label: str | None = None) -> dict:
    """Register + gate + aliases. Without eval_metrics, the newest evaluate run (of label, or of model_uri
    when given) supplies model URI, metrics and run id.

    Returns {decision, reason, version, champion, previous, challenger, reused, deploy_run_id}, plus, after a
    promotion, server (one line), server_action (reloaded|refused|started|start_failed|none) and server_url.
    """
    from components.errors import ConfigError
    from components.evaluation import promotion

    overrides = overrides or []
    settings = cfg.load(config, overrides)
    if eval_metrics is None:
        latest = promotion.latest_evaluation(settings, label=label, model_uri=model_uri)
        if latest is None:
            which = f" of --label {label}" if label else f" of --model {model_uri}" if model_uri else ""
            raise ConfigError(f"promote: no finished evaluate run{which} in MLflow; run `llmcycle evaluate"
                              f"{' --label ' + label if label else ''}{' --model ' + model_uri if model_uri else ''}` first")
        model_uri = model_uri or latest["model_uri"]
        eval_metrics = eval_metrics if eval_metrics is not None else latest["metrics"]
        eval_run_id = eval_run_id or latest["run_id"]
    with tracking.stage_run(settings, "deploy", tags={"model_uri": model_uri, "eval_run_id": eval_run_id or "none"}
                            ) as run:
        version = register_task(config, overrides, model_uri, eval_metrics, eval_run_id)
        result = gate_task(config, overrides, version)
        if result["decision"] == "promote" and not result.get("reused"):
            # The running server swaps now instead of at its next alias poll (or one starts, if asked).
            server = notify_task(config, overrides)
            result["server"], result["server_action"], result["server_url"] = \
                server["message"], server["action"], server["url"]
            import mlflow
            mlflow.set_tags({"server_reload": server["message"][:250], "server_action": server["action"],
                             "server_url": server["url"]})
            print(server["message"])
    print(f"gate: {result['decision']} {settings.registry.model_name} v{result['version']}"
          f"{' (recorded decision reused)' if result.get('reused') else ''}: {result['reason']}")
    return {**result, "deploy_run_id": run.info.run_id}


@flow(name="rollback", log_prints=True)
def rollback_flow(config: str = "params.yaml", overrides: list[str] | None = None) -> dict:
    """Move champion back to previous; {model, champion}. GateError when there is no previous."""
    from components.evaluation import promotion

    result = promotion.rollback(cfg.load(config, overrides or []))
    print(f"rollback: {result['model']} champion is v{result['champion']} again")
    return result
