"""`llmcycle serve` as a user runs it: a subprocess on a free loopback port over a tiny registry."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from components.serving.auth import ADMIN_ENV, KEYS_ENV
from tests.serving.server_helpers import build_registry, free_port

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "flows.cli"]


def env(**extra) -> dict:
    e = {k: v for k, v in os.environ.items() if k not in (KEYS_ENV, ADMIN_ENV, "LLMCYCLE_API_KEYS_FILE")}
    return {**e, "PYTHONPATH": str(ROOT), **extra}


def test_serve_refuses_without_keys(tmp_path):
    from tests.conftest import write_params

    write_params(tmp_path)
    r = subprocess.run([*CLI, "serve", "--config", str(tmp_path / "params.yaml")], cwd=ROOT, env=env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--no-auth" in r.stderr


def test_serve_on_cuda_without_a_gpu_is_one_line_and_exit_2(tmp_path):
    import torch

    from tests.conftest import write_params

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    write_params(tmp_path)
    r = subprocess.run([*CLI, "serve", "--config", str(tmp_path / "params.yaml"), "--no-auth",
                        "--set", "serving.device=cuda"], cwd=ROOT, env=env(), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "serving.device is cuda but torch sees no GPU" in r.stderr
    assert "Traceback" not in r.stderr


def test_serve_answers_with_generated_key(tmp_path):
    settings = build_registry(tmp_path)
    port = free_port()
    proc = subprocess.Popen([*CLI, "serve", "--config", str(settings.root / "params.yaml"), "--port", str(port),
                             "--generate-key"], cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        key = None
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if key is None:
                line = proc.stdout.readline()
                if line.startswith("API key for this machine:"):
                    key = line.split(":", 1)[1].strip()
                continue
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        assert key and key == (settings.root / "data" / "serving" / "api_keys").read_text().strip()
        r = httpx.post(f"{base}/v1/completions", headers={"Authorization": f"Bearer {key}"}, timeout=60,
                       json={"model": "llmcycle", "prompt": "def f(", "max_tokens": 3, "temperature": 0})
        assert r.status_code == 200 and r.json()["system_fingerprint"] == "llmcycle-v1"
        assert httpx.post(f"{base}/v1/completions", json={"model": "llmcycle", "prompt": "a"}).status_code == 401
        # A hard kill of the server: the records already written stay whole and readable.
        rid = r.json()["id"]
        logs = settings.root / "data" / "inference"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any(rid in f.read_text() for f in logs.glob("*.jsonl")):
            time.sleep(0.05)
        proc.kill()
        proc.wait(30)
        rows = [json.loads(ln) for f in logs.glob("requests-*.jsonl") for ln in f.read_text().splitlines()]
        assert [row["id"] for row in rows if row["id"] == rid] == [rid]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
