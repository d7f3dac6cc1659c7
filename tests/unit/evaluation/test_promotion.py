"""Promotion against a real SQLite registry with real (tiny) models that the gate scores itself.

The champion is always re-scored on today's data, per document, in bits per byte with each model's
own tokenizer; the decision is a paired bootstrap. Models are trained here for a few dozen steps
with a plain loop, so "better" is real, not a number typed into a dict.
"""
from __future__ import annotations

import math
import sqlite3
import subprocess

import numpy as np
import pytest

from components import config as cfg
from components import tracking
from components.data import layout
from components.errors import TrackingError
from components.evaluation import bpb, gate, promotion
from tests.unit.evaluation.test_evaluate import logged_model_uri, make_project, save_tiny_model


def train_tiny(settings, tokenizer, steps: int, seed: int = 0):
    """A 2x32 Llama trained `steps` AdamW steps on the project's train documents (tokenized by `tokenizer`)."""
    import torch

    from components.config import resolve_model_shape
    from components.data.datasets import read_corpus
    from components.model.build import build_model

    torch.manual_seed(seed)
    model = build_model(resolve_model_shape(settings, vocab_size=len(tokenizer)), tokenizer)
    ids = [t for d in read_corpus(settings)["train"] for t in tokenizer.encode(d["text"]) + [tokenizer.eos_token_id]]
    data = torch.tensor(ids)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, len(data) - 65, (8,), generator=gen)
        batch = torch.stack([data[s:s + 65] for s in starts])                  # (8, 65)
        loss = model(input_ids=batch[:, :-1], labels=batch[:, :-1]).loss      # HF shifts labels itself
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def log_model(settings, model, tokenizer, stage: str = "dpo") -> str:
    with tracking.stage_run(settings, stage):
        return tracking.log_hf_model(model, tokenizer)


@pytest.fixture
def project(tmp_path):
    settings = make_project(tmp_path, reward=False)
    from components.data.tokenizer import load_tokenizer

    return settings, load_tokenizer(settings)


def test_gate_scores_both_models_and_promotes_only_a_significant_gain(project):
    import mlflow

    settings, tok = project
    name = settings.registry.model_name
    random_uri = logged_model_uri(settings)                              # the untrained dpo/hf folder
    v1 = promotion.register_candidate(settings, random_uri, eval_run_id="r1")
    first = promotion.promote(settings, v1)
    assert first["decision"] == "promote" and first["champion"] == v1 and first["scored"] == {"candidate": "scored now"}

    # The very same weights from another run: not better (delta exactly 0), whatever metric tags say.
    same_uri = logged_model_uri(settings)
    v2 = promotion.register_candidate(settings, same_uri, metrics={"sft_bits_per_byte": 0.01})
    second = promotion.promote(settings, v2)
    assert second["decision"] == "reject" and "primary sft_bits_per_byte not better" in second["reason"]
    assert second["scored"]["champion"] == "cache"                      # v1 was scored for its own gate
    assert second["champion"] == v1 and second["challenger"] == v2

    trained_uri = log_model(settings, train_tiny(settings, tok, steps=60), tok)
    v3 = promotion.register_candidate(settings, trained_uri)
    third = promotion.promote(settings, v3)
    assert third["decision"] == "promote", third["reason"]
    tags = mlflow.MlflowClient().get_model_version(name, v3).tags
    assert float(tags["gate.sft_bits_per_byte.high"]) < 0 and "interval" in tags["gate_reason"]
    assert promotion.rollback(settings) == {"model": name, "champion": v1}
    assert str(tracking.get_alias_version(settings, name, gate.CHAMPION).version) == v1


def test_a_finer_tokenizer_with_better_perplexity_but_worse_bits_per_byte_is_rejected(project, tmp_path):
    from tests.unit.training.helpers import tiny_tokenizer

    settings, _ = project
    coarse = tiny_tokenizer(1000)          # ~2.8 bytes per token (762 ids: all the merges this corpus has)
    champ_model = train_tiny(settings, coarse, steps=80)
    v1 = promotion.register_candidate(settings, log_model(settings, champ_model, coarse))
    assert promotion.promote(settings, v1)["decision"] == "promote"

    # Nearly byte-level (300 ids, ~1.5 bytes per token): a lower per-token perplexity for less knowledge.
    fine = tiny_tokenizer(300)
    cand_model = train_tiny(settings, fine, steps=80, seed=1)
    docs = bpb.test_documents(settings, None)

    def per_token_ppl_and_bpb(model, tokenizer):
        items = bpb.test_items(tokenizer, docs)
        bits = bpb.model_bits(model, items, 256, "cpu")
        n_tokens = sum(len(it.target) for it in items)
        return 2 ** (bits.sum() / n_tokens), bits.sum() / sum(it.nbytes for it in items)

    champ_ppl, champ_bpb = per_token_ppl_and_bpb(champ_model, coarse)
    cand_ppl, cand_bpb = per_token_ppl_and_bpb(cand_model, fine)
    assert cand_ppl < champ_ppl and cand_bpb > champ_bpb        # the trap the old gate fell into
    v2 = promotion.register_candidate(settings, log_model(settings, cand_model, fine))
    decision = promotion.promote(settings, v2)
    assert decision["decision"] == "reject" and "sft_bits_per_byte not better" in decision["reason"]
    assert str(tracking.get_alias_version(settings, settings.registry.model_name, gate.CHAMPION).version) == v1


