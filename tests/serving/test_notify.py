"""The deploy stage tells a running server (real uvicorn on loopback) that the champion moved."""
from __future__ import annotations

import time

import httpx
import pytest

from components import tracking
from components.serving.notify import reload_server
from tests.serving.server_helpers import ADMIN, build_registry, engine_available, free_port, make_app, running_server

pytestmark = pytest.mark.skipif(not engine_available(), reason="the serving engine is not importable")


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


def test_no_server_is_said_not_raised(tmp_path, monkeypatch):
    from tests.conftest import write_params
    from components import config as cfg

    write_params(tmp_path)
    monkeypatch.setenv("LLMCYCLE_SERVER_URL", f"http://127.0.0.1:{free_port()}")
    assert reload_server(cfg.load(tmp_path / "params.yaml"), timeout_s=2).startswith("no server at http://127.0.0.1:")
