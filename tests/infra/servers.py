"""Real server processes for tests/infra, started the way an operator would, on free loopback ports.

Postgres (initdb + pg_ctl in a temp dir; as an unprivileged user when the tests run as root, since
Postgres refuses root), moto in server mode as the stand-in for an S3 object store (MinIO is not
packaged here), the MLflow server through infra/mlflow/start.sh, and redis-server. Each runs in its own
process group and is stopped by that group's id.
"""
from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

from components.orchestration import stop_group

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PG_USER, PG_PASSWORD = "llmcycle", "pg-secret"
S3_KEY, S3_SECRET = "testing-key", "testing-secret"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pg_bin() -> Path | None:
    """Folder of initdb/pg_ctl/postgres: Debian keeps them off PATH in /usr/lib/postgresql/<v>/bin."""
    hit = shutil.which("initdb")
    if hit:
        return Path(os.path.realpath(hit)).parent
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


def missing(why: str) -> None:
    """Skip on a developer's machine; under CI=true a missing server is a failure (.ci/run must install it)."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI=true: {why}", pytrace=False)
    pytest.skip(why)


def need(binary: str) -> None:
    if shutil.which(binary) is None:
        missing(f"{binary} is not installed (.ci/run installs it with apt-get as root)")


def _demote() -> tuple[int, int] | None:
    """(uid, gid) of an unprivileged account when running as root (Postgres will not run as root)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            entry = pwd.getpwnam(name)
            return entry.pw_uid, entry.pw_gid
    missing("running as root with no postgres/nobody account to run Postgres as")


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 90.0, ok=(200,)) -> None:
    """Poll url until it answers one of ok (any HTTP status when ok is None); fail with the log's tail."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: the server exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if ok is None or resp.status in ok:
                    return
        except urllib.error.HTTPError as exc:
            if ok is None or exc.code in ok:
                return
        except OSError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url}: no answer within {timeout_s:g} s:\n{log.read_text()[-3000:]}")


@contextlib.contextmanager
def process(cmd: list[str], log: Path, env: dict[str, str] | None = None, **kw) -> Iterator[subprocess.Popen]:
    """Start cmd in its own process group (output to log); on exit stop that group, then kill it."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True, **kw)
    try:
        yield proc
    finally:
        stop_group(proc)


@contextlib.contextmanager
def postgres(databases: tuple[str, ...]) -> Iterator[str]:
    """A fresh Postgres cluster on a free port with `databases`; yields postgresql://user:pw@127.0.0.1:port."""
    bin_dir = pg_bin()
    if bin_dir is None:
        missing("PostgreSQL (initdb, pg_ctl) is not installed (.ci/run installs it with apt-get as root)")
    ids = _demote()
    base = Path(tempfile.mkdtemp(prefix="llmcycle-pg-"))
    data, pwfile = base / "data", base / "pw"
    pwfile.write_text(PG_PASSWORD)
    if ids:
        for p in (base, pwfile):
            os.chown(p, *ids)
    as_user = (lambda: (os.setgid(ids[1]), os.setuid(ids[0]))) if ids else None
    port = free_port()
    subprocess.run([str(bin_dir / "initdb"), "-D", str(data), "-U", PG_USER, f"--pwfile={pwfile}", "-A", "scram-sha-256",
                    "--no-sync"], check=True, capture_output=True, preexec_fn=as_user, cwd=base)
    opts = f"-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories='{base}' -c fsync=off"
    subprocess.run([str(bin_dir / "pg_ctl"), "-D", str(data), "-o", opts, "-l", str(base / "log"), "-w", "-t", "60",
                    "start"], check=True, capture_output=True, preexec_fn=as_user, cwd=base)
    try:
        import psycopg2
        url = f"postgresql://{PG_USER}:{PG_PASSWORD}@127.0.0.1:{port}"
        conn = psycopg2.connect(f"{url}/postgres")
        conn.autocommit = True
        with conn.cursor() as cur:
            for db in databases:
                cur.execute(f"CREATE DATABASE {db}")
        conn.close()
        yield url
    finally:
        subprocess.run([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"], capture_output=True,
                       preexec_fn=as_user, cwd=base)
        shutil.rmtree(base, ignore_errors=True)


@contextlib.contextmanager
def s3_standin(log_dir: Path) -> Iterator[str]:
    """moto in server mode: the S3 API on a free port, standing in for MinIO. Yields the endpoint URL."""
    port = free_port()
    with process([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], log_dir / "moto.log") as proc:
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/moto-api/", proc, log_dir / "moto.log", timeout_s=60, ok=None)
        yield url


def s3_env(endpoint: str) -> dict[str, str]:
    """What a client of the object store sets (compose passes the same names)."""
    return {"AWS_ACCESS_KEY_ID": S3_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET, "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL_S3": endpoint, "MLFLOW_S3_ENDPOINT_URL": endpoint}


def make_bucket(endpoint: str, bucket: str) -> None:
    import boto3
    env = s3_env(endpoint)
    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                 aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1").create_bucket(Bucket=bucket)


def bucket_keys(endpoint: str, bucket: str) -> list[str]:
    import boto3
    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=S3_KEY, aws_secret_access_key=S3_SECRET,
                          region_name="us-east-1")
    keys: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys += [o["Key"] for o in page.get("Contents", [])]
    return keys


