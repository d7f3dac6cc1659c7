"""Evaluate and deploy flows for real under the Prefect harness: a tiny project, a logged model, a
SQLite MLflow store; first candidate promoted, a regressed one rejected (a completed flow), rollback."""
from __future__ import annotations

import re

import pytest

from components import tracking
from components.errors import ConfigError
from components.evaluation import gate
from tests.unit.evaluation.test_evaluate import logged_model_uri, make_project

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _own_mlflow_store():
    """mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI; start each test on its own tmp store."""
    import os

    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        os.environ.pop(key, None)
    yield


def test_evaluate_then_deploy_promotes_then_rejects(tmp_path):
    from flows.deploy import deploy_flow, rollback_flow
    from flows.evaluate import evaluate_flow

    settings = make_project(tmp_path, reward=False)
    config, name = str(tmp_path / "params.yaml"), settings.registry.model_name
    uri = logged_model_uri(settings)
    with tracking.lifecycle_run(settings) as parent:
        ev = evaluate_flow(config, [], model_uri=uri)
        first = deploy_flow(config, [], ev["model_uri"], ev["metrics"], eval_run_id=ev["run_id"])
        # The same trained weights again: one training run is one version, and its decision stands.
        second = deploy_flow(config, [], ev["model_uri"], ev["metrics"])

    assert ev["model_uri"] == uri and ev["metrics"]["sft_bits_per_byte"] > 0
    assert first["decision"] == "promote" and first["champion"] == first["version"] == "1"
    assert first["scored"] == {"candidate": f"evaluate run {ev['run_id']}"}  # the gate reused evaluate's scores
    assert second["version"] == "1" and second["reused"] and second["decision"] == "promote"
    runs = tracking.child_runs(settings, parent.info.run_id)
    assert sorted(r.info.run_name for r in runs) == ["deploy", "deploy", "evaluate"]
    assert all(r.info.status == "FINISHED" for r in runs)
    mv = tracking.get_alias_version(settings, name, gate.CHAMPION)
    assert mv.tags["eval_run_id"] == ev["run_id"] and mv.tags["gate_decision"] == "promote"

    # `llmcycle promote --label`: the newest evaluate run of that label; an unknown label is a usage error.
    third = deploy_flow(config, [], label="candidate")
    assert third["version"] == "1" and third["reused"]
    with pytest.raises(ConfigError, match="no finished evaluate run of --label nope"):
        deploy_flow(config, [], label="nope")
    with pytest.raises(gate.GateError, match="previous"):
        rollback_flow(config, [])  # the first promotion had no champion before it

    # A worse challenger: the champion's weights with its logits scaled 30x (confidently wrong). The gate
    # rejects it on the primary, with the paired interval in the reason and on the version; v1 stays.
    worse = _worse_model_uri(settings)
    ev_worse = evaluate_flow(config, [], model_uri=worse, label="worse")
    rejected = deploy_flow(config, [], ev_worse["model_uri"], ev_worse["metrics"], eval_run_id=ev_worse["run_id"])
    assert ev_worse["metrics"]["sft_bits_per_byte"] > ev["metrics"]["sft_bits_per_byte"] + 1.0
    assert rejected["decision"] == "reject" and rejected["version"] == "2" and rejected["champion"] == "1"
    assert re.search(r"primary sft_bits_per_byte not better: candidate - champion = \+\d+\.\d{4} bits/byte, "
                     r"95% interval \[\+\d+\.\d{4}, \+\d+\.\d{4}\] over \d+ documents", rejected["reason"])
    assert str(tracking.get_alias_version(settings, name, gate.CHAMPION).version) == "1"
    import mlflow

    v2 = mlflow.MlflowClient().get_model_version(name, "2")
    assert v2.tags["gate_decision"] == "reject" and float(v2.tags["gate.sft_bits_per_byte.low"]) > 0


def _worse_model_uri(settings) -> str:
    from components.data import layout
    from components.model.build import load_causal_lm

    model, tok = load_causal_lm(settings, str(layout.checkpoints_dir(settings, "dpo") / "hf"))
    model.model.norm.weight.data *= 30.0
    with tracking.stage_run(settings, "sft"):
        return tracking.log_hf_model(model, tok)


def test_evaluate_flow_fails_fast_on_bad_uri(tmp_path):
    from flows.evaluate import evaluate_flow, is_transient

    make_project(tmp_path, reward=False)
    with pytest.raises(ConfigError, match="runs:/nope/model"):
        evaluate_flow(str(tmp_path / "params.yaml"), [], model_uri="runs:/nope/model")
    assert not is_transient(ConfigError("database is locked"))
    from mlflow.exceptions import MlflowException
    assert is_transient(MlflowException("(sqlite3.OperationalError) database is locked"))
    assert not is_transient(MlflowException("RESOURCE_DOES_NOT_EXIST: run nope"))
