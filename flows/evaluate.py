"""The evaluate flow: one task around components.evaluation.evaluate.run, retried on transient store errors.

Only MLflow/SQLite hiccups (a locked database, a dropped connection) are retried; a bad URI, a
tokenizer mismatch or missing data fail at once. Returns references and numbers, never a model.
"""
from __future__ import annotations

from prefect import flow, task

from components import config as cfg
from flows import run_names

# Messages of store errors worth a second try (SQLite under concurrent writers, a remote server blip).
TRANSIENT = ("database is locked", "temporarily unavailable", "timed out", "timeout", "connection",
             "502", "503", "504", "429")


def is_transient(exc: BaseException | None) -> bool:
    """True for MLflow / database / network errors that a retry can cure; never for our own errors."""
    from components.errors import ConfigError, DataError, TrackingError, TrainingError

    if exc is None or isinstance(exc, (ConfigError, DataError, TrainingError, TrackingError)):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    kinds = {t.__name__ for t in type(exc).__mro__}
    store = kinds & {"MlflowException", "RestException", "OperationalError", "RequestException"}
    return bool(store) and any(word in str(exc).lower() for word in TRANSIENT)


def retry_transient(task, task_run, state) -> bool:
    """Prefect retry_condition_fn: retry only when the task failed with a transient store error."""
    try:
        result = state.result(raise_on_failure=False)
    except Exception as exc:  # noqa: BLE001 - an unreadable result is itself the failure to judge
        result = exc
    return isinstance(result, BaseException) and is_transient(result)


@task(name="evaluate", task_run_name="evaluate-{label}", retries=2, retry_delay_seconds=5,
      retry_condition_fn=retry_transient)
def evaluate_task(config: str, overrides: list[str], model_uri: str | None = None, label: str = "candidate") -> dict:
    from components.evaluation import evaluate

    result = evaluate.run(cfg.load(config, overrides), model_uri, label)
    return {"run_id": result["run_id"], "model_uri": result["model_uri"], "metrics": result["metrics"]}


@flow(name="evaluate", log_prints=True, flow_run_name=run_names.evaluate_name)
def evaluate_flow(config: str = "params.yaml", overrides: list[str] | None = None, model_uri: str | None = None,
                  label: str = "candidate") -> dict:
    """Evaluate model_uri (default: the last fine-tuning stage's HF folder); {run_id, model_uri, metrics}."""
    result = evaluate_task(config, overrides or [], model_uri, label)
    m = result["metrics"]
    print(f"evaluate {result['model_uri']}: sft_bits_per_byte {m['sft_bits_per_byte']:.4g} "
          f"(KN3 {m['baseline_kn3_sft_bits_per_byte']:.4g}), test_bits_per_byte {m['test_bits_per_byte']:.4g} "
          f"(KN3 {m['baseline_kn3_test_bits_per_byte']:.4g}), syntax_valid_rate {m['syntax_valid_rate']:.3f}")
    return result
