"""End-to-end tests share the flows' session Prefect harness."""
from tests.flows.conftest import prefect_harness  # noqa: F401  (session-scoped, autouse)
