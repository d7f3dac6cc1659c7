"""The shared-engine switches against real server processes (no containers, no mocks).

One stack per module, started as infra/ starts it: Postgres (initdb + pg_ctl), moto in server mode
standing in for MinIO's S3 API, and the MLflow server through infra/mlflow/start.sh with the
basic-auth app, runs and users in Postgres and artifacts proxied to the S3 stand-in. The project
reaches it only through MLFLOW_TRACKING_URI + credentials; the DVC remote only through data.remote.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from components import config as cfg
from components import tracking, tracking_http
from components.errors import TrackingError
from tests.conftest import write_params
from tests.infra import servers

pytestmark = pytest.mark.slow

ADMIN_PASSWORD = "admin-password-for-tests"
ARTIFACT_BUCKET, DVC_BUCKET = "llmcycle-mlflow", "llmcycle-dvc"
CLIENT_VARS = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    logs = tmp_path_factory.mktemp("stack-logs")
    with servers.postgres(("mlflow", "mlflow_auth")) as pg, servers.s3_standin(logs) as s3:
        for bucket in (ARTIFACT_BUCKET, DVC_BUCKET):
            servers.make_bucket(s3, bucket)
        with servers.mlflow_server(pg, s3, ARTIFACT_BUCKET, ADMIN_PASSWORD, logs) as url:
            yield {"mlflow": url, "s3": s3, "pg": pg}


def client_vars(stack) -> dict[str, str]:
    """A laptop pointed at the shared server: URI + credentials, and no S3 credentials (artifacts are proxied)."""
    return {"MLFLOW_TRACKING_URI": stack["mlflow"], "MLFLOW_TRACKING_USERNAME": "admin",
            "MLFLOW_TRACKING_PASSWORD": ADMIN_PASSWORD}


@contextlib.contextmanager
def as_client(stack) -> Iterator[pytest.MonkeyPatch]:
    with pytest.MonkeyPatch.context() as mp:
        for k in CLIENT_VARS + ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
            mp.delenv(k, raising=False)
        for k, v in client_vars(stack).items():
            mp.setenv(k, v)
        mp.setattr(tracking, "_LAST_SET_URI", None)
        yield mp
    tracking._LAST_SET_URI = None


@pytest.fixture
def client_env(stack):
    with as_client(stack) as mp:
        yield mp


@pytest.fixture(scope="module")
def champion(stack, tmp_path_factory):
    """A real HF model logged in a stage run, registered and made `champion` on the shared server."""
    root = tmp_path_factory.mktemp("project")
    with as_client(stack):
        made = servers.tiny_champion(root)
        assert tracking.tracking_uri(made["settings"]) == stack["mlflow"]
    return made


@pytest.mark.timeout(240)
def test_runs_and_registry_go_to_the_shared_server(stack, champion, client_env, tmp_path):
    """Rows in the server's Postgres, weights in S3 through the server's proxy, and back down for serving."""
    settings = champion["settings"]
    found = tracking.get_alias_version(settings, settings.registry.model_name, "champion")
    assert found.version == champion["version"] and found.tags["stage"] == "sft"
    assert found.tags["params_hash"] == settings.params_hash()
    import psycopg2
    with psycopg2.connect(f"{stack['pg']}/mlflow") as conn, conn.cursor() as cur:
        cur.execute("SELECT name FROM runs WHERE run_uuid = %s", (champion["run_id"],))
        assert cur.fetchone() == ("sft",)
    assert not settings.path("mlflow", "mlflow.db").exists()
    keys = servers.bucket_keys(stack["s3"], ARTIFACT_BUCKET)
    assert any(k.endswith("config.json") for k in keys), keys
    assert any(k.endswith(".safetensors") for k in keys), keys
    folder = tracking.download_model_dir(settings, f"models:/{settings.registry.model_name}@champion", tmp_path / "dl")
    assert (folder / "config.json").exists()


@pytest.mark.timeout(60)
def test_a_wrong_password_is_one_clear_error(stack, client_env, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "not-the-password")
    monkeypatch.setattr(tracking_http, "_REACHABLE", set())  # a fresh process: the probe runs again
    write_params(tmp_path)
    settings = cfg.load(tmp_path / "params.yaml")
    with pytest.raises(TrackingError) as err:
        tracking.configure(settings)
    message = str(err.value)
    assert "\n" not in message
    assert stack["mlflow"] in message and "401" in message, message
    assert "MLFLOW_TRACKING_USERNAME" in message and "not-the-password" not in message, message


@pytest.mark.timeout(60)
def test_a_wrong_password_from_the_cli_is_one_line(stack, client_env, tmp_path):
    write_params(tmp_path)
    env = {**os.environ, "MLFLOW_TRACKING_PASSWORD": "not-the-password"}
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "promote", "--config", str(tmp_path / "params.yaml")],
                          env=env, capture_output=True, text=True, cwd=servers.REPO, timeout=55)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: MLflow tracking server")
    assert "401" in proc.stderr and stack["mlflow"] in proc.stderr, proc.stderr[-2000:]


@pytest.mark.timeout(120)
def test_dvc_s3_remote_push_and_pull(stack, tmp_path):
    """`llmcycle data push` with data.remote=s3://...; a fresh clone's `dvc pull` gets the same bytes back."""
    env = {**os.environ, **servers.s3_env(stack["s3"])}
    env.pop("MLFLOW_S3_ENDPOINT_URL")
    project = tmp_path / "project"
    project.mkdir()
    write_params(project)

    def run(*cmd: str, cwd: Path = project) -> subprocess.CompletedProcess:
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=100)
        assert proc.returncode == 0, f"{cmd}: {proc.stdout[-1500:]} {proc.stderr[-1500:]}"
        return proc

    dvc = (sys.executable, "-m", "dvc")
    run("git", "init", "-q")
    run(*dvc, "init", "-q")
    data = project / "data" / "corpus.jsonl"
    data.parent.mkdir()
    data.write_text('{"id": 1, "text": "def f():\\n    return 1\\n"}\n')
    run(*dvc, "add", "data/corpus.jsonl")
    remote = f"s3://{DVC_BUCKET}/team/data"
    out = run(sys.executable, "-m", "flows.cli", "data", "push", "--config", str(project / "params.yaml"),
              "--set", f"data.remote={remote}")
    assert remote in out.stdout
    keys = servers.bucket_keys(stack["s3"], DVC_BUCKET)
    assert any(k.startswith("team/data/files/md5/") for k in keys), keys

    # Another machine: clone the git side only, point at the same remote, pull.
    clone = tmp_path / "clone"
    run("git", "add", "-A")
    run("git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "data")
    run("git", "clone", "-q", str(project), str(clone), cwd=tmp_path)
    run(*dvc, "remote", "add", "--local", "-f", "-d", "llmcycle", remote, cwd=clone)
    run(*dvc, "pull", "-r", "llmcycle", "data/corpus.jsonl.dvc", cwd=clone)
    assert (clone / "data" / "corpus.jsonl").read_bytes() == data.read_bytes()


@pytest.mark.timeout(300)
def test_two_replicas_share_one_rate_limit_through_redis(stack, champion, tmp_path):
    """compose's server-1 and server-2: the champion from the shared MLflow, limits in one real redis-server.
    3 requests a minute for the key in all: the 4th, sent to the replica that has seen only one, gets 429."""
    import httpx

    key = "sk-infra-test"
    env = {**os.environ, **client_vars(stack), "LLMCYCLE_API_KEYS": key, "LLMCYCLE_ADMIN_KEY": "sk-infra-admin",
           "PYTHONPATH": str(servers.REPO)}
    with servers.redis(tmp_path) as redis_url, contextlib.ExitStack() as replicas:
        bases, procs = [], []
        for i in (1, 2):
            root = tmp_path / f"replica{i}"
            root.mkdir()
            write_params(root, {"serving": {"poll_interval_s": 0, "rate_limit": {"requests_per_minute": 3}}})
            port = servers.free_port()
            cmd = [sys.executable, "-m", "flows.cli", "serve", "--config", str(root / "params.yaml"), "--port", str(port),
                   "--set", f"serving.rate_limit.storage={redis_url}"]
            procs.append((replicas.enter_context(servers.process(cmd, root / "serve.log", env=env, cwd=servers.REPO)),
                          root / "serve.log"))
            bases.append(f"http://127.0.0.1:{port}")
        for base, (proc, log) in zip(bases, procs):
            servers.wait_http(f"{base}/readyz", proc, log, timeout_s=240)
        statuses = []
        for base in (bases[0], bases[1], bases[0], bases[1]):
            r = httpx.post(f"{base}/v1/completions", headers={"Authorization": f"Bearer {key}"}, timeout=60,
                           json={"model": "llmcycle", "prompt": "def f(", "max_tokens": 2, "temperature": 0})
            statuses.append(r.status_code)
        assert statuses == [200, 200, 200, 429], statuses
        assert int(r.headers["Retry-After"]) >= 1 and r.json()["error"]["code"] == "rate_limit_exceeded"
