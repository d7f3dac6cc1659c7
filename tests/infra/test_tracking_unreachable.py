"""Fault: MLFLOW_TRACKING_URI points at no server, or at one that never answers. Every command that touches
tracking or the registry exits 1 within 30 s with one line naming the URI, and no traceback."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

COMMANDS = ("run", "promote", "serve", "monitor", "retrain", "schedule", "rollback")


def _llmcycle(root: Path, uri: str, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "LLMCYCLE_"))}
    env["MLFLOW_TRACKING_URI"] = uri
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "flows.cli", *args, "--config", str(root / "params.yaml")],
                       cwd=root, env=env, capture_output=True, text=True, timeout=120)
    return r, time.monotonic() - t0


def _one_clear_line(r: subprocess.CompletedProcess, uri: str) -> None:
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 1, r.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith(f"error: MLflow tracking server {uri} is unreachable"), lines
    assert "Traceback" not in r.stderr + r.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_a_refused_tracking_uri_fails_every_command_in_one_line(tiny_root, command):
    with socket.socket() as s:                      # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        uri = f"http://127.0.0.1:{s.getsockname()[1]}/"
    r, seconds = _llmcycle(tiny_root, uri, command)
    _one_clear_line(r, uri)
    assert seconds < 30


def test_a_tracking_server_that_never_answers_fails_within_the_request_timeout(tiny_root):
    """A listener that accepts connections and never replies (a hung server): the probe's timeout
    (registry.request_timeout_s, 10 s) ends it, not MLflow's default retries (minutes)."""
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(16)
        uri = f"http://127.0.0.1:{hung.getsockname()[1]}/"
        r, seconds = _llmcycle(tiny_root, uri, "run")
    _one_clear_line(r, uri)
    assert "timed out" in r.stderr and seconds < 30