@contextlib.contextmanager
def mlflow_server(pg_url: str, s3_endpoint: str, bucket: str, admin_password: str, log_dir: Path) -> Iterator[str]:
    """infra/mlflow/start.sh with a Postgres backend and user store and S3 artifacts; yields its URL."""
    port = free_port()
    # SQLAlchemy 2.1 maps plain postgresql:// to psycopg 3: name the psycopg2 driver we install.
    pg_url = pg_url.replace("postgresql://", "postgresql+psycopg2://", 1)
    env = {**os.environ, **s3_env(s3_endpoint),
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "MLFLOW_BACKEND_STORE_URI": f"{pg_url}/mlflow", "MLFLOW_AUTH_DATABASE_URI": f"{pg_url}/mlflow_auth",
           "MLFLOW_ARTIFACTS_DESTINATION": f"s3://{bucket}/artifacts",
           "MLFLOW_AUTH_ADMIN_USERNAME": "admin", "MLFLOW_AUTH_ADMIN_PASSWORD": admin_password,
           "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-secret", "MLFLOW_HOST": "127.0.0.1", "MLFLOW_PORT": str(port),
           "MLFLOW_WORKERS": "1", "MLFLOW_AUTH_CONFIG_PATH": str(log_dir / "basic_auth.ini")}
    for k in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        env.pop(k, None)
    log = log_dir / "mlflow.log"
    with process(["sh", str(REPO / "infra" / "mlflow" / "start.sh")], log, env=env) as proc:
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/health", proc, log, timeout_s=150)
        yield url


@contextlib.contextmanager
def redis(log_dir: Path) -> Iterator[str]:
    need("redis-server")
    port = free_port()
    cmd = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
           "--dir", str(log_dir)]
    with process(cmd, log_dir / "redis.log") as proc:
        import redis as redis_client
        client = redis_client.Redis(host="127.0.0.1", port=port)
        deadline = time.monotonic() + 30
        while True:
            try:
                client.ping()
                break
            except redis_client.ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start: {(log_dir / 'redis.log').read_text()[-2000:]}")
                time.sleep(0.2)
        yield f"redis://127.0.0.1:{port}/0"


def tiny_champion(root: Path, extra: dict | None = None) -> dict:
    """A tiny project at root whose real HF model is logged in an `sft` run, registered and made `champion`
    in whatever store MLFLOW_TRACKING_URI names (the project's own SQLite file when unset)."""
    import mlflow

    from components import config as cfg
    from components import tracking
    from components.model.build import load_causal_lm
    from tests.conftest import write_params
    from tests.unit.evaluation.test_evaluate import save_tiny_model
    from tests.unit.training.helpers import write_tiny_data

    write_params(root, extra)
    settings = cfg.load(root / "params.yaml")
    tok = write_tiny_data(settings)
    model, t = load_causal_lm(settings, str(save_tiny_model(settings, tok, root / "hf")))
    with tracking.stage_run(settings, "sft") as run:
        mlflow.log_metric("val_loss", 1.5)
        uri = tracking.log_hf_model(model, t)
    mv = tracking.register_model(settings, uri, settings.registry.model_name, stage="sft")
    tracking.set_alias(settings, settings.registry.model_name, "champion", mv.version)
    return {"settings": settings, "run_id": run.info.run_id, "version": mv.version}
