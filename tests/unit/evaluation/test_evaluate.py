"""Evaluation stage and promotion on a tiny project: a random-init tiny Llama, tiny token arrays and
SFT/preference files written straight into the layout paths, a real SQLite MLflow store in tmp_path.
One evaluation is shared by the metric/artifact tests (module fixture); promotion uses fixed metrics.
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
from pathlib import Path

import pytest

from components import config as cfg
from components import tracking
from components.data import layout
from components.errors import ConfigError
from components.evaluation import evaluate, gate, promotion
from tests.conftest import write_params

URI_VARS = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
GOOD = {"test_perplexity": 50.0, "syntax_valid_rate": 0.5, "defines_name_rate": 0.4, "pass_at_1": 0.3}
WORSE = {"test_perplexity": 80.0, "syntax_valid_rate": 0.2, "defines_name_rate": 0.1, "pass_at_1": 0.1}


# ----------------------------------------------------------------------------- tiny project
def write_finetune_sets(settings: cfg.Settings) -> None:
    """sft/ and preference/ {train,test}.jsonl from the test corpus's functions (as the data stage does)."""
    from components.data.functions import extract_functions, make_pairs
    from tests.unit.training.helpers import _texts

    texts = list(_texts())
    for split, docs in (("train", texts[:-6]), ("test", texts[-6:])):
        fns = [f for i, t in enumerate(docs) for f in extract_functions(t, doc_id=f"{split}{i}")]
        sft, pref = make_pairs(fns, seed=0)
        for folder, rows in ((layout.sft_dir(settings), sft), (layout.preference_dir(settings), pref)):
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def save_tiny_model(settings: cfg.Settings, tokenizer, folder: Path, seed: int = 0) -> Path:
    import torch

    from components.config import resolve_model_shape
    from components.model.build import build_model

    torch.manual_seed(seed)
    model = build_model(resolve_model_shape(settings, vocab_size=len(tokenizer)), tokenizer)
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def save_tiny_reward(settings: cfg.Settings, tokenizer, folder: Path) -> None:
    """A sequence-classification head (one score) over the same tiny Llama body."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from components.config import resolve_model_shape
    from components.model.build import special_ids

    s = resolve_model_shape(settings, vocab_size=len(tokenizer))
    config = LlamaConfig(vocab_size=s["vocab_size"], hidden_size=s["n_embd"], intermediate_size=s["intermediate_size"],
                         num_hidden_layers=s["n_layer"], num_attention_heads=s["n_head"],
                         max_position_embeddings=s["block_size"], num_labels=1, **special_ids(tokenizer))
    LlamaForSequenceClassification(config).save_pretrained(str(folder))


def make_project(root: Path, extra: dict | None = None, reward: bool = True) -> cfg.Settings:
    from tests.unit.training.helpers import write_tiny_data

    write_params(root, extra)
    settings = cfg.load(root / "params.yaml")
    tok = write_tiny_data(settings)
    write_finetune_sets(settings)
    save_tiny_model(settings, tok, layout.checkpoints_dir(settings, "dpo") / "hf", seed=0)
    save_tiny_model(settings, tok, layout.checkpoints_dir(settings, "sft") / "hf", seed=1)
    if reward:
        save_tiny_reward(settings, tok, layout.checkpoints_dir(settings, "reward") / "hf")
    return settings


def logged_model_uri(settings: cfg.Settings, stage: str = "dpo") -> str:
    """Log checkpoints/<stage>/hf as a stage run's transformers model (what the training stages do)."""
    from components.model.build import load_causal_lm

    model, tok = load_causal_lm(settings, str(layout.checkpoints_dir(settings, stage) / "hf"))
    with tracking.stage_run(settings, stage):
        return tracking.log_hf_model(model, tok)


# ----------------------------------------------------------------------------- evaluate
@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """One evaluation nested in a lifecycle run with a pretrain sibling and a registered champion."""
    import mlflow

    saved = {k: os.environ.pop(k) for k in URI_VARS if k in os.environ}
    settings = make_project(tmp_path_factory.mktemp("evalproj"))
    with tracking.lifecycle_run(settings):
        with tracking.stage_run(settings, "pretrain"):
            for step, loss in enumerate([5.0, 4.2, 3.9]):
                mlflow.log_metrics({"train_loss": loss, "val_loss": loss + 0.1}, step=step)
        uri = logged_model_uri(settings, "sft")
        version = promotion.register_candidate(settings, uri, "sft", metrics=GOOD)
        tracking.set_alias(settings, settings.registry.model_name, gate.CHAMPION, version)
        result = evaluate.run(settings)
    # This module-scoped setup runs before the per-test URI reset (conftest), which would otherwise
    # save this store's URI and restore it after every test, leaking it into later test files.
    for key in URI_VARS:
        os.environ.pop(key, None)
    yield settings, result
    for key in URI_VARS:
        os.environ.pop(key, None)
    os.environ.update(saved)


