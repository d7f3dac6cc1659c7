"""MLFLOW_TRACKING_URI as the one switch to a shared store: it stays in force for every call of the
process (not only the first), the embedded store still follows each project, and the HTTP retry bounds
are values MLflow's client can parse. Fast: SQLite stores named by the environment, no server.
"""
from __future__ import annotations

import pytest

from components import config as cfg
from components import tracking, tracking_http
from tests.conftest import write_params

HTTP_VARS = tuple(tracking_http.HTTP_ENV)


@pytest.fixture
def clean_env(monkeypatch):
    for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI") + HTTP_VARS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(tracking, "_LAST_SET_URI", None)
    yield monkeypatch
    tracking._LAST_SET_URI = None


def project(root):
    root.mkdir(parents=True, exist_ok=True)
    write_params(root)
    return cfg.load(root / "params.yaml")


def test_a_uri_the_environment_names_stays_in_force(clean_env, tmp_path):
    shared = f"sqlite:///{tmp_path / 'shared.db'}"
    clean_env.setenv("MLFLOW_TRACKING_URI", shared)
    settings = project(tmp_path / "p")
    for _ in range(2):  # the second call once fell back to the project's own SQLite file
        tracking.configure(settings)
        assert tracking.tracking_uri(settings) == shared
    assert not (tmp_path / "p" / "mlflow" / "mlflow.db").exists()


def test_without_the_variable_each_project_keeps_its_own_store(clean_env, tmp_path):
    a, b = project(tmp_path / "a"), project(tmp_path / "b")
    for settings in (a, a, b):
        tracking.configure(settings)
        assert tracking.tracking_uri(settings) == f"sqlite:///{settings.path('mlflow', 'mlflow.db').resolve()}"


def test_retry_bounds_are_integers_mlflow_parses(clean_env, tmp_path):
    from mlflow import environment_variables as ev

    settings = project(tmp_path / "p")
    settings.registry.request_backoff_factor = 0.5
    settings.registry.request_timeout_s = 7.5
    tracking_http.bound_http_retries(settings)
    assert ev.MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR.get() == 1
    assert ev.MLFLOW_HTTP_REQUEST_TIMEOUT.get() == 8
    assert ev.MLFLOW_HTTP_REQUEST_MAX_RETRIES.get() == settings.registry.request_max_retries
