"""The CLI's contract: fast --help, one-line errors naming the key/path, exit 2 for usage, 1 for failures."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from flows.cli import app

pytestmark = pytest.mark.usefixtures("restored_environ")    # the CLI runs in this process
runner = CliRunner()


def _invoke(*args: str):
    return runner.invoke(app, list(args))


def test_help_is_fast_and_lists_the_stages():
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and time.perf_counter() - t0 < 10  # generous: the real figure is ~0.2 s
    for command in ("run", "scope", "data", "train", "evaluate", "promote", "rollback", "ui"):
        assert command in proc.stdout
    # The reason --help is fast: no heavy import at the CLI's top level.
    heavy = subprocess.run([sys.executable, "-c", "import sys, flows.cli; print(sorted(m for m in "
                            "('mlflow', 'lightning', 'great_expectations', 'prefect', 'torch') if m in sys.modules))"],
                           capture_output=True, text=True)
    assert heavy.stdout.strip() == "[]"


def test_unknown_key_exits_2_naming_the_key(tiny_root):
    r = _invoke("data", "ingest", "--config", str(tiny_root / "params.yaml"), "--set", "data.sourse=stdlib")
    assert r.exit_code == 2
    assert "data.sourse" in r.output and "unknown key" in r.output


def test_missing_source_path_exits_2_naming_it(tiny_root):
    r = _invoke("data", "ingest", "--config", str(tiny_root / "params.yaml"), "--set", "data.source=dir:nowhere")
    assert r.exit_code == 2
    assert "nowhere" in r.output and "data.source" in r.output
    assert not (tiny_root / "data" / "raw" / "corpus.jsonl").exists()


def test_bad_jsonl_exits_1_naming_file_and_line(tiny_root):
    bad = tiny_root / "bad.jsonl"
    bad.write_text(json.dumps({"text": "def f():\n    return 1\n" * 5}) + "\n{not json\n")
    r = _invoke("data", "ingest", "--config", str(tiny_root / "params.yaml"), "--set", f"data.source=jsonl:{bad}")
    assert r.exit_code == 1
    assert "bad.jsonl:2" in r.output
    assert not (tiny_root / "data" / "raw" / "corpus.jsonl").exists()


def test_failed_validation_exits_1_naming_the_expectation(tiny_root):
    cfg = str(tiny_root / "params.yaml")
    assert _invoke("data", "ingest", "--config", cfg).exit_code == 0
    r = _invoke("data", "validate", "--config", cfg, "--set", "data.min_total_chars=999999999")
    assert r.exit_code == 1
    assert "expect_column_sum_to_be_between" in r.output


def test_model_path_that_does_not_exist_exits_2(tiny_root):
    cfg = str(tiny_root / "params.yaml")
    for step in ("ingest", "tokenizer", "datasets"):
        assert _invoke("data", step, "--config", cfg).exit_code == 0, step
    r = _invoke("train", "sft", "--config", cfg, "--set", "model.init_from=/definitely/not/here")
    assert r.exit_code == 2
    assert "/definitely/not/here" in r.output
