"""The Prefect side of infra/ for real: `prefect server start` on Postgres, a process work pool, the
project's deployments registered from infra/prefect/prefect.yaml with `prefect deploy`, and a
`prefect worker` that runs the `monitor` deployment as a child process (on a tiny temp project, so
the run reads and writes nothing of the checkout). A drift event sent to that server then makes a
`retrain` flow run in the pool through the trigger prefect.yaml declares.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from components import tracking
from tests.infra import servers

pytestmark = pytest.mark.slow
POOL = "llmcycle-process"
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def write_requests(settings, n: int) -> None:
    """n served requests in the server's own request log format (components/serving/request_log.py)."""
    from components.serving.request_log import RequestLog

    log = RequestLog(settings.path(settings.serving.log_dir))
    for i in range(n):
        log.log({"id": f"cmpl-{i}", "index": 0, "endpoint": "/v1/completions", "model": "llmcycle@champion",
                 "version": "1", "key_id": "k-infra", "prompt": f"def f{i}(", "completion": "x):\n    return x",
                 "prompt_tokens": 3, "completion_tokens": 5, "latency_s": 0.05, "finish_reason": "length"})
    log.flush()
    log.close()


def forget_project_store() -> None:
    """mlflow exported the project's store (MLFLOW_TRACKING_URI): later tests in this process must not inherit it."""
    for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        os.environ.pop(k, None)
    tracking._LAST_SET_URI = None


@pytest.mark.timeout(420)
def test_worker_on_a_process_pool_runs_the_monitor_deployment(tmp_path):
    import httpx

    with servers.postgres(("prefect",)) as pg:
        port = servers.free_port()
        api = f"http://127.0.0.1:{port}/api"
        base_env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                    "PATH": f"{servers.BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        for k in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
            base_env.pop(k, None)
        server_env = {**base_env, "PREFECT_UI_ENABLED": "false",
                      "PREFECT_API_DATABASE_CONNECTION_URL": pg.replace("postgresql://", "postgresql+asyncpg://") + "/prefect"}
        # What compose gives the worker (the image sets LLMCYCLE_APP_DIR=/app; here: this checkout).
        client_env = {**base_env, "PREFECT_API_URL": api, "PREFECT_WORK_POOL": POOL, "LLMCYCLE_APP_DIR": str(servers.REPO),
                      "LLMCYCLE_DVC_REMOTE": str(tmp_path / "dvc-remote"), "PREFECT_WORKER_QUERY_SECONDS": "2",
                      "PYTHONPATH": str(servers.REPO), "PREFECT_LOGGING_LEVEL": "INFO"}   # worker.log: diagnostics

        def cli(*args: str) -> None:
            proc = subprocess.run(args, env=client_env, cwd=servers.REPO, capture_output=True, text=True, timeout=180)
            assert proc.returncode == 0, f"{args}: {proc.stdout[-2000:]} {proc.stderr[-2000:]}"

        cmd = ["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
        with servers.process(cmd, tmp_path / "server.log", env=server_env) as server:
            servers.wait_http(f"{api}/health", server, tmp_path / "server.log", timeout_s=180)
            cli("prefect", "work-pool", "create", POOL, "--type", "process", "--overwrite")
            cli("prefect", "--no-prompt", "deploy", "--all", "--prefect-file", "infra/prefect/prefect.yaml")

            http = httpx.Client(base_url=api, timeout=30)
            deployments = {d["name"]: d for d in http.post("/deployments/filter", json={}).json()}
            assert set(deployments) == {"lifecycle", "monitor", "retrain"}
            assert {d["work_pool_name"] for d in deployments.values()} == {POOL}
            one_at_a_time = {((d.get("global_concurrency_limit") or {}).get("limit"),
                              (d.get("concurrency_options") or {}).get("collision_strategy")) for d in deployments.values()}
            assert one_at_a_time == {(1, "CANCEL_NEW")}, one_at_a_time
            assert deployments["monitor"]["schedules"][0]["schedule"]["cron"] == "0 * * * *"
            automations = http.post("/automations/filter", json={}).json()
            [trigger] = [a["trigger"] for a in automations
                         if a["actions"][0].get("deployment_id") == deployments["retrain"]["id"]]
            assert trigger["expect"] == ["llmcycle.drift.detected"]

            project = tmp_path / "project"
            project.mkdir()
            settings = servers.tiny_champion(project)["settings"]  # the monitor's model, in the project's store
            forget_project_store()
            write_requests(settings, 3)          # fewer than monitoring.min_window: nothing to judge yet
            run = http.post(f"/deployments/{deployments['monitor']['id']}/create_flow_run", json={"parameters": {
                "config": str(project / "params.yaml"), "overrides": [f"data.remote={tmp_path / 'dvc-remote'}"]}}).json()
            worker_cmd = ["prefect", "worker", "start", "--pool", POOL, "--type", "process"]
            with servers.process(worker_cmd, tmp_path / "worker.log", env=client_env) as worker:
                deadline = time.monotonic() + 300
                state = run["state"]["type"]
                while state not in FINAL and time.monotonic() < deadline and worker.poll() is None:
                    time.sleep(2)
                    state = http.get(f"/flow_runs/{run['id']}").json()["state"]["type"]
            log = (tmp_path / "worker.log").read_text()[-4000:]
            assert state == "COMPLETED", f"monitor run ended {state}:\n{log}"
            # The flow ran on the tiny project and judged its 3 requests: nothing to compare yet. Its MLflow
            # `monitor` run in the project's store says so (the worker's stdout depends on logging settings).
            judged = tracking.newest_run(settings, "monitor")
            forget_project_store()
            assert judged is not None, f"no monitor run in the project's MLflow store:\n{log}"
            assert judged.data.tags["decision"] == "insufficient_data", (judged.data.tags, log)
            assert judged.data.metrics["window_n"] == 3 and judged.data.metrics["insufficient_data"] == 1.0

            # A drift event through this server makes the pool a retrain run (the worker is stopped now, so
            # it stays scheduled: retraining itself is tested in tests/monitoring and tests/orchestration).
            emit = ("from prefect.events import emit_event; emit_event(event='llmcycle.drift.detected', "
                    "resource={'prefect.resource.id': 'llmcycle.model.llmcycle.1'}, payload={'monitor_run_id': 'm-1'})")
            cli(sys.executable, "-c", emit)
            retrain = {"deployments": {"id": {"any_": [deployments["retrain"]["id"]]}}}
            deadline, runs = time.monotonic() + 60, []
            while not runs and time.monotonic() < deadline:
                time.sleep(1)
                runs = http.post("/flow_runs/filter", json=retrain).json()
            assert [r["parameters"]["monitor_run_id"] for r in runs] == ["m-1"], runs
            assert runs[0]["work_queue_name"] and runs[0]["state"]["type"] == "SCHEDULED"
