"""Fault: the `llmcycle serve` process is SIGKILLed while 8 clients stream. Every line of the request log still
parses (no torn line), each logged record is a whole finished completion, the interrupted requests are
absent or whole (a stream the server finished and logged just before the kill), never half-written, and a
restarted server serves again, appending to the same log."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from tests.serving.server_helpers import KEY, auth, build_registry, free_port, wait_ready

pytestmark = pytest.mark.slow


def _start(root, port: int) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    env["LLMCYCLE_API_KEYS"] = KEY
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", "--config", str(root / "params.yaml"),
                             "--port", str(port), "--set", "serving.rate_limit.requests_per_minute=100000",
                             "--set", "serving.rate_limit.tokens_per_minute=100000000"],
                            cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    wait_ready(proc, f"http://127.0.0.1:{port}", 120)
    return proc


def _log_lines(root) -> list[str]:
    return [line for p in sorted((root / "data" / "inference").glob("requests-*.jsonl"))
            for line in p.read_text().splitlines()]


def test_a_killed_server_leaves_a_whole_request_log_and_restarts(tmp_path):
    root = tmp_path / "proj"
    root.mkdir()
    build_registry(root)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = _start(root, port)
    body = {"model": "llmcycle", "prompt": "def f(", "max_tokens": 128, "temperature": 0, "stream": True}
    streaming, results = threading.Barrier(9), []

    def client(i: int) -> None:
        chunks, outcome = 0, "whole"
        try:
            with httpx.Client(timeout=60) as c, c.stream("POST", f"{base}/v1/completions", headers=auth(),
                                                         json=body) as r:
                for line in r.iter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        chunks += 1
                        if chunks == 2:
                            streaming.wait(30)     # every client is mid-stream before the kill
        except (httpx.HTTPError, threading.BrokenBarrierError):
            outcome = "cut"
        results.append((i, chunks, outcome))

    before = len(_log_lines(root))
    try:
        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        streaming.wait(60)
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(30)
        for t in threads:
            t.join(60)
        assert len(results) == 8 and all(not t.is_alive() for t in threads)
        cut = [r for r in results if r[2] == "cut"]
        assert cut, results                                   # the kill did land mid-stream
        lines = _log_lines(root)
        records = [json.loads(line) for line in lines]        # every line parses: no torn line
        new = records[before:]
        # What was logged is whole (a finished completion of all 128 tokens), never a half-written one.
        assert len(new) < 8
        assert all(r["finish_reason"] == "length" and r["completion_tokens"] == 128 for r in new), new

        server = _start(root, port)                           # restart: serves again, same log
        r = httpx.post(f"{base}/v1/completions", headers=auth(), timeout=60,
                       json={"model": "llmcycle", "prompt": "def f(", "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(_log_lines(root)) == len(lines):
            time.sleep(0.2)
        after = [json.loads(line) for line in _log_lines(root)]
        assert len(after) == len(lines) + 1 and after[-1]["id"] == r.json()["id"]
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(30)
