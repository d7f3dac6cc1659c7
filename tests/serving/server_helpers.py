"""Tiny registry + real uvicorn server on a free loopback port, for the serving tests.

One tiny project per module: a BPE tokenizer, tiny Llama weights logged as MLflow runs and
registered as versions of `llmcycle` in a SQLite store (v1 champion, v2 challenger, v3 broken:
no weights, for failed-reload tests). Servers run in a thread of the test process.
"""
from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from pathlib import Path

from components import config as cfg
from components import tracking
from tests.conftest import write_params

KEY, ADMIN = "sk-test-key-1", "sk-admin-key"
URI_VARS = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


def build_registry(root: Path, extra: dict | None = None) -> cfg.Settings:
    """Tiny project at root with versions 1 (champion), 2 (challenger) and 3 (broken) of llmcycle."""
    import mlflow

    from tests.unit.evaluation.test_evaluate import save_tiny_model
    from tests.unit.training.helpers import write_tiny_data

    for k in URI_VARS:
        os.environ.pop(k, None)
    write_params(root, {"serving": {"poll_interval_s": 0}, **(extra or {})})
    settings = cfg.load(root / "params.yaml")
    tok = write_tiny_data(settings)
    name = settings.registry.model_name
    from components.model.build import load_causal_lm
    for version, seed in ((1, 0), (2, 1)):
        folder = save_tiny_model(settings, tok, root / f"hf{version}", seed=seed)
        model, t = load_causal_lm(settings, str(folder))
        with tracking.stage_run(settings, "sft"):
            uri = tracking.log_hf_model(model, t)
        tracking.register_model(settings, uri, name, stage="sft")
    broken = root / "broken" / "model"   # config.json that no loader accepts: version 3 fails to load
    broken.mkdir(parents=True)
    (broken / "config.json").write_text('{"model_type": "llama", "hidden_size": "not a number"}')
    tracking.configure(settings)
    mlflow.MlflowClient().create_model_version(name, source=str(broken.parent))
    tracking.set_alias(settings, name, "champion", "1")
    tracking.set_alias(settings, name, "challenger", "2")
    for k in URI_VARS:
        os.environ.pop(k, None)
    return settings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(app, timeout: float = 120.0):
    """Serve app with uvicorn on 127.0.0.1:<free port> in a thread; yields the base URL once /readyz is 200."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(lambda: thread.is_alive(), base, timeout)
        yield base
    finally:
        server.should_exit = True
        thread.join(30)


def make_app(settings: cfg.Settings, keys=(KEY,), admin: str | None = ADMIN, no_auth: bool = False, **kw):
    from components.serving.app import create_app
    from components.serving.auth import KeyRing

    ring = KeyRing(keys=list(keys), admin_key=admin, enabled=not no_auth)
    return create_app(settings, ring, **kw)


def auth(key: str = KEY) -> dict:
    return {"Authorization": f"Bearer {key}"}


def wait_ready(alive, base: str, timeout_s: float = 180.0) -> None:
    """Until the server at base answers /readyz 200; AssertionError when it stops (alive: a Popen, or a callable
    that says whether it still runs) or times out."""
    import httpx

    is_alive = alive if callable(alive) else (lambda: alive.poll() is None)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert is_alive(), f"the server at {base} stopped before it was ready"
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"the server at {base} did not become ready in {timeout_s:.0f} s")