def test_registry_failure_while_reading_aliases_stops_the_gate(project):
    settings, _ = project
    name = settings.registry.model_name
    v1 = promotion.register_candidate(settings, logged_model_uri(settings))
    promotion.promote(settings, v1)
    v2 = promotion.register_candidate(settings, logged_model_uri(settings))
    before = {a: tracking.get_alias_version(settings, name, a) for a in (gate.CHAMPION, gate.CHALLENGER, gate.PREVIOUS)}
    # Another writer holds the SQLite store: reads fail with "database is locked" after the busy timeout.
    db = sqlite3.connect(str(settings.path("mlflow", "mlflow.db")), timeout=0.1)
    db.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(TrackingError, match="MLflow store failed"):
            promotion.promote(settings, v2)
    finally:
        db.rollback()
        db.close()
    after = {a: tracking.get_alias_version(settings, name, a) for a in before}
    assert {a: getattr(v, "version", None) for a, v in after.items()} == \
        {a: getattr(v, "version", None) for a, v in before.items()}
    assert "gate_decision" not in tracking_tags(settings, v2)


def tracking_tags(settings, version: str) -> dict:
    import mlflow

    return mlflow.MlflowClient().get_model_version(settings.registry.model_name, version).tags


def test_lineage_tags_are_the_training_runs(project):
    import mlflow

    settings, _ = project
    uri = logged_model_uri(settings)
    run = mlflow.MlflowClient().get_run(tracking.run_id_of(uri))
    # Register under other params (as `llmcycle promote` outside the lifecycle would): the tags still
    # name the run that trained the weights.
    other = cfg.load(settings.root / "params.yaml", ["evaluate.n_prompts=3"])
    v = promotion.register_candidate(other, uri)
    tags = tracking_tags(settings, v)
    for key in ("git_commit", "params_hash", "data_hash"):
        assert tags[key] == run.data.tags[key], key
    assert tags["params_hash"] != other.params_hash()
    assert tags["stage"] == "dpo" and tags["parent_version"] == "none" and tags["trained_run_id"] == run.info.run_id
    # One training run, one version: registering it again finds it.
    assert promotion.register_candidate(other, uri) == v


def test_parent_version_follows_the_chain_to_the_registered_start(project):
    settings, tok = project
    name = settings.registry.model_name
    v1 = promotion.register_candidate(settings, logged_model_uri(settings))
    tracking.set_alias(settings, name, gate.CHAMPION, v1)
    model = train_tiny(settings, tok, steps=1)
    with tracking.stage_run(settings, "sft"):
        sft_uri = tracking.log_hf_model(model, tok, parent_uri=f"models:/{name}@champion")
    with tracking.stage_run(settings, "dpo"):
        dpo_uri = tracking.log_hf_model(model, tok, parent_uri=sft_uri)
    tracking.set_alias(settings, name, gate.CHAMPION, v1)
    v = promotion.register_candidate(settings, dpo_uri)
    assert tracking_tags(settings, v)["parent_version"] == v1 and tracking_tags(settings, v)["stage"] == "dpo"


def test_scores_of_an_evaluate_run_are_reused_only_for_the_weights_it_scored(project):
    import mlflow

    from components.evaluation import scorecard

    settings, _ = project
    uri_a, uri_b = logged_model_uri(settings), logged_model_uri(settings)
    fake = gate.Scorecard({"sft_bits_per_byte": 0.1}, {})
    with tracking.stage_run(settings, "evaluate", tags={"eval_params_hash": scorecard.eval_params_hash(settings),
                                                        "weights_run_id": tracking.run_id_of(uri_a)}) as run:
        mlflow.log_dict(scorecard.card_to_json(fake), scorecard.ARTIFACT)
    # Version of B claims A's evaluation (say `llmcycle train dpo` ran between evaluate and promote).
    v_b = promotion.register_candidate(settings, uri_b, eval_run_id=run.info.run_id)
    mv_b = mlflow.MlflowClient().get_model_version(settings.registry.model_name, v_b)
    card, source = scorecard.for_version(settings, mv_b)
    assert source == "scored now" and card.metrics["sft_bits_per_byte"] > 1
    v_a = promotion.register_candidate(settings, uri_a, eval_run_id=run.info.run_id)
    mv_a = mlflow.MlflowClient().get_model_version(settings.registry.model_name, v_a)
    assert scorecard.for_version(settings, mv_a) == (fake, f"evaluate run {run.info.run_id}")
    assert v_a != v_b  # two training runs, two versions, whatever commit, data and params they share
