"""End-to-end tests share the session's one Prefect harness (prefect_harness, tests/conftest.py)."""
import pytest


@pytest.fixture(autouse=True)
def _under_prefect_harness(prefect_harness):  # noqa: ARG001 (requested for its side effect)
    pass
