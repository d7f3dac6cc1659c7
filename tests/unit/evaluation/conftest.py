"""Evaluation tests: isolate each test's MLflow store.

mlflow.set_tracking_uri (called by tracking.configure) exports MLFLOW_TRACKING_URI to os.environ,
and tracking.tracking_uri prefers that variable, so without this every later test in the session
would write into the first test's tmp store. Cleared before and after each test.
"""
import os

import pytest

_URI_VARS = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


@pytest.fixture(autouse=True)
def _fresh_mlflow_uri():
    saved = {k: os.environ.pop(k) for k in _URI_VARS if k in os.environ}
    yield
    for key in _URI_VARS:
        os.environ.pop(key, None)
    os.environ.update(saved)
