"""The data flow for real: git + DVC temp project, `dvc repro` of the four stages, a SQLite MLflow
store, nested under a lifecycle run, with GE artifacts and dvc.lock hashes on the `data` run."""
from __future__ import annotations

import json

import pytest

from components import config as cfg
from components import tracking
from components.errors import DataError
from tests.flows.conftest import init_project

pytestmark = pytest.mark.slow


def _runs_by_name(settings, parent_id):
    return {r.info.run_name: r for r in tracking.child_runs(settings, parent_id)}


def test_data_flow_versions_validates_and_records(tiny_root):
    from flows.data import data_flow

    init_project(tiny_root)
    settings = cfg.load(tiny_root / "params.yaml")
    with tracking.lifecycle_run(settings) as parent:
        result = data_flow(str(tiny_root / "params.yaml"), [])
    runs = _runs_by_name(settings, parent.info.run_id)
    data_run = runs["data"]
    assert data_run.info.status == "FINISHED"
    assert data_run.data.tags["stage"] == "data"
    lock_hashes = tracking.dvc_lock_hashes(tiny_root)
    assert {"data/raw", "data/processed/tokens", "data/processed/sft"} <= set(lock_hashes)
    assert data_run.data.tags["dvc.data/raw"] == lock_hashes["data/raw"]
    assert data_run.data.tags["data_hash"] == result["data_hash"] != "none"
    assert data_run.data.metrics["ingest.documents"] > 10

    import mlflow
    client = mlflow.MlflowClient()
    arts = {a.path for a in client.list_artifacts(data_run.info.run_id, "validation/corpus")}
    assert "validation/corpus/result.json" in arts
    assert any("data_docs" in a for a in arts)
    assert (tiny_root / "data" / "processed" / "tokenizer" / "tokenizer.json").exists()
    meta = json.loads((tiny_root / "data" / "processed" / "tokens" / "meta.json").read_text())
    assert meta["tokens"]["train"] > 0
    # Unchanged code, data and params: dvc status is clean and a second repro reuses everything.
    from components.data import dvc
    assert dvc.status_clean(settings)
    out = dvc.repro(settings)
    assert "didn't change" in out or "Skipping" in out or "up to date" in out
    # `llmcycle data push` sends the versioned data to the local remote.
    remote = dvc.push(settings)
    assert remote == dvc.remote_path(settings)
    assert sum(1 for p in remote.rglob("*") if p.is_file()) >= len(lock_hashes)


def test_data_flow_stops_on_failed_validation(tiny_root):
    from flows.data import data_flow

    # Corrupt the source: a file with a NUL byte passes ingest's UTF-8 check only if NUL were kept;
    # instead demand more data than there is, which the corpus suite must reject by name.
    (tiny_root / "params.yaml").write_text((tiny_root / "params.yaml").read_text().replace(
        "min_total_chars: 2000", "min_total_chars: 100000000"))
    init_project(tiny_root)
    settings = cfg.load(tiny_root / "params.yaml")
    with pytest.raises(DataError) as err:
        with tracking.lifecycle_run(settings) as parent:
            data_flow(str(tiny_root / "params.yaml"), [])
    assert "expect_column_sum_to_be_between" in str(err.value) or "total" in str(err.value)
    data_run = _runs_by_name(settings, parent.info.run_id)["data"]
    assert data_run.info.status == "FAILED"
    assert not (tiny_root / "data" / "processed" / "tokenizer" / "tokenizer.json").exists()
