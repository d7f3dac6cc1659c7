"""Config: defaults validate, overrides coerce types, and every error names the key and the file."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from components import config as cfg
from components.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def tmp_path(tmp_path):
    """Every test here starts from an empty params.yaml (all defaults)."""
    (tmp_path / "params.yaml").write_text("")
    return tmp_path


def test_project_params_yaml_is_valid_and_has_every_stage_section():
    s = cfg.load(ROOT / "params.yaml")
    assert s.root == ROOT
    sections = {"scoping", "data", "tokenizer", "model", "pretrain", "finetune", "sft", "reward", "dpo", "ppo",
                "evaluate", "registry", "serving", "monitoring", "retrain", "schedule", "loop"}
    # The file itself names every stage section (not only the defaults behind it), and nothing else.
    written = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert set(written) == sections == set(cfg.Settings.model_fields)
    assert s.registry.model_name == "llmcycle"


def test_overrides_are_typed_and_nested(tmp_path):
    s = cfg.load(tmp_path / "params.yaml", ["pretrain.max_steps=50", "sft.lora.enabled=true",
                                           "evaluate.pass_k=[1, 8]", "data.source=jsonl:x.jsonl"])
    assert s.pretrain.max_steps == 50 and s.sft.lora.enabled is True
    assert s.evaluate.pass_k == [1, 8] and s.data.source == "jsonl:x.jsonl"


def test_unknown_key_in_file_names_key_and_file(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("pretrain:\n  max_stepz: 3\n")
    with pytest.raises(ConfigError) as err:
        cfg.load(p)
    assert "pretrain.max_stepz" in str(err.value) and "unknown key" in str(err.value)
    assert str(p) in str(err.value)


def test_wrong_type_via_set_names_key(tmp_path):
    with pytest.raises(ConfigError) as err:
        cfg.load(tmp_path / "params.yaml", ["pretrain.batch_size=lots"])
    assert "pretrain.batch_size" in str(err.value) and "--set" in str(err.value)


def test_bad_source_kind_and_malformed_set(tmp_path):
    with pytest.raises(ConfigError, match="data.source"):
        cfg.load(tmp_path / "params.yaml", ["data.source=http://x"])
    with pytest.raises(ConfigError, match="dotted.key=value"):
        cfg.load(tmp_path / "params.yaml", ["pretrain.max_steps"])


def test_invalid_yaml_names_line(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("data:\n  source: [unclosed\n")
    with pytest.raises(ConfigError, match=r"params.yaml:\d+"):
        cfg.load(p)


def test_missing_explicit_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        cfg.load(tmp_path / "other.yaml")


def test_model_shape_presets_overrides_and_scoped_choice(tmp_path):
    s = cfg.load(tmp_path / "params.yaml", ["model.preset=small", "model.n_layer=3"])
    shape = cfg.resolve_model_shape(s, vocab_size=1000)
    assert shape["n_layer"] == 3 and shape["n_embd"] == 384 and shape["vocab_size"] == 1000
    assert shape["intermediate_size"] == 1024  # 8/3 * 384 rounded to a multiple of 32
    scoped = cfg.load(tmp_path / "params.yaml")
    (tmp_path / "data" / "scoping").mkdir(parents=True)
    (tmp_path / "data" / "scoping" / "model.json").write_text(
        '{"n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 128, "intermediate_size": 160}')
    assert cfg.resolve_model_shape(scoped)["n_embd"] == 64
    with pytest.raises(ConfigError, match="divisible"):
        cfg.resolve_model_shape(cfg.load(tmp_path / "params.yaml", ["model.n_embd=30", "model.n_head=4"]))


def test_params_hash_changes_with_effective_params(tmp_path):
    a = cfg.load(tmp_path / "params.yaml")
    b = cfg.load(tmp_path / "params.yaml", ["pretrain.lr=0.1"])
    assert a.params_hash() == cfg.load(tmp_path / "params.yaml").params_hash() != b.params_hash()


def test_gate_settings_name_what_is_wrong(tmp_path):
    with pytest.raises(ConfigError, match=r"evaluate.tolerances: .*unknown gated metric\(s\) \['test_perplexity'\]"):
        cfg.load(tmp_path / "params.yaml", ["evaluate.tolerances={test_perplexity: 0.05}"])
    with pytest.raises(ConfigError, match=r"scoping.success.max_val_perplexity: unknown key"):
        cfg.load(tmp_path / "params.yaml", ["scoping.success.max_val_perplexity=80"])
    with pytest.raises(ConfigError, match=r"evaluate.primary_metric"):
        cfg.load(tmp_path / "params.yaml", ["evaluate.primary_metric=test_perplexity"])
