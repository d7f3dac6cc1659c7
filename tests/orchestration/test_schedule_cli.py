"""`llmcycle schedule` as a user runs it with PREFECT_API_URL unset: it starts its own `prefect server start`
on loopback, serves the project's real monitor / retrain / lifecycle flows, and on SIGTERM stops serving
and takes the server down with it. A PREFECT_API_URL that answers nothing is a one-line error (exit 1)."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import pytest

from components.orchestration import free_port, healthy
from tests.conftest import write_params
from tests.orchestration.conftest import REPO, client_for, wait_for

pytestmark = pytest.mark.slow
CLI = [sys.executable, "-c", "from flows.cli import app; app()"]


def _env(tmp_path, **extra):
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    return {**env, "PREFECT_HOME": str(tmp_path / "prefect_home"), "PYTHONPATH": str(REPO), **extra}


def test_schedule_starts_its_own_server_serves_and_stops_it(tmp_path):
    config = write_params(tmp_path, {"schedule": {"monitor_cron": "*/5 * * * *"}})
    err = tmp_path / "schedule.err"
    with open(err, "wb") as out:
        proc = subprocess.Popen([*CLI, "schedule", "--config", str(config), "--no-cron"], cwd=tmp_path,
                                env=_env(tmp_path), stdout=subprocess.DEVNULL, stderr=out, start_new_session=True)
    try:
        def announced():
            assert proc.poll() is None, err.read_text()[-3000:]
            return re.search(r"Prefect API (http://127\.0\.0\.1:\d+/api)", err.read_text())
        api_url = wait_for(announced, 120, "`llmcycle schedule` to announce its server").group(1)
        assert healthy(api_url)
        with client_for(api_url) as client:
            # serve registers them one after the other, then its runner starts and polls for their runs: only
            # then is it serving (a SIGTERM before that is Prefect's sys.exit(0), also handled; see the command)
            retrain, monitor, lifecycle = [wait_for(lambda: _polled(client, name), 120, f"{name} to be served")
                                           for name in ("retrain/retrain", "monitor/monitor", "lifecycle/lifecycle")]
        assert monitor.schedules == [] and lifecycle.schedules == []      # --no-cron
        assert retrain.parameters == {"config": str(config), "overrides": [], "monitor_run_id": None}
        assert retrain.entrypoint.endswith("flows/retrain.py:retrain_flow")
        assert monitor.entrypoint.endswith("flows/monitor.py:monitor_flow")
        assert (tmp_path / "prefect_home" / "server.log").is_file()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        code = proc.wait(60)
    assert code == 0, err.read_text()[-3000:]
    assert "schedule: stopped" in err.read_text()
    assert not healthy(api_url)          # the server it started is gone with it


def _polled(client, name):
    """The deployment once a runner has polled for its runs (a fresh server: no earlier runner polled it)."""
    try:
        found = client.read_deployment_by_name(name)
    except Exception:  # noqa: BLE001 (not registered yet)
        return None
    return found if found.last_polled is not None else None


def test_schedule_with_an_unreachable_prefect_api_url_fails_in_one_line(tmp_path):
    config = write_params(tmp_path)
    url = f"http://127.0.0.1:{free_port()}/api"
    res = subprocess.run([*CLI, "schedule", "--config", str(config)], cwd=tmp_path, capture_output=True, text=True,
                         env=_env(tmp_path, PREFECT_API_URL=url), timeout=120)
    assert res.returncode == 1, res.stderr
    assert f"PREFECT_API_URL={url}: no Prefect server answers" in res.stderr
    assert "Traceback" not in res.stderr


def test_a_cron_schedule_due_within_a_minute_runs_the_real_monitor_flow(tiny_root):
    """`llmcycle schedule` with monitor_cron every minute: the scheduler creates a flow run of the real monitor
    deployment, the runner executes flows/monitor.py, and it completes (5 requests logged: insufficient_data)."""
    from tests.serving.server_helpers import build_registry

    import datetime
    import json

    from tests.monitoring.test_retrain_flow import _window

    build_registry(tiny_root)                     # a champion for the monitor to watch, and a little traffic
    day = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    log = tiny_root / "data" / "inference" / f"requests-{day}.jsonl"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("".join(json.dumps(r) + "\n" for r in _window(5)))
    config = write_params(tiny_root, {"schedule": {"monitor_cron": "* * * * *", "lifecycle_cron": None}})
    err = tiny_root / "schedule.err"
    with open(err, "wb") as out:
        proc = subprocess.Popen([*CLI, "schedule", "--config", str(config)], cwd=tiny_root, env=_env(tiny_root),
                                stdout=subprocess.DEVNULL, stderr=out, start_new_session=True)
    try:
        def announced():
            assert proc.poll() is None, err.read_text()[-3000:]
            return re.search(r"Prefect API (http://127\.0\.0\.1:\d+/api)", err.read_text())
        api_url = wait_for(announced, 120, "`llmcycle schedule` to announce its server").group(1)
        with client_for(api_url) as client:
            monitor = wait_for(lambda: _polled(client, "monitor/monitor"), 120, "monitor to be served")
            assert [s.schedule.cron for s in monitor.schedules] == ["* * * * *"]

            def completed_scheduled_run():
                from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

                runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[monitor.id])))
                done = [r for r in runs if r.state and r.state.is_final()]
                assert not [r for r in done if not r.state.is_completed()], [(r.name, r.state) for r in done]
                return next((r for r in done if r.auto_scheduled), None)
            run = wait_for(completed_scheduled_run, 150, "a scheduled monitor run to complete")
        assert run.state.is_completed() and run.deployment_id == monitor.id
        assert run.parameters["config"] == str(config)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