def test_evaluate_reports_every_metric(evaluated):
    settings, result = evaluated
    m = result["metrics"]
    expected = {"sft_bits_per_byte", "test_bits_per_byte", "baseline_kn3_sft_bits_per_byte",
                "baseline_kn3_test_bits_per_byte", "baseline_unigram_sft_bits_per_byte", "baseline_unigram_test_bits_per_byte",
                "test_perplexity", "baseline_kn3_perplexity", "baseline_unigram_perplexity", "syntax_valid_rate",
                "defines_name_rate", "pass_at_1", "pass_at_2", "mean_reward", "dpo_reward_accuracy",
                "generation_ms_per_token", "generation_tokens_per_s", "int8_perplexity", "int8_speedup",
                "fp32_ms", "int8_ms"}
    assert expected <= set(m), expected - set(m)
    assert all(math.isfinite(v) for v in m.values())
    # A random-init model is near uniform over the 400-token vocab; KN fit on real tokens beats it.
    assert 100 < m["test_perplexity"] < 2000
    assert m["baseline_kn3_perplexity"] < m["baseline_unigram_perplexity"] < m["test_perplexity"]
    # The same order in bits per byte; a random model pays about log2(400) bits per token.
    for split in ("sft", "test"):
        assert m[f"baseline_kn3_{split}_bits_per_byte"] < m[f"baseline_unigram_{split}_bits_per_byte"] \
            < m[f"{split}_bits_per_byte"]
    # The rates are the shares of the logged completions that parse / define the asked name, checked anew here.
    from components.evaluation.scorers import defines_name, extract_code, parses

    import mlflow

    table = json.loads(Path(mlflow.artifacts.download_artifacts(
        run_id=result["run_id"], artifact_path="evaluation/completions.json")).read_text())
    rows = [dict(zip(table["columns"], r)) for r in table["data"]]
    assert [r["syntax_valid"] for r in rows] == [parses(extract_code(r["completion"])) for r in rows]
    assert m["syntax_valid_rate"] == pytest.approx(sum(r["syntax_valid"] for r in rows) / len(rows))
    assert m["defines_name_rate"] == pytest.approx(sum(r["defines_name"] for r in rows) / len(rows))
    assert [r["defines_name"] for r in rows] == [defines_name(extract_code(r["completion"]), r["name"]) for r in rows]
    assert m["pass_at_1"] <= m["pass_at_2"]
    assert m["int8_perplexity"] == pytest.approx(m["int8_fp32_perplexity"], rel=0.05)
    assert result["model_uri"].endswith(str(Path("checkpoints") / "dpo" / "hf"))
    saved = json.loads(settings.path("data", "evaluation", "candidate.json").read_text())
    assert saved["metrics"] == pytest.approx(m) and saved["run_id"] == result["run_id"]


def test_evaluate_logs_run_table_and_plots(evaluated):
    import mlflow

    settings, result = evaluated
    client = mlflow.MlflowClient()
    run = client.get_run(result["run_id"])
    assert run.info.run_name == "evaluate" and run.data.tags["stage"] == "evaluate"
    assert run.data.tags["model_uri"] == result["model_uri"]
    assert run.data.metrics["test_perplexity"] == pytest.approx(result["metrics"]["test_perplexity"])
    assert run.data.tags["eval_params_hash"] and run.data.tags["data_hash"]
    card = json.loads(Path(mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path="evaluation/scorecard.json")).read_text())
    assert set(card["docs"]) == {"sft", "test", "sft.kn3", "test.kn3", "sft.unigram", "test.unigram",
                                 "syntax_valid", "defines_name"}  # per-prompt outcomes: the rates' paired data
    assert len(card["docs"]["test"]["ids"]) == 6  # every test document, scored one by one
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert plots == {"plots/lifecycle_losses.png", "plots/champion_vs_candidate.png", "plots/attention.png"}
    table = json.loads(Path(mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path="evaluation/completions.json")).read_text())
    assert table["columns"] == ["prompt", "name", "completion", "syntax_valid", "defines_name"]
    assert len(table["data"]) == settings.evaluate.n_prompts
    assert "genai_evaluate_error" not in run.data.tags
    assert run.data.tags.get("mlflow.runType") == "genai_evaluate"  # genai.evaluate reused our run
    # The experiment opens on Training runs in the MLflow UI, genai traces or not.
    assert client.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"


def test_bad_uri_is_config_error(evaluated):
    settings, _ = evaluated
    for uri in ("runs:/0123456789abcdef/model", "no/such/folder", "models:/llmcycle@nope"):
        with pytest.raises(ConfigError, match=re.escape(uri)):
            evaluate.run(settings, uri)


def test_another_tokenizer_gets_bits_per_byte_and_skips_token_bound_metrics(evaluated, tmp_path):
    import mlflow

    from tests.unit.training.helpers import tiny_tokenizer

    settings, _ = evaluated
    other = tiny_tokenizer(300)
    folder = save_tiny_model(settings, other, tmp_path / "other")
    result = evaluate.run(settings, str(folder), label="other")
    m = result["metrics"]
    assert m["sft_bits_per_byte"] > 0 and m["test_bits_per_byte"] > 0 and "syntax_valid_rate" in m
    assert not {"test_perplexity", "int8_perplexity", "dpo_reward_accuracy", "mean_reward"} & set(m)
    skipped = mlflow.MlflowClient().get_run(result["run_id"]).data.tags["skipped"]
    assert "300 tokens, the data's 400" in skipped
