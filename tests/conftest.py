"""Shared fixtures: tiny settings rooted in a temp project, tiny corpora, offline/quiet env.

Every test gets its own project root (tmp_path) so the MLflow store, data/ and DVC never touch the
checkout. Prefect tests share one session-scoped prefect_test_harness (prefect_harness below: defined
once here and requested by name, never imported into a test module, which would start a second one).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from components import config as cfg
from components.tracking import quiet_env
from tests.corpus_factory import write_corpus_dir

quiet_env()
os.environ.pop("MLFLOW_TRACKING_URI", None)

TINY = {
    "data": {"min_total_chars": 2000, "split": {"val": 0.1, "test": 0.1}},
    "tokenizer": {"vocab_size": 400, "min_frequency": 2},
    "model": {"preset": "tiny", "n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 256},
    "scoping": {"budget_minutes": 0.05, "min_params": 1000, "measure_steps": 1,
                "success": {"beat_baseline": "none", "min_syntax_valid_rate": 0.0}},
    "pretrain": {"max_steps": 4, "batch_size": 4, "val_every": 2, "ckpt_every": 2, "val_batches": 2,
                 "warmup_steps": 1, "accelerator": "cpu"},
    "sft": {"max_steps": 3, "batch_size": 2, "val_every": 2, "ckpt_every": 2, "val_batches": 1,
            "warmup_steps": 1, "accelerator": "cpu"},
    "reward": {"max_steps": 3, "batch_size": 2, "val_every": 2, "ckpt_every": 2, "val_batches": 1,
               "warmup_steps": 1, "accelerator": "cpu"},
    "dpo": {"max_steps": 3, "batch_size": 2, "val_every": 2, "ckpt_every": 2, "val_batches": 1,
            "warmup_steps": 1, "accelerator": "cpu"},
    "ppo": {"max_steps": 2, "rollout_batch": 2, "max_new_tokens": 8, "accelerator": "cpu", "warmup_steps": 1},
    "evaluate": {"n_prompts": 4, "max_new_tokens": 16, "test_batches": 2, "pass_k": [1, 2]},
}


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def write_params(root: Path, extra: dict | None = None) -> Path:
    """A params.yaml for a tiny project at root (TINY merged with extra)."""
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(_merge(TINY, extra or {}), sort_keys=False))
    return path


@pytest.fixture
def tiny_root(tmp_path: Path) -> Path:
    """A temp project root with a tiny Python corpus at corpus/pkg and a params.yaml pointing at it."""
    pkg = write_corpus_dir(tmp_path / "corpus")
    write_params(tmp_path, {"data": {"source": f"dir:{pkg}"}})
    return tmp_path


@pytest.fixture
def tiny_settings(tiny_root: Path) -> cfg.Settings:
    return cfg.load(tiny_root / "params.yaml")


def restart_events_worker() -> None:
    """Stop Prefect's in-process EventsWorker (and its log workers) so the next event starts a fresh one on
    the Prefect API in force now: the singleton is keyed by client type, not URL, so once started it keeps
    sending to the server that was current then, even after that server stops."""
    from prefect.events.worker import EventsWorker

    EventsWorker.drain_all(timeout=30, at_exit=False)


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory):
    """One Prefect test harness (temporary server + database) for the whole session: no xdist (TRAPS.md).
    Requested by name (tests/flows and tests/e2e conftests: autouse; monitoring modules: usefixtures)."""
    saved = {k: os.environ.get(k) for k in ("PREFECT_HOME", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS")}
    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect_home"))
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    from prefect.testing.utilities import prefect_test_harness

    try:
        with prefect_test_harness(server_startup_timeout=120):
            restart_events_worker()          # events go to this harness, not a server an earlier test had
            yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def restored_environ():
    """os.environ as it was before the test. For in-process CLI calls (CliRunner): the CLI sets process-wide
    defaults for itself (PREFECT_LOGGING_LEVEL=WARNING, PREFECT_HOME...) that must not reach later tests'
    child processes (a Prefect worker started with WARNING prints none of its flow runs' logs)."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
