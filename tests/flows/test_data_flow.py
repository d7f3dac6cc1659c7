"""The data flow for real: git + DVC temp project, `dvc repro` of the four stages, a SQLite MLflow
store, nested under a lifecycle run, with GE artifacts and dvc.lock hashes on the `data` run."""
from __future__ import annotations

import json
import re
from pathlib import Path

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
    """Corrupt files in the source: a text file full of control characters fails the corpus suite's one
    non-printable expectation, which names that file's id; the empty and the binary file are dropped by
    ingest (too_short, not_utf8), counted in its report. Nothing downstream is built; the data run FAILED."""
    from flows.data import data_flow

    pkg = Path(cfg.load(tiny_root / "params.yaml").data.source.removeprefix("dir:"))
    (pkg / "controls.py").write_text("def f():\n    return 1\n" + "x = '\x01\x02\x03\x04\x05\x06\x07\x08'\n" * 20)
    (pkg / "empty.py").write_text("")
    (pkg / "blob.py").write_bytes(bytes(range(128, 256)) * 8)
    init_project(tiny_root)
    settings = cfg.load(tiny_root / "params.yaml")
    with pytest.raises(DataError) as err:
        with tracking.lifecycle_run(settings) as parent:
            data_flow(str(tiny_root / "params.yaml"), [])
    message = str(err.value)
    assert re.search(r"corpus validation failed \(1 of \d+ expectations\)", message), message
    failed = re.search(r"expect_column_values_to_be_between\(non_printable_share, <=0\.01\): 1 row, e\.g\. "
                       r"id=(\S+) \((\d+\.\d)% non-printable\)", message)
    assert failed and failed.group(1) == "dir:controls.py", message
    assert float(failed.group(2)) > 1.0
    ingest = _report(tiny_root, "ingest")
    assert ingest["dropped"]["too_short"] == 1 and ingest["dropped"]["not_utf8"] == 1
    data_run = _runs_by_name(settings, parent.info.run_id)["data"]
    assert data_run.info.status == "FAILED"
    assert not (tiny_root / "data" / "processed" / "tokenizer" / "tokenizer.json").exists()


# ----------------------------------------------------------------------------- data versions see their source
def _ran(output: str) -> set[str]:
    """The stages `dvc repro` ran (the always-changed `resolve` included)."""
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")}


def _report(root, stage: str) -> dict:
    return json.loads((root / "data" / "reports" / f"{stage}.json").read_text())


def test_editing_a_dir_source_reruns_ingest_and_changes_the_data_hash(tiny_root, tiny_settings):
    from components.data import dvc

    init_project(tiny_root)
    assert _ran(dvc.repro(tiny_settings)) == {"resolve", "ingest", "validate", "tokenizer", "datasets"}
    before = tracking.data_hash(tiny_root)
    # A touched file is not a changed corpus: the fingerprint hashes content, so nothing reruns.
    mod = tiny_root / "corpus" / "pkg" / "mod_003.py"
    import os
    os.utime(mod, (1, 1))
    assert _ran(dvc.repro(tiny_settings)) == {"resolve"}
    assert tracking.data_hash(tiny_root) == before
    mod.write_text(mod.read_text() + '\n\ndef added_helper(x):\n    """Return x doubled."""\n    return 2 * x\n')
    assert "ingest" in _ran(dvc.repro(tiny_settings))
    assert tracking.data_hash(tiny_root) != before
    assert "added_helper" in (tiny_root / "data" / "raw" / "corpus.jsonl").read_text()


def test_changing_the_model_preset_reruns_datasets_only(tiny_root, tiny_settings):
    from components.data import dvc

    init_project(tiny_root)
    # The tiny config pins block_size; unpin it so the preset decides (tiny 256, small 512).
    dvc.repro(tiny_settings, overrides=["model.block_size=null", "model.preset=tiny"])
    assert _report(tiny_root, "datasets")["block_size"] == 256
    before = tracking.dvc_lock_hashes(tiny_root)
    out = dvc.repro(tiny_settings, overrides=["model.block_size=null", "model.preset=small"])
    assert _ran(out) == {"resolve", "datasets"}
    assert _report(tiny_root, "datasets")["block_size"] == 512
    after = tracking.dvc_lock_hashes(tiny_root)
    assert after["data/raw"] == before["data/raw"] and after["data/processed/tokenizer"] == before["data/processed/tokenizer"]


def test_set_data_source_reaches_the_stages_and_names_the_data(tiny_root):
    from flows.data import data_flow
    from tests.corpus_factory import write_corpus_dir

    other = write_corpus_dir(tiny_root / "mine", n_modules=23, seed=7)
    params_before = (tiny_root / "params.yaml").read_bytes()
    init_project(tiny_root)
    config = str(tiny_root / "params.yaml")
    default = data_flow(config, [])
    assert default["stats"]["ingest"]["documents"] == 40

    result = data_flow(config, [f"data.source=dir:{other}"])
    ingest = result["stats"]["ingest"]
    assert ingest["source"] == f"dir:{other}" and ingest["read"] == ingest["documents"] == 23
    assert result["data_hash"] != default["data_hash"]
    # params.yaml is untouched; dvc.lock records the source the stages really read.
    assert (tiny_root / "params.yaml").read_bytes() == params_before
    lock = (tiny_root / "dvc.lock").read_text()
    assert f"dir:{other}" in lock and f"dir:{tiny_root / 'corpus' / 'pkg'}" not in lock
    # Back to the configured source: the same data, the same hash as the first run.
    assert data_flow(config, [])["data_hash"] == default["data_hash"]


def test_plain_dvc_repro_in_a_fresh_clone_reproduces_the_committed_lock(tiny_root, tiny_settings, tmp_path_factory):
    """No llmcycle, no environment: `dvc repro` resolves params.yaml itself and rewrites dvc.lock identically."""
    import os
    import subprocess
    import sys

    from components.data import dvc

    (tiny_root / ".gitignore").write_text("data/\nmlflow/\n.prefect/\nparams.resolved.yaml\n")
    init_project(tiny_root)
    dvc.repro(tiny_settings)
    subprocess.run(["git", "add", "-A"], cwd=tiny_root, check=True)
    subprocess.run(["git", "commit", "-qm", "data"], cwd=tiny_root, check=True)
    clone = tmp_path_factory.mktemp("clone") / "project"
    subprocess.run(["git", "clone", "-q", str(tiny_root), str(clone)], check=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMCYCLE_")}
    env["PATH"] = f"{os.path.dirname(sys.executable)}{os.pathsep}{env['PATH']}"
    proc = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=clone, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=clone,
                          capture_output=True, text=True).stdout == ""
