"""The deployments `llmcycle schedule` serves, against a real `prefect server start` on loopback: the cron
schedule of `monitor`, and the event -> deployment trigger -> retrain chain with its concurrency limit.

The served flows are tiny stand-ins with the real flows' parameters (served_flows.py); the deployments,
trigger, concurrency limit and serving code are the project's (flows/deployments.py).
"""
from __future__ import annotations

import datetime
import json
import subprocess
import sys

import pytest

from components.orchestration import stop_group
from tests.conftest import write_params
from tests.orchestration.conftest import REPO, child_env, client_for, emit_drift, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def served(prefect_server, tmp_path_factory):
    """`python -m tests.orchestration.served_flows <params> <override>`: serves monitor/retrain/lifecycle."""
    root = tmp_path_factory.mktemp("served")
    (root / "markers").mkdir()
    config = write_params(root, {"schedule": {"monitor_cron": "*/7 * * * *", "lifecycle_cron": "0 3 * * 1",
                                              "timezone": "Europe/Paris"}})
    env = child_env(prefect_server.api_url, root / "prefect_home", LLMCYCLE_TEST_MARKERS=str(root / "markers"))
    started = datetime.datetime.now(datetime.timezone.utc)
    log = open(root / "serve.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "tests.orchestration.served_flows", str(config), "sft.max_steps=2"],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        with client_for(prefect_server.api_url) as client:
            def deployed():
                assert proc.poll() is None, (root / "serve.log").read_text()[-3000:]
                try:        # serve registers them one after the other
                    return [client.read_deployment_by_name(f"{n}/{n}") for n in ("monitor", "retrain", "lifecycle")]
                except Exception:  # noqa: BLE001 (ObjectNotFound until serve has applied them)
                    return None
            wait_for(deployed, 120, "the served deployments")
        yield {"root": root, "config": config, "env": env, "api_url": prefect_server.api_url, "started": started}
    finally:
        stop_group(proc, 30)
        log.close()


def _runs(client, deployment_id):
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    return client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))


def test_deployments_carry_schedules_parameters_and_trigger(served):
    with client_for(served["api_url"]) as client:
        monitor = client.read_deployment_by_name("monitor/monitor")
        lifecycle = client.read_deployment_by_name("lifecycle/lifecycle")
        retrain = client.read_deployment_by_name("retrain/retrain")
    [m_sched] = monitor.schedules
    assert (m_sched.schedule.cron, m_sched.schedule.timezone, m_sched.active) == ("*/7 * * * *", "Europe/Paris", True)
    assert [s.schedule.cron for s in lifecycle.schedules] == ["0 3 * * 1"]
    assert retrain.schedules == []
    for d in (monitor, lifecycle, retrain):
        assert d.parameters["config"] == str(served["config"]) and d.parameters["overrides"] == ["sft.max_steps=2"]
    for d in (monitor, lifecycle, retrain):
        assert d.concurrency_options.collision_strategy.value == "CANCEL_NEW"
        assert d.global_concurrency_limit.limit == 1
    assert [t.expect for t in _triggers(served["api_url"], retrain.id)] == [{"llmcycle.drift.detected"}]
    # The closed loop waits for a runner polling this deployment, not just for a registration left from before.
    from flows.deployments import api_settings, wait_for_deployment

    with api_settings(served["api_url"]):
        assert wait_for_deployment("retrain/retrain", 30, polled_since=served["started"]).id == retrain.id
        later = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=1)
        assert wait_for_deployment("retrain/retrain", 1, polled_since=later) is None
    assert _triggers(served["api_url"], monitor.id) == [] and _triggers(served["api_url"], lifecycle.id) == []


def test_drift_event_starts_one_retrain_and_a_second_event_meanwhile_starts_none(served):
    markers = served["root"] / "markers"
    with client_for(served["api_url"]) as client:
        retrain = client.read_deployment_by_name("retrain/retrain")
        emit_drift(served["env"], "some-other-model", "1", "m-other")      # not this project's model: ignored
        emit_drift(served["env"], "llmcycle", "1", "m-1")
        first = wait_for(lambda: [r for r in _runs(client, retrain.id) if r.state_type.value == "RUNNING"],
                         90, "the event-triggered retrain run to be running")
        assert [r.parameters["monitor_run_id"] for r in first] == ["m-1"]
        # The run is still holding (no release file): a second event arrives meanwhile.
        emit_drift(served["env"], "llmcycle", "1", "m-2")
        second = wait_for(lambda: [r for r in _runs(client, retrain.id) if r.parameters.get("monitor_run_id") == "m-2"
                                   and r.state and r.state.is_final()], 90, "the second event's run to be settled")
        assert second[0].state_type.value == "CANCELLED", second[0].state
        assert "concurrency limit" in (second[0].state.message or "")
        (markers / "release").write_text("")
        done = wait_for(lambda: [r for r in _runs(client, retrain.id) if r.parameters.get("monitor_run_id") == "m-1"
                                 and r.state and r.state.is_final()], 90, "the first retrain to finish")
        assert done[0].state_type.value == "COMPLETED"
        all_runs = _runs(client, retrain.id)
    # The closed loop's helpers find the run by its parameter; the server's automation created it.
    from flows.deployments import api_settings, triggered_run, wait_final

    with api_settings(served["api_url"]):
        found = triggered_run(retrain.id, "monitor_run_id", "m-1", timeout_s=5)
        assert found is not None and wait_final(found.id, 5).state_type.value == "COMPLETED"
        assert triggered_run(retrain.id, "monitor_run_id", "m-other", timeout_s=1) is None
    assert found.created_by is not None and found.created_by.type == "AUTOMATION", found.created_by
    # Exactly one retrain executed, with the payload's monitor run id and the deployment's config.
    executed = [json.loads(p.read_text()) for p in markers.glob("*.json")]
    assert executed == [{"config": str(served["config"]), "overrides": ["sft.max_steps=2"], "monitor_run_id": "m-1"}]
    assert sorted(r.parameters["monitor_run_id"] for r in all_runs) == ["m-1", "m-2"]


def _triggers(api_url, deployment_id):
    """The event triggers of the automations that run this deployment."""
    with client_for(api_url) as client:
        automations = client.read_resource_related_automations(f"prefect.deployment.{deployment_id}")
    return [a.trigger for a in automations]
