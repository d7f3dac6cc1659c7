"""The deploy stage tells a running server (real uvicorn on loopback) that the champion moved."""
from __future__ import annotations

import os
import time

import httpx
import pytest

from components import tracking
from components.serving.notify import reload_server
from tests.serving.server_helpers import ADMIN, build_registry, free_port, make_app, running_server



def test_a_promotion_reaches_the_running_server(tmp_path, monkeypatch):
    settings = build_registry(tmp_path)
    with running_server(make_app(settings)) as base:
        monkeypatch.setenv("LLMCYCLE_SERVER_URL", base)
        monkeypatch.setenv("LLMCYCLE_ADMIN_KEY", "sk-wrong")
        assert "refused the reload (401)" in reload_server(settings)
        monkeypatch.setenv("LLMCYCLE_ADMIN_KEY", ADMIN)
        tracking.set_alias(settings, "llmcycle", "champion", "2")          # the gate promoted v2
        assert reload_server(settings) == f"server at {base} told to reload (202)"
        deadline, version = time.monotonic() + 60, None
        while time.monotonic() < deadline and version != "2":
            version = httpx.get(f"{base}/readyz", timeout=5).json().get("version")
            time.sleep(0.2)
        assert version == "2"
    # A server started on a fixed version keeps it when a promotion tells it to reload.
    with running_server(make_app(settings, model="models:/llmcycle/1")) as base:
        monkeypatch.setenv("LLMCYCLE_SERVER_URL", base)
        assert reload_server(settings) == f"server at {base} told to reload (202)"
        time.sleep(1.0)
        assert httpx.get(f"{base}/readyz", timeout=5).json().get("version") == "1"


def test_no_server_is_said_not_raised(tmp_path, monkeypatch):
    from tests.conftest import write_params
    from components import config as cfg

    write_params(tmp_path)
    monkeypatch.setenv("LLMCYCLE_SERVER_URL", f"http://127.0.0.1:{free_port()}")
    assert reload_server(cfg.load(tmp_path / "params.yaml"), timeout_s=2).startswith("no server at http://127.0.0.1:")


def _version(base: str, want: str, timeout: float = 60) -> str | None:
    deadline, version = time.monotonic() + timeout, None
    while time.monotonic() < deadline and version != want:
        version = httpx.get(f"{base}/readyz", timeout=5).json().get("version")
        time.sleep(0.2)
    return version


@pytest.mark.slow
def test_a_promotion_with_no_server_starts_one_in_the_background(tmp_path, monkeypatch):
    """A real detached `llmcycle serve --generate-key` process: started, ready, serving the champion with
    this machine's key, reloaded by the next promotion, stopped by `stop_server` (and in teardown)."""
    from components import config as cfg
    from components.serving import launcher
    from components.serving.notify import after_promotion

    for var in ("LLMCYCLE_SERVER_URL", "LLMCYCLE_API_KEYS", "LLMCYCLE_API_KEYS_FILE", "LLMCYCLE_ADMIN_KEY"):
        monkeypatch.delenv(var, raising=False)
    port = free_port()
    build_registry(tmp_path, {"serving": {"poll_interval_s": 0, "port": port, "start_on_promote": True}})
    config = str(tmp_path / "params.yaml")
    settings = cfg.load(config)
    try:
        started = after_promotion(settings, config, [])
        assert started["action"] == "started", started["message"]
        base = f"http://127.0.0.1:{port}"
        assert started["url"] == base and str(port) in started["message"]
        pid = int(launcher.pid_path(settings).read_text())
        assert pid == started["pid"] and os.getpgid(pid) == pid          # its own process group
        assert httpx.get(f"{base}/readyz", timeout=5).json()["version"] == "1"
        key = (tmp_path / "data" / "serving" / "api_keys").read_text().strip()   # made by --generate-key
        chat = httpx.post(f"{base}/v1/chat/completions", timeout=60, headers={"Authorization": f"Bearer {key}"},
                          json={"model": "llmcycle", "max_tokens": 4,
                                "messages": [{"role": "user", "content": "hi"}]})
        assert chat.status_code == 200 and chat.headers["X-Model-Version"] == "1"
        assert httpx.post(f"{base}/v1/chat/completions", timeout=60, json={"model": "llmcycle", "messages": [
            {"role": "user", "content": "hi"}]}).status_code == 401

        tracking.set_alias(settings, "llmcycle", "champion", "2")         # the next promotion: a reload
        again = after_promotion(settings, config, [])
        assert again["action"] == "reloaded", again["message"]
        assert _version(base, "2") == "2"
        assert launcher.stop_server(settings) == pid
        assert not launcher.pid_path(settings).exists() and launcher.running_pid(settings) is None
        assert after_promotion(settings.model_copy(update={"serving": settings.serving.model_copy(
            update={"start_on_promote": False})}), config, [])["action"] == "none"
    finally:
        launcher.stop_server(settings)


def test_a_server_that_cannot_start_is_reported_with_its_log(tmp_path, monkeypatch):
    from components import config as cfg
    from components.serving import launcher
    from components.serving.notify import after_promotion
    from tests.conftest import write_params

    monkeypatch.delenv("LLMCYCLE_SERVER_URL", raising=False)
    write_params(tmp_path, {"serving": {"port": free_port(), "start_on_promote": True}})
    config = str(tmp_path / "params.yaml")
    settings = cfg.load(config)
    try:
        out = after_promotion(settings, config, ["serving.quantize=int4"])     # the child's config is bad
        assert out["action"] == "start_failed"
        assert "exited (2) before it was ready" in out["message"] and "serving.quantize" in out["message"]
        assert launcher.log_path(settings).is_file() and launcher.running_pid(settings) is None
    finally:
        launcher.stop_server(settings)
