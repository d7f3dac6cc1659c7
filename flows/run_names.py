"""Flow run names that say what each run does (Prefect's UI lists runs by name), from the run's own parameters.

Each function is a `flow_run_name` callable: Prefect calls it when the run starts, and it reads the parameters
through prefect.runtime. It must stay cheap and never fail: no MLflow or file access, only the parameters.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect.runtime import flow_run


def _params() -> dict[str, Any]:
    try:
        return dict(flow_run.parameters or {})
    except Exception:  # noqa: BLE001 - a name is never worth a failed run
        return {}


def _sets(params: dict[str, Any], most: int = 3) -> str:
    items = list(params.get("overrides") or [])
    if not items:
        return ""
    more = f" +{len(items) - most}" if len(items) > most else ""
    return " --set " + " ".join(items[:most]) + more


def _on_config(what: str) -> str:
    p = _params()
    return f"{what} {Path(str(p.get('config') or 'params.yaml')).name}{_sets(p)}"


def lifecycle_name() -> str:
    return _on_config("lifecycle")


def loop_name() -> str:
    return _on_config("closed loop")


def retrain_name() -> str:
    mid = _params().get("monitor_run_id")
    return f"retrain on drift of monitor run {str(mid)[:8]}" if mid else "retrain on the newest drift"


def monitor_name() -> str:
    window = _params().get("window")
    return f"monitor the newest {window} requests" if window else "monitor the newest window (monitoring.window)"


def evaluate_name() -> str:
    p = _params()
    return f"evaluate {p.get('label') or 'candidate'} {p.get('model_uri') or '(the newest fine-tuned model)'}"


def deploy_name() -> str:
    p = _params()
    return f"gate {p.get('label') or p.get('model_uri') or 'the newest evaluated model'}"
