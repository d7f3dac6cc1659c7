"""dvc.yaml is generated from components/data/dvc.py; the committed file must match the generator."""
from __future__ import annotations

from pathlib import Path

import yaml

from components.data import dvc

ROOT = Path(__file__).resolve().parents[2]


def test_committed_dvc_yaml_matches_generator():
    assert yaml.safe_load((ROOT / "dvc.yaml").read_text()) == dvc.pipeline(code_deps=True)


def test_every_stage_is_an_llmcycle_data_command_with_params():
    stages = dvc.pipeline()["stages"]
    assert list(stages) == ["ingest", "validate", "tokenizer", "datasets"]
    for name, stage in stages.items():
        assert stage["cmd"] == f"llmcycle data {name}"
        assert stage["params"]
