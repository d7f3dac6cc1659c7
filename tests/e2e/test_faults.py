"""Faults an unattended pipeline meets, on a real tiny project with the real `llmcycle run`:
a second run started while one runs refuses at once, naming the first, and the first finishes with one
version; then a corrupt file added to the source stops the next run at validation, naming the expectation
and the file, with the registry and the champion as they were."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from components import config as cfg
from tests.flows.conftest import init_project

pytestmark = pytest.mark.slow

GITIGNORE = "data/\nmlflow/\ncheckpoints/\n.prefect/\ndvc-remote/\n"
SETS = ["--set", "pretrain.max_steps=4", "--set", "data.remote=dvc-remote"]


def _cmd(root: Path) -> list[str]:
    return [sys.executable, "-m", "flows.cli", "run", "--config", str(root / "params.yaml"), *SETS]


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}


def _versions(root: Path) -> tuple[list[str], str | None]:
    import mlflow

    from components import tracking

    settings = cfg.load(root / "params.yaml")
    tracking.configure(settings)
    client = mlflow.MlflowClient()
    versions = sorted(str(v.version) for v in client.search_model_versions("name='llmcycle'"))
    champion = tracking.get_alias_version(settings, "llmcycle", "champion")
    return versions, str(champion.version) if champion else None


def test_concurrent_runs_refuse_and_a_corrupt_source_file_stops_the_next_run(tiny_root):
    (tiny_root / ".gitignore").write_text(GITIGNORE)
    init_project(tiny_root)
    subprocess.run(["git", "add", "-A"], cwd=tiny_root, check=True)
    subprocess.run(["git", "commit", "-qm", "project"], cwd=tiny_root, check=True)
    lock = tiny_root / "data" / "lifecycle.lock"

    first = subprocess.Popen(_cmd(tiny_root), cwd=tiny_root, env=_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (lock.is_file() and lock.read_text().strip()):
        time.sleep(0.1)
    holder = json.loads(lock.read_text())
    assert holder["pid"] == first.pid and holder["flow"] == "lifecycle"
    second = subprocess.run(_cmd(tiny_root), cwd=tiny_root, env=_env(), capture_output=True, text=True,
                            timeout=120)
    assert first.poll() is None, "the first run ended before the second asked: the test proves nothing"
    assert second.returncode == 1, second.stderr[-2000:]
    lines = [line for line in second.stderr.splitlines() if line.strip()]
    assert lines == [f"error: another lifecycle is running in {tiny_root} (pid {holder['pid']} on "
                     f"{holder['host']} since {holder['since']}); wait for it to finish (this run started nothing)"]
    out, err = first.communicate(timeout=900)
    assert first.returncode == 0, err[-3000:]
    assert _versions(tiny_root) == (["1"], "1")
    assert yaml.safe_load((tiny_root / "dvc.lock").read_text())["stages"]["datasets"]["outs"]
    assert lock.read_text() == ""                                   # released

    # A corrupt file lands in the source before the next scheduled run: validation stops it, nothing moves.
    pkg = Path(cfg.load(tiny_root / "params.yaml").data.source.removeprefix("dir:"))
    (pkg / "controls.py").write_text("def f():\n    return 1\n" + "x = '\x01\x02\x03\x04\x05\x06\x07\x08'\n" * 20)
    bad = subprocess.run(_cmd(tiny_root), cwd=tiny_root, env=_env(), capture_output=True, text=True, timeout=900)
    assert bad.returncode == 1, bad.stderr[-3000:]
    assert "corpus validation failed (1 of" in bad.stderr
    assert "expect_column_values_to_be_between(non_printable_share, <=0.01): 1 row, e.g. id=dir:controls.py" \
        in bad.stderr, bad.stderr[-3000:]
    assert _versions(tiny_root) == (["1"], "1")
