"""The flows' tests all run under the session's one Prefect harness (prefect_harness, tests/conftest.py)."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _under_prefect_harness(prefect_harness):  # noqa: ARG001 (requested for its side effect)
    pass


def init_project(root: Path) -> None:
    """Make root a git + DVC project with the llmcycle pipeline (without the checkout's code deps)."""
    from components import config as cfg
    from components.data import dvc

    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run(["git", "config", "user.email", "t@example.com"], cwd=root, check=True)
    subprocess.run(["git", "config", "user.name", "test"], cwd=root, check=True)
    dvc.write_pipeline(root, code_deps=False)
    dvc.ensure_repo(cfg.load(root / "params.yaml"))
