"""dvc.yaml is generated from components/data/dvc.py; the committed file must match the generator.

Also the `resolve` stage's pieces without DVC: the resolved params (overrides, block size from the
preset or the scoping plan) and the source fingerprints (content, not paths or mtimes).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from components import config as cfg
from components.data import dvc, layout, resolve
from components.data.sources import fingerprint, resolve_source
from components.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def test_committed_dvc_yaml_matches_generator():
    assert yaml.safe_load((ROOT / "dvc.yaml").read_text()) == dvc.pipeline(code_deps=True)


def test_every_stage_reads_the_resolved_params_never_params_yaml():
    stages = dvc.pipeline()["stages"]
    assert list(stages) == ["resolve", "ingest", "validate", "tokenizer", "datasets"]
    assert stages["resolve"]["always_changed"] is True
    for name, stage in list(stages.items())[1:]:
        assert stage["cmd"] == f"llmcycle data {name} --config params.resolved.yaml"
        assert [list(p) for p in stage["params"]] == [["params.resolved.yaml"]]
    # The source and the resolved shape are deps: ingest on the corpus, datasets on block size + user pairs.
    assert "data/source/corpus.json" in stages["ingest"]["deps"]
    assert "data/source/finetune.json" in stages["datasets"]["deps"]
    assert "model.block_size" in stages["datasets"]["params"][0]["params.resolved.yaml"]


def test_resolved_params_apply_overrides_and_leave_the_remote_out(tiny_root):
    settings = cfg.load(tiny_root / "params.yaml", ["data.max_documents=7", "data.remote=elsewhere"])
    params = resolve.resolved_params(settings)
    assert params["data"]["max_documents"] == 7
    assert "remote" not in params["data"]  # moving the remote must not change the data hash
    assert params["tokenizer"]["vocab_size"] == 400


def test_block_size_comes_from_the_preset_or_the_scoping_plan(tiny_root):
    def block(*overrides):
        settings = cfg.load(tiny_root / "params.yaml", ["model.block_size=null", *overrides])
        return resolve.resolved_params(settings)["model"]["block_size"]

    assert block("model.preset=tiny") == 256
    assert block("model.preset=small") == 512
    plan = layout.scoping_dir(cfg.load(tiny_root / "params.yaml")) / "model.json"
    plan.parent.mkdir(parents=True)
    plan.write_text(json.dumps({"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 96}))
    assert block("model.preset=scoped") == 96
    assert block("model.preset=scoped", "model.block_size=64") == 64  # an explicit key still wins


def test_fingerprint_sees_content_not_mtime(tiny_settings, tiny_root):
    source = resolve_source(tiny_settings)
    first = fingerprint(source, tiny_settings)
    assert first["kind"] == "dir" and first["files"] == 40  # tests/ is excluded, as ingest does
    mod = source.path / "mod_000.py"
    os.utime(mod, (1, 1))
    assert fingerprint(source, tiny_settings) == first
    mod.write_text(mod.read_text() + "\nEXTRA = 1\n")
    assert fingerprint(source, tiny_settings)["sha256"] != first["sha256"]
    (source.path / "tests" / "test_skip.py").write_text("# excluded dirs do not count\n")
    (source.path / "notes.txt").write_text("not matched by the glob\n")
    assert fingerprint(source, tiny_settings)["files"] == 40


def test_stdlib_fingerprint_names_the_interpreter(tiny_root):
    import platform

    settings = cfg.load(tiny_root / "params.yaml", ["data.source=stdlib"])
    fp = fingerprint(resolve_source(settings), settings)
    assert platform.python_version() in fp["python"] and fp["files"] > 100


def test_run_writes_what_the_stages_read(tiny_settings, tiny_root):
    pairs = tiny_root / "sft.jsonl"
    pairs.write_text(json.dumps({"prompt": "p", "response": "r"}) + "\n")
    settings = cfg.load(tiny_root / "params.yaml", [f"data.sft_jsonl={pairs}"])
    resolve.run(settings)
    written = cfg.load(layout.resolved_params_path(settings))  # a valid config for `llmcycle data --config`
    assert written.root == tiny_root and written.data.sft_jsonl == str(pairs)
    finetune = json.loads(layout.fingerprint_path(settings, "finetune").read_text())
    assert finetune["sft_jsonl"] and finetune["preference_jsonl"] is None
    resolve.check_used(settings)
    with pytest.raises(Exception, match="data.max_documents"):
        resolve.check_used(cfg.load(tiny_root / "params.yaml", ["data.max_documents=3"]))


def test_overrides_travel_through_the_environment(tiny_root):
    env = resolve.stage_env(tiny_root / "params.yaml", ["data.source=stdlib", "model.preset=small"])
    assert resolve.from_env(env) == (str(tiny_root / "params.yaml"), ["data.source=stdlib", "model.preset=small"])
    assert resolve.from_env({}) == ("params.yaml", [])
    with pytest.raises(ConfigError, match="line break"):
        resolve.stage_env(None, ["data.source=dir:a\nb"])


def test_overrides_that_do_not_shape_the_data_leave_the_resolved_file_byte_identical(tiny_root):
    """Its hash is in dvc.lock, hence in the data hash: a training override must not move it."""
    def written(*overrides):
        settings = cfg.load(tiny_root / "params.yaml", list(overrides))
        resolve.run(settings)
        return layout.resolved_params_path(settings).read_bytes()

    plain = written()
    assert written("pretrain.lr=0.01", "data.remote=elsewhere", "model.n_layer=3") == plain
    assert written("data.max_documents=5") != plain


def test_jsonl_fingerprint_follows_the_file(tiny_root):
    corpus = tiny_root / "docs.jsonl"
    corpus.write_text(json.dumps({"text": "def f():\n    return 1\n" * 4}) + "\n")
    settings = cfg.load(tiny_root / "params.yaml", [f"data.source=jsonl:{corpus}"])
    first = fingerprint(resolve_source(settings), settings)
    assert first["kind"] == "jsonl" and first["files"] == 1
    corpus.write_text(corpus.read_text() + json.dumps({"text": "def g():\n    return 2\n" * 4}) + "\n")
    assert fingerprint(resolve_source(settings), settings)["sha256"] != first["sha256"]


def test_committed_dvc_lock_matches_the_code_it_hashes():
    """The committed dvc.lock must hold the current hash of components/data: a stale one makes a fresh clone's
    first `make run` rewrite it (a tracked file changed, every later version `git_dirty`). Fix: `dvc commit -f`
    after a `dvc repro`, or commit the dvc.lock a run wrote. Missing outputs (a fresh clone) are not the question."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    dvc_bin = Path(sys.executable).with_name("dvc")
    proc = subprocess.run([str(dvc_bin), "status", "--json"], cwd=root, capture_output=True, text=True,
                          env={**os.environ, "DVC_NO_ANALYTICS": "1"}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    status = json.loads(proc.stdout.strip().splitlines()[-1] or "{}")
    stale = sorted({f"{stage}: {path}" for stage, entries in status.items() for e in entries if isinstance(e, dict)
                    for path in (e.get("changed deps") or {}) if path.startswith("components/")})
    assert stale == [], f"dvc.lock is stale for {stale}; run `dvc commit -f` (or dvc repro) and commit dvc.lock"
