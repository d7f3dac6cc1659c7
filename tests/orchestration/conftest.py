"""One real `prefect server start` on loopback for the orchestration tests (session scope, own PREFECT_HOME),
and a client pointed at it. Stopped (its process group) after the session."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from components.orchestration import start_server

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    server = start_server(tmp_path_factory.mktemp("prefect_server_home"), ui=False)
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def client_for(api_url: str):
    """A sync Prefect client for api_url (temporary settings: another test's harness may be active)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url}):
        with get_client(sync_client=True) as client:
            yield client


def child_env(api_url: str, home: Path, **extra: str) -> dict:
    """Environment of a process that talks to the server (as `llmcycle schedule` would set it)."""
    return {**os.environ, "PREFECT_API_URL": api_url, "PREFECT_HOME": str(home),
            "PREFECT_RUNNER_POLL_FREQUENCY": "2", "PYTHONPATH": str(REPO), **extra}


def emit_drift(env: dict, model_name: str, version: str, monitor_run_id: str) -> None:
    """Emit llmcycle.drift.detected from its own process with prefect.events.emit_event, as the monitor does."""
    code = ("import sys\nfrom prefect.events import emit_event\n"
            "emit_event(event='llmcycle.drift.detected', resource={'prefect.resource.id': sys.argv[1]},\n"
            "           payload={'monitor_run_id': sys.argv[2], 'window': 100, 'drift_share': 0.8,\n"
            "                    'drifted_columns': ['prompt'], 'model_version': sys.argv[3]})\n")
    subprocess.run([sys.executable, "-c", code, f"llmcycle.model.{model_name}.{version}", monitor_run_id, version],
                   env=env, cwd=REPO, check=True, timeout=120, capture_output=True)


def wait_for(predicate, timeout_s: float, what: str, interval_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
