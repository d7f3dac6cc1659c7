"""The whole lifecycle for real in a temp git + DVC project: scope -> data -> pretrain -> sft -> dpo
-> evaluate -> gate, with a SQLite MLflow store and the Prefect test server. Then a re-run with the
same commit, data and params registers nothing new; a version left ungated (a crash between register
and gate) is gated by the next run; and `llmcycle rollback` with no previous champion exits 1,
moving nothing."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from components import config as cfg
from components import tracking
from tests.flows.conftest import init_project

pytestmark = pytest.mark.slow

GITIGNORE = "data/\nmlflow/\ncheckpoints/\n.prefect/\ndvc-remote/\n"


def _commit_all(root):
    subprocess.run(["git", "add", "-A"], cwd=root, check=True)
    subprocess.run(["git", "commit", "-qm", "project"], cwd=root, check=True)


def test_lifecycle_end_to_end(tiny_root):
    from flows.lifecycle import lifecycle

    (tiny_root / ".gitignore").write_text(GITIGNORE)
    init_project(tiny_root)
    _commit_all(tiny_root)
    config = str(tiny_root / "params.yaml")
    overrides = ["pretrain.max_steps=4", "data.remote=dvc-remote"]
    result = lifecycle(config, overrides)

    settings = cfg.load(config, overrides)
    runs = {r.info.run_name: r for r in tracking.child_runs(settings, result["lifecycle_run_id"])}
    assert {"scoping", "data", "pretrain", "sft", "dpo", "evaluate", "deploy"} <= set(runs)
    assert all(r.info.status == "FINISHED" for r in runs.values())

    # Registry: one version, champion (first candidate, criteria alone), lineage tags.
    import mlflow
    client = mlflow.MlflowClient()
    versions = client.search_model_versions("name='llmcycle'")
    assert len(versions) == 1
    mv = versions[0]
    assert result["deploy"]["decision"] == "promote"
    assert client.get_model_version_by_alias("llmcycle", "champion").version == mv.version
    for tag in ("git_commit", "data_hash", "params_hash", "parent_version", "gate_decision", "gate_reason"):
        assert tag in mv.tags, tag
    assert mv.tags["git_dirty"] == "false" and mv.tags["data_hash"] != "none"

    # Evaluation run: model vs the n-gram baseline, with table and plots.
    ev = runs["evaluate"]
    for metric in ("sft_bits_per_byte", "test_bits_per_byte", "baseline_kn3_sft_bits_per_byte",
                   "test_perplexity", "baseline_kn3_perplexity", "syntax_valid_rate", "int8_perplexity"):
        assert metric in ev.data.metrics, metric
    arts = {a.path for a in client.list_artifacts(ev.info.run_id, "plots")}
    assert {"plots/attention.png", "plots/lifecycle_losses.png"} <= arts

    # Lineage: the version names the run that trained its weights (the dpo run), not the deploy run.
    assert mv.tags["trained_run_id"] == runs["dpo"].info.run_id and mv.tags["stage"] == "dpo"
    assert mv.tags["params_hash"] == runs["dpo"].data.tags["params_hash"]

    # Prefect's Artifacts tab tells the same story: the plan, the data version, the evaluation and the gate.
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as pc:
        arts = pc.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["llmcycle-lifecycle"])))
    (art,) = [a for a in arts if f"| MLflow lifecycle run | {result['lifecycle_run_id']} |" in a.data]
    assert art.description == "gate promote v1" and "| gate | promote v1: no champion; success criteria met |" in art.data

    # Re-run: unchanged commit, data and params -> no duplicate version, DVC reuses the data.
    again = lifecycle(config, overrides)
    assert again["deploy"]["reused"] is True
    assert len(client.search_model_versions("name='llmcycle'")) == 1

    # A crash between register and gate leaves a version with no decision and no alias: the next run gates it.
    for key in ("gate_decision", "gate_reason"):
        client.delete_model_version_tag("llmcycle", mv.version, key)
    for alias in ("champion", "challenger"):
        client.delete_registered_model_alias("llmcycle", alias)
    regated = lifecycle(config, overrides)
    assert regated["deploy"]["reused"] is False and regated["deploy"]["decision"] == "promote"
    assert client.get_model_version_by_alias("llmcycle", "champion").version == mv.version
    assert len(client.search_model_versions("name='llmcycle'")) == 1

    # Rollback through the real CLI: no previous champion, so exit 1 naming it, and champion stays.
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "rollback", "--config", config],
                          cwd=tiny_root, capture_output=True, text=True, env=_cli_env(settings))
    assert proc.returncode == 1 and "no 'previous' alias" in proc.stderr, proc.stderr[-2000:]
    assert client.get_model_version_by_alias("llmcycle", "champion").version == mv.version


def _cli_env(settings) -> dict:
    """The CLI on the same store as this process (tracking_uri honours MLFLOW_TRACKING_URI)."""
    import os

    env = dict(os.environ)
    env["MLFLOW_TRACKING_URI"] = tracking.tracking_uri(settings)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    return env
