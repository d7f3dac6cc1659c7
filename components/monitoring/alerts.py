"""Drift alerts: the event's resource and payload, an alert log line, and an optional JSON webhook.

The Prefect event itself is emitted by flows/monitor.py (components never import prefect); its
resource and payload are built here so the webhook carries the very same fields. A webhook that
fails or times out is logged, never raised: an alert channel being down must not fail the monitor.
"""
from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from typing import Any

log = logging.getLogger("llmcycle.monitoring")

EVENT = "llmcycle.drift.detected"


def resource(model_name: str, version: str) -> dict[str, str]:
    """The model version the drift was seen on (Prefect resource ids are dotted names)."""
    return {"prefect.resource.id": f"llmcycle.model.{model_name}.{version}",
            "prefect.resource.name": f"{model_name} v{version}", "llmcycle.model_name": model_name,
            "llmcycle.model_version": str(version)}


def payload(window: dict[str, Any], drift_share: float | None, drifted_columns: list[str], monitor_run_id: str,
            model_version: str) -> dict[str, Any]:
    return {"window": {k: window.get(k) for k in ("start", "end", "n")}, "drift_share": drift_share,
            "drifted_columns": list(drifted_columns), "monitor_run_id": monitor_run_id,
            "model_version": str(model_version)}


def alert_line(model_name: str, body: dict[str, Any]) -> str:
    w = body["window"]
    share = body["drift_share"]
    return (f"ALERT {EVENT}: {model_name} v{body['model_version']} drifted on {w['n']} requests "
            f"({w['start']} .. {w['end']}): share {share if share is None else round(share, 3)}, columns "
            f"{', '.join(body['drifted_columns']) or '-'}; monitor run {body['monitor_run_id']}")


def post_webhook(url: str, body: dict[str, Any], timeout_s: float) -> str:
    """POST {"event": EVENT, **body} as JSON; returns "sent (HTTP <code>)" or why it was not, never raises."""
    data = json.dumps({"event": EVENT, **body}, default=str).encode()
    try:
        req = urllib.request.Request(url, data=data, method="POST",
                                     headers={"Content-Type": "application/json", "User-Agent": "llmcycle-monitor"})
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return f"sent (HTTP {resp.status})"
    except urllib.error.HTTPError as exc:
        outcome = f"failed: HTTP {exc.code} from {url}"
    except (OSError, ValueError) as exc:        # refused, timeout, DNS, a malformed URL
        outcome = f"failed: {type(exc).__name__}: {getattr(exc, 'reason', exc)} ({url})"
    log.warning("drift webhook %s", outcome)
    return outcome
