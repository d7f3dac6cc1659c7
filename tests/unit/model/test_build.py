"""build_model shapes and parameter count; load_causal_lm from scratch, a folder, and its error cases."""
from __future__ import annotations

import pytest
import torch

from components import config as cfg
from components.errors import ConfigError
from components.model.build import build_model, count_parameters, load_causal_lm
from tests.unit.training.helpers import tiny_tokenizer, write_tiny_data

SHAPE = {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 64, "intermediate_size": 96, "vocab_size": 400}


def expected_params(s: dict) -> int:
    d, i, v, n = s["n_embd"], s["intermediate_size"], s["vocab_size"], s["n_layer"]
    per_layer = 4 * d * d + 3 * d * i + 2 * d   # q, k, v, o; gate, up, down; two RMSNorm gains
    return v * d + n * per_layer + d           # tied embedding counted once; final norm


def test_build_model_parameter_count_and_architecture():
    torch.manual_seed(0)
    model = build_model(SHAPE)
    assert count_parameters(model) == expected_params(SHAPE) == 39584
    assert model.lm_head.weight is model.model.embed_tokens.weight
    c = model.config
    assert c._attn_implementation == "sdpa" and c.hidden_act == "silu" and c.tie_word_embeddings
    assert c.rope_parameters["rope_type"] == "default"
    assert type(model.model.norm).__name__ == "LlamaRMSNorm"


def test_forward_shapes():
    model = build_model(SHAPE)
    ids = torch.randint(0, SHAPE["vocab_size"], (3, 17))                  # (B, T)
    assert model(input_ids=ids).logits.shape == (3, 17, SHAPE["vocab_size"])


def test_special_ids_come_from_the_tokenizer():
    tok = tiny_tokenizer()
    model = build_model(SHAPE, tok)
    assert model.config.pad_token_id == tok.pad_token_id == 1
    assert model.config.eos_token_id == tok.eos_token_id == 0
    assert set(model.generation_config.eos_token_id) == {0, tok.convert_tokens_to_ids("<|end|>")}


def test_count_parameters_trainable_only():
    model = build_model(SHAPE)
    for p in model.model.layers.parameters():
        p.requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == SHAPE["vocab_size"] * SHAPE["n_embd"] + SHAPE["n_embd"]


def test_scratch_uses_config_shape_and_data_tokenizer(tiny_settings):
    write_tiny_data(tiny_settings)
    model, tok = load_causal_lm(tiny_settings)
    assert len(tok) == 400 and model.config.vocab_size == 400
    m = tiny_settings.model
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (m.n_layer, m.n_embd)
    assert model.config.max_position_embeddings == m.block_size


def test_scratch_without_tokenizer_is_a_config_error(tiny_settings):
    with pytest.raises(ConfigError, match="tokenizer"):
        load_causal_lm(tiny_settings, "scratch")


def test_local_folder_round_trip(tiny_settings, tmp_path):
    tok = tiny_tokenizer()
    model = build_model(SHAPE, tok)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    loaded, loaded_tok = load_causal_lm(tiny_settings, str(tmp_path / "m"))
    ids = torch.randint(0, 400, (1, 9))
    assert torch.allclose(loaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-6)
    assert len(loaded_tok) == len(tok)


def test_missing_path_names_it_and_the_key(tiny_settings):
    with pytest.raises(ConfigError) as err:
        load_causal_lm(tiny_settings, "no/such/model")
    assert "model.init_from" in str(err.value) and "no/such/model" in str(err.value)


def test_folder_without_config_json(tiny_settings, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="config.json"):
        load_causal_lm(tiny_settings, str(tmp_path / "empty"))


def test_missing_registry_alias_is_a_config_error(tiny_settings):
    with pytest.raises(ConfigError) as err:
        load_causal_lm(tiny_settings, "models:/llmcycle@champion")
    assert "model.init_from" in str(err.value) and "models:/llmcycle@champion" in str(err.value)


def test_tokenizer_larger_than_embedding_says_both_sizes(tiny_settings, tmp_path):
    tok = tiny_tokenizer()
    small = build_model({**SHAPE, "vocab_size": 300}, tok)
    small.save_pretrained(tmp_path / "small")
    with pytest.raises(ConfigError) as err:
        load_causal_lm(tiny_settings, str(tmp_path / "small"), tokenizer=tok)
    assert "400" in str(err.value) and "300" in str(err.value)


def test_mismatched_special_ids(tiny_settings, tmp_path):
    tok = tiny_tokenizer()
    model = build_model(SHAPE, tok)
    model.config.pad_token_id = 7
    model.save_pretrained(tmp_path / "m")
    with pytest.raises(ConfigError, match="pad_token_id"):
        load_causal_lm(tiny_settings, str(tmp_path / "m"), tokenizer=tok)


def test_relative_init_from_resolves_against_the_project_root(tiny_root):
    tok = tiny_tokenizer()
    build_model(SHAPE, tok).save_pretrained(tiny_root / "models" / "base")
    tok.save_pretrained(tiny_root / "models" / "base")
    settings = cfg.load(tiny_root / "params.yaml", ["model.init_from=models/base"])
    model, _ = load_causal_lm(settings)
    assert model.config.hidden_size == SHAPE["n_embd"]
