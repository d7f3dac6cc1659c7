"""One Prefect test harness (temporary server + database) for the whole session: no xdist (TRAPS.md)."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def prefect_harness(tmp_path_factory):
    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect_home"))
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def init_project(root: Path) -> None:
    """Make root a git + DVC project with the llmcycle pipeline (without the checkout's code deps)."""
    from components import config as cfg
    from components.data import dvc

    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run(["git", "config", "user.email", "t@example.com"], cwd=root, check=True)
    subprocess.run(["git", "config", "user.name", "test"], cwd=root, check=True)
    dvc.write_pipeline(root, code_deps=False)
    dvc.ensure_repo(cfg.load(root / "params.yaml"))
