"""Prefect deployments served from one process (`llmcycle schedule`): monitor, retrain, lifecycle.

- `monitor` runs on schedule.monitor_cron;
- `retrain` runs on each `llmcycle.drift.detected` event of this project's model (a deployment trigger
  whose parameters come from the event payload), one at a time: deployment concurrency 1 with
  CANCEL_NEW, so an event arriving while a retrain runs gets a cancelled run, never a second retrain;
- `lifecycle` runs on demand (`prefect deployment run lifecycle/lifecycle`) and on schedule.lifecycle_cron.
Each deployment runs one at a time (a cron tick while the last monitor still runs is cancelled too).
Every deployment gets the config path (absolute) and the overrides as parameters. Events and triggers
need a real Prefect server (components/orchestration.py starts one when PREFECT_API_URL is unset).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from components import config as cfg
from components.errors import ConfigError

DRIFT_EVENT = "llmcycle.drift.detected"


def model_resource_id(model_name: str, version: str | int = "*") -> str:
    """The resource a drift event is about: llmcycle.model.<name>.<version> (`*` matches every version)."""
    return f"llmcycle.model.{model_name}.{version}"


def drift_trigger(model_name: str, parameters: dict[str, Any] | None = None):
    """Run the deployment once per drift event about model_name; monitor_run_id comes from the payload."""
    from prefect.events import DeploymentEventTrigger

    return DeploymentEventTrigger(
        name=f"retrain {model_name} on drift",
        description=f"{DRIFT_EVENT} for any version of {model_name} runs the retrain deployment",
        expect={DRIFT_EVENT},
        match={"prefect.resource.id": model_resource_id(model_name)},
        # A single-expression template keeps the value's type (Prefect renders it through tojson).
        parameters={**(parameters or {}), "monitor_run_id": "{{ event.payload.monitor_run_id }}"},
    )


def one_at_a_time():
    """Deployment concurrency 1; a run proposed while one runs is cancelled, not queued."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

    return ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW)


def _cron(expression: str | None, timezone: str, key: str) -> list:
    if not expression:
        return []
    from prefect.schedules import Cron

    try:
        return [Cron(expression, timezone=timezone)]
    except ValueError as exc:
        raise ConfigError(f"schedule.{key}={expression!r} (timezone {timezone!r}): {exc}") from None


def build(config: str = "params.yaml", overrides: list[str] | None = None, *,
          monitor: Callable | None = None, retrain: Callable | None = None,
          lifecycle: Callable | None = None, crons: bool = True) -> list:
    """The RunnerDeployments for prefect.serve: monitor (cron), retrain (drift event), lifecycle (on demand
    and optional cron); crons=False leaves the schedules out. The flows default to the project's; tests pass
    tiny flows with the same parameters."""
    overrides = list(overrides or [])
    settings = cfg.load(config, overrides)
    sched = settings.schedule
    params = {"config": str(Path(config).resolve()), "overrides": overrides}
    if monitor is None or retrain is None or lifecycle is None:
        from flows.lifecycle import lifecycle as lifecycle_flow
        from flows.monitor import monitor_flow
        from flows.retrain import retrain_flow

        monitor, retrain, lifecycle = monitor or monitor_flow, retrain or retrain_flow, lifecycle or lifecycle_flow
    name = settings.registry.model_name
    tags = ["llmcycle", name]
    return [
        monitor.to_deployment(
            name="monitor", parameters=params, tags=tags,
            schedules=_cron(sched.monitor_cron if crons else None, sched.timezone, "monitor_cron"),
            concurrency_limit=one_at_a_time(),
            description="Evidently drift check of the newest request window; emits llmcycle.drift.detected",
        ),
        retrain.to_deployment(
            name="retrain", parameters={**params, "monitor_run_id": None}, tags=tags,
            triggers=[drift_trigger(name)] if sched.retrain_on_drift else [],
            concurrency_limit=one_at_a_time(),
            description="Retrain on the drifted window + feedback, gate, promote; one at a time",
        ),
        lifecycle.to_deployment(
            name="lifecycle", parameters=params, tags=tags,
            schedules=_cron(sched.lifecycle_cron if crons else None, sched.timezone, "lifecycle_cron"),
            concurrency_limit=one_at_a_time(),
            description="The whole lifecycle: scope, data, train, evaluate, gate",
        ),
    ]


def serve(deployments: list, limit: int | None = None) -> None:
    """Serve until interrupted (SIGINT/SIGTERM); schedules are paused on the way out, as Prefect does."""
    from prefect import serve as prefect_serve

    prefect_serve(*deployments, limit=limit, print_starting_message=False)


def api_settings(api_url: str):
    """Prefect settings pointing this process at api_url (a context manager). Setting PREFECT_API_URL in the
    environment is not enough once prefect is imported: its settings context was built at import."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    return temporary_settings({PREFECT_API_URL: api_url})


# ----------------------------------------------------------------------------- watching served deployments
def _poll(fetch: Callable[[], Any], timeout_s: float, interval_s: float = 1.0) -> Any:
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        value = fetch()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval_s)


def wait_for_deployment(name: str, timeout_s: float, alive: Callable[[], bool] = lambda: True,
                        polled_since: Any = None) -> Any | None:
    """The deployment `<flow>/<deployment>` once it is registered and, with polled_since (a datetime), once a
    runner has polled for its runs since then (so a deployment left from an earlier run does not count).
    None after timeout_s, or as soon as alive() is False."""
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    def fetch():
        if not alive():
            return "gone"
        with get_client(sync_client=True) as client:
            try:
                found = client.read_deployment_by_name(name)
            except ObjectNotFound:
                return None
        polled = getattr(found, "last_polled", None)
        return found if polled_since is None or (polled is not None and polled >= polled_since) else None

    found = _poll(fetch, timeout_s)
    return None if found == "gone" else found


def triggered_run(deployment_id: Any, parameter: str, value: str, timeout_s: float) -> Any | None:
    """The flow run of the deployment whose `parameter` is value, once it exists (None after timeout_s)."""
    from prefect import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    def fetch():
        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))
        return next((r for r in runs if (r.parameters or {}).get(parameter) == value), None)

    return _poll(fetch, timeout_s)


def wait_final(flow_run_id: Any, timeout_s: float) -> Any:
    """The flow run once its state is final (or as it stands after timeout_s)."""
    from prefect import get_client

    def fetch():
        with get_client(sync_client=True) as client:
            run = client.read_flow_run(flow_run_id)
        fetch.last = run
        return run if run.state is not None and run.state.is_final() else None

    return _poll(fetch, timeout_s, interval_s=2.0) or fetch.last
