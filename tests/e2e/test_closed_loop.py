"""The closed loop for real at tiny settings, started as a user starts it: `llmcycle run --loop` in a temp git +
DVC project on stdlib files. It starts its own Prefect server and `llmcycle schedule` child, serves the champion,
sends baseline and drifted traffic over HTTP, detects the drift, and the drift event's trigger runs the real
retrain deployment; the gate promotes and the server swaps. A second project whose gate rejects v1 ends with
`loop not closed` and its documented exit code."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from components import config as cfg
from components import tracking
from flows.loop import NOT_CLOSED
from tests.flows.conftest import init_project
from tests.serving.server_helpers import free_port

pytestmark = pytest.mark.slow

GITIGNORE = "data/\nmlflow/\ncheckpoints/\n.prefect/\ndvc-remote/\n"
# Tiny and quick, yet every part real: 30-request windows (monitoring.min_window), a retrain long enough to learn
# the drifted domain's template, rate limits out of the way of the traffic.
LOOP_SET = ["pretrain.max_steps=4", "data.remote=dvc-remote", "data.source=stdlib", "data.max_documents=60",
            "monitoring.window=30", "loop.baseline_requests=30", "loop.drift_requests=30",
            "retrain.min_new_documents=5", "retrain.sft_max_steps=40", "retrain.lr_scale=1",
            "retrain.align_max_steps=2", "serving.rate_limit.requests_per_minute=100000",
            "serving.rate_limit.tokens_per_minute=100000000", "loop.retrain_timeout_s=600"]


def _project(root: Path) -> str:
    (root / ".gitignore").write_text(GITIGNORE)
    init_project(root)
    subprocess.run(["git", "add", "-A"], cwd=root, check=True)
    subprocess.run(["git", "commit", "-qm", "project"], cwd=root, check=True)
    return str(root / "params.yaml")


def _llmcycle(root: Path, *args: str, timeout: int = 1200) -> subprocess.CompletedProcess:
    """The real command in its own process, as a user runs it: no Prefect API set (the loop starts its own
    server under the project's .prefect), the project's own SQLite MLflow store."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "PREFECT_API_URL") and not k.startswith("LLMCYCLE_")}
    env["PREFECT_HOME"] = str(root / ".prefect")
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=root, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _sets(items: list[str]) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def test_the_loop_closes_and_the_server_answers_from_the_new_version(tiny_root):
    config = _project(tiny_root)
    port = free_port()
    items = [*LOOP_SET, f"serving.port={port}"]
    try:
        r = _llmcycle(tiny_root, "run", "--loop", "--config", config, *_sets(items))
        out = r.stdout + r.stderr
        assert r.returncode == 0, out[-4000:]
        verdict = next(line for line in r.stdout.splitlines() if line.startswith("loop "))
        assert verdict.startswith("loop closed: v1 -> v2 serving (retrain promoted v2: sft_drifted_bits_per_byte "
                                  "improved"), out[-4000:]
        # The server the loop started answers from the new champion.
        base = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{base}/readyz", timeout=10).json()["version"] == "2"
        settings = cfg.load(config, items)
        from components.monitoring.traffic import default_key

        answer = httpx.post(f"{base}/v1/completions", headers={"Authorization": f"Bearer {default_key(settings)}"},
                            timeout=60,
                            json={"model": "llmcycle", "prompt": "def f(", "max_tokens": 4}).json()
        assert answer["system_fingerprint"] == "llmcycle-v2"
        champion = tracking.get_alias_version(settings, settings.registry.model_name, "champion")
        assert str(champion.version) == "2" and champion.tags["gate_decision"] == "promote"
        # The retrain was the deployment's run, started by the drift event's automation, not by the loop.
        assert "started by AUTOMATION" in out, out[-4000:]
    finally:
        _llmcycle(tiny_root, "serve", "--stop", "--config", config, *_sets([f"serving.port={port}"]), timeout=60)


def test_a_loop_with_no_champion_is_not_closed_and_exits_with_its_code(tiny_root):
    config = _project(tiny_root)
    # A gate no tiny model can pass: every completion must parse.
    items = [*LOOP_SET, f"serving.port={free_port()}", "scoping.success.min_syntax_valid_rate=1.0"]
    r = _llmcycle(tiny_root, "run", "--loop", "--config", config, *_sets(items))
    out = r.stdout + r.stderr
    assert r.returncode == NOT_CLOSED["no_champion"] == 3, out[-4000:]
    verdict = next(line for line in r.stdout.splitlines() if line.startswith("loop "))
    assert verdict.startswith("loop not closed: no champion to serve (the lifecycle's gate: reject v1:"), verdict
