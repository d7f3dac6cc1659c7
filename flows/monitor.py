"""The monitor flow: judge the newest request window for drift; on drift, raise the alarm.

A thin flow over components/monitoring/monitor.run (one `monitor` MLflow run). On drift it emits the
Prefect event `llmcycle.drift.detected` (the retrain deployment's trigger), logs an alert line and
POSTs monitoring.webhook_url when set; what the alert did is tagged on the monitor run. Every decision
(drift, no_drift, insufficient_data) is a completed flow: only a broken log, config or store fails it.
"""
from __future__ import annotations

from prefect import flow, get_run_logger, task

from components import config as cfg
from flows import run_names


@task(name="judge-window")
def judge_task(config: str, overrides: list[str], window: int | None) -> dict:
    from components.monitoring import monitor

    return monitor.run(cfg.load(config, overrides), window)


@task(name="drift-alert")
def alert_task(config: str, overrides: list[str], result: dict) -> str | None:
    """Event + alert line + webhook; returns the event id (None when no event could be emitted)."""
    from prefect.events import emit_event

    from components import tracking
    from components.monitoring import alerts

    settings = cfg.load(config, overrides)
    name = settings.registry.model_name
    body = alerts.payload(result["window"], result["drift_share"], result["drifted_columns"],
                          result["monitor_run_id"], result["model_version"])
    event = emit_event(alerts.EVENT, resource=alerts.resource(name, result["model_version"]), payload=body,
                       related=[{"prefect.resource.id": f"mlflow.run.{result['monitor_run_id']}",
                                 "prefect.resource.role": "monitor-run"}])
    logger = get_run_logger()
    logger.warning(alerts.alert_line(name, body))
    tags = {"alert_event": alerts.EVENT, "alert_event_id": str(event.id) if event else "not emitted"}
    if settings.monitoring.webhook_url:
        tags["alert_webhook"] = alerts.post_webhook(settings.monitoring.webhook_url, body,
                                                    settings.monitoring.webhook_timeout_s)
        logger.info(f"drift webhook: {tags['alert_webhook']}")
    tracking.set_run_tags(settings, result["monitor_run_id"], tags)
    return str(event.id) if event else None


@flow(name="monitor", log_prints=True, flow_run_name=run_names.monitor_name)
def monitor_flow(config: str = "params.yaml", overrides: list[str] | None = None, window: int | None = None) -> dict:
    """Returns {decision: drift|no_drift|insufficient_data, reason, monitor_run_id, drift_share, drifted_columns,
    n_current, model_version, window: {start, end, n}, event_id}."""
    overrides = overrides or []
    result = judge_task(config, overrides, window)
    result["event_id"] = alert_task(config, overrides, result) if result["decision"] == "drift" else None
    print(f"monitor: {result['decision']} ({result['reason']}); run {result['monitor_run_id']}")
    return result
