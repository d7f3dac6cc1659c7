"""Fine-tuning stages on a tiny model: SFT (full and LoRA), reward model, DPO, and the sft -> dpo chain.

Each test writes a tiny project (tokenizer, SFT/preference JSONL built from the test corpus's real
functions, a freshly initialised HF model as checkpoints/pretrain/hf) and checks what a user sees:
weights moved, an MLflow run with metrics, plots, samples and a logged model, lineage tags.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import yaml

from components import config as cfg
from components import tracking
from components.data import layout
from components.errors import TrainingError
from tests.corpus_factory import make_module
from tests.unit.training.helpers import tiny_tokenizer


def write_pairs(settings: cfg.Settings, n_modules: int = 12) -> None:
    """sft/ and preference/ {train,val,test}.jsonl from the corpus's documented functions."""
    from components.data.functions import extract_functions, make_pairs

    rng = random.Random(0)
    docs = [make_module(rng, i) for i in range(n_modules)]
    splits = {"train": docs[:-4], "val": docs[-4:-2], "test": docs[-2:]}
    for split, texts in splits.items():
        fns = [f for i, t in enumerate(texts) for f in extract_functions(t, f"{split}_{i}")]
        sft, pref = make_pairs(fns, seed=0)
        for folder, rows in ((layout.sft_dir(settings), sft), (layout.preference_dir(settings), pref)):
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def make_project(root: Path, extra: dict | None = None) -> cfg.Settings:
    """Tokenizer, pairs and a tiny pretrained-stage HF model under root; returns the settings."""
    from components.model.build import build_model
    from tests.conftest import write_params

    if extra:  # keep the data section tiny_root wrote (it points at the corpus)
        write_params(root, {"data": yaml.safe_load((root / "params.yaml").read_text())["data"], **extra})
    settings = cfg.load(root / "params.yaml")
    tok = tiny_tokenizer()
    tok.save_pretrained(str(layout.tokenizer_dir(settings)))
    write_pairs(settings)
    torch.manual_seed(0)
    model = build_model(cfg.resolve_model_shape(settings, vocab_size=len(tok)), tok)
    out = layout.checkpoints_dir(settings, "pretrain") / "hf"
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return settings


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(str(folder / "model.safetensors"))


def moved(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], key_part: str) -> bool:
    keys = [k for k in before if key_part in k and k in after]
    assert keys, f"no weights named like {key_part}"
    return any(not torch.allclose(before[k], after[k]) for k in keys)


def stage_run(settings: cfg.Settings, run_id: str):
    import mlflow
    tracking.configure(settings)
    return mlflow.MlflowClient().get_run(run_id)


def artifacts(run_id: str, path: str = "") -> set[str]:
    import mlflow
    client = mlflow.MlflowClient()
    out, stack = set(), [path]
    while stack:
        for a in client.list_artifacts(run_id, stack.pop() or None):
            (stack.append(a.path) if a.is_dir else out.add(a.path))
    return out


def check_run(settings, result: dict, stage: str, metrics: tuple[str, ...]) -> object:
    """The common contract of every stage run; returns the MLflow run."""
    run = stage_run(settings, result["run_id"])
    assert run.info.status == "FINISHED"
    assert run.info.run_name == stage and run.data.tags["stage"] == stage
    assert set(metrics) <= set(run.data.metrics), sorted(run.data.metrics)
    assert result["model_uri"] == f"runs:/{result['run_id']}/model"
    arts = artifacts(result["run_id"])
    assert "plots/loss_curve.png" in arts
    # MLflow 3 keeps a logged model outside the run's artifacts; the URI must resolve to a HF folder.
    assert (tracking.download_model_dir(settings, result["model_uri"]) / "config.json").is_file()
    assert "parent_model_uri" in run.data.tags
    assert (Path(result["hf_dir"]) / "config.json").is_file()
    return run


# ----------------------------------------------------------------------------- data
def test_pairs_mask_exactly_the_response(tiny_root):
    from components.data.tokenizer import format_prompt
    from components.training import finetune_data as fd

    tok = tiny_tokenizer()
    (ids, mask), = fd.encode_pairs(tok, ["add two numbers"], ["def add(a, b):\n    return a + b"], max_len=200)
    n_prompt = len(tok(format_prompt(tok, "add two numbers"), add_special_tokens=False)["input_ids"])
    assert mask == [0] * n_prompt + [1] * (len(ids) - n_prompt)
    assert tok.decode(ids[n_prompt:]) == "def add(a, b):\n    return a + b" + layout.END_OF_TURN
    # Too long: the prompt keeps its tail (the generation prompt), the window is full.
    (ids, mask), = fd.encode_pairs(tok, ["x " * 100], ["y " * 100], max_len=32)
    assert len(ids) == 32 and ids[:sum(1 for m in mask if m == 0)][-2:] == \
        tok(f"{layout.ASSISTANT}\n", add_special_tokens=False)["input_ids"][-2:]

    batch = fd.PreferenceCollator(tok.pad_token_id)([
        {"chosen_ids": [5, 6, 7], "chosen_mask": [0, 1, 1], "rejected_ids": [5, 8], "rejected_mask": [0, 1]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 8, tok.pad_token_id]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["response_mask"].tolist() == [[0, 1, 1], [0, 1, 0]]


def test_empty_dataset_names_the_file(tiny_root):
    from components.training import sft

    settings = make_project(tiny_root)
    path = layout.sft_dir(settings) / "train.jsonl"
    path.write_text("")
    with pytest.raises(TrainingError, match="sft/train.jsonl"):
        sft.run(settings)


# ----------------------------------------------------------------------------- stages
def test_sft_trains_response_tokens_and_logs_everything(tiny_root):
    from components.training import sft

    settings = make_project(tiny_root)
    before = weights(layout.checkpoints_dir(settings, "pretrain") / "hf")
    result = sft.run(settings)
    after = weights(Path(result["hf_dir"]))
    assert moved(before, after, "mlp.down_proj")
    run = check_run(settings, result, "sft", ("train_loss", "val_loss", "val_response_ppl", "samples_parse_rate"))
    assert run.data.tags["parent_model_uri"].endswith("checkpoints/pretrain/hf")
    assert "samples/generations.json" in artifacts(result["run_id"])
    assert result["metrics"]["steps"] == settings.sft.max_steps
    assert result["metrics"]["val_response_ppl"] > 1


def test_reward_model_trains_on_pairs_and_is_registered(tiny_root):
    import mlflow
    from components.training import reward

    settings = make_project(tiny_root)
    start = str(layout.checkpoints_dir(settings, "pretrain") / "hf")  # skip SFT: any causal LM will do
    result = reward.run(settings, init_from=start)
    run = check_run(settings, result, "reward", ("train_loss", "train_accuracy", "val_accuracy", "val_loss"))
    assert "samples/pair_scores.json" in artifacts(result["run_id"])
    # val_accuracy is the share of held-out pairs the final model scores chosen above rejected: the same
    # pairs, scored one table at a time, are in samples/pair_scores.json (all of them: fewer than 8).
    from components.training import finetune_data as fd

    table = json.loads(Path(mlflow.artifacts.download_artifacts(
        run_id=result["run_id"], artifact_path="samples/pair_scores.json")).read_text())
    col = {c: i for i, c in enumerate(table["columns"])}
    assert len(table["data"]) == len(fd.preference_rows(settings, "val")) > 0
    wins = [row[col["chosen_score"]] > row[col["rejected_score"]] for row in table["data"]]
    assert run.data.metrics["val_accuracy"] == pytest.approx(sum(wins) / len(wins))
    mv = mlflow.MlflowClient().get_model_version("llmcycle-reward", result["registered_version"])
    assert mv.tags["stage"] == "reward" and mv.run_id == result["run_id"]
    # The saved folder is a one-output sequence classifier that pools the last non-pad token.
    model, tok = reward.load_reward_model(settings, result["hf_dir"])
    assert model.config.num_labels == 1 and model.config.pad_token_id == tok.pad_token_id
    before = weights(Path(start))
    assert moved(before, weights(Path(result["hf_dir"])), "mlp.down_proj")


def test_finetune_dpo_chain_hands_sft_model_to_dpo(tiny_root):
    from components.training.stages import finetune

    settings = make_project(tiny_root)
    assert settings.finetune.method == "dpo"
    out = finetune(settings)
    sft, dpo = out["stages"]["sft"], out["stages"]["dpo"]
    assert list(out["stages"]) == ["sft", "dpo"] and out["model_uri"] == dpo["model_uri"]
    run = check_run(settings, dpo, "dpo", ("train_loss", "train_accuracy", "train_margin", "train_chosen_reward",
                                          "train_rejected_reward", "val_loss", "val_accuracy", "val_margin",
                                          "val_chosen_reward", "val_rejected_reward"))
    assert run.data.tags["parent_model_uri"] == sft["model_uri"]  # lineage: DPO started from this SFT model
    assert moved(weights(Path(sft["hf_dir"])), weights(Path(dpo["hf_dir"])), "self_attn.q_proj")
    # The frozen reference is not in the checkpoints (it reloads from the SFT folder on resume).
    ckpt = torch.load(layout.checkpoints_dir(settings, "dpo") / "last.ckpt", weights_only=False)
    assert ckpt["state_dict"] and not any(k.startswith("ref.") for k in ckpt["state_dict"])


@pytest.mark.slow
def test_sft_lora_trains_the_adapter_and_merges_it(tiny_root):
    from components.training import sft

    settings = make_project(tiny_root, {"sft": {"lora": {"enabled": True, "r": 4, "alpha": 8}}})
    before = weights(layout.checkpoints_dir(settings, "pretrain") / "hf")
    result = sft.run(settings)
    after = weights(Path(result["hf_dir"]))
    assert set(after) == set(before)                       # merged: plain Llama keys, no lora_A/lora_B
    assert moved(before, after, "self_attn.q_proj")        # the adapter folded into the targets
    assert not moved(before, after, "mlp.down_proj")       # the base stays frozen
    run = check_run(settings, result, "sft", ("train_loss", "val_loss", "val_response_ppl"))
    assert int(run.data.params["n_trainable"]) < int(run.data.params["n_params"]) / 2


@pytest.mark.slow
def test_sft_resume_continues_the_same_run(tiny_root, monkeypatch):
    """SFT that dies after its step-4 checkpoint (an exception at step 7), then --resume: the same MLflow run,
    FINISHED, logs on from the checkpoint's step (not from 0), and ends on the uninterrupted run's loss
    (the same batches in the same order, the optimizer and schedule restored)."""
    import mlflow
    from components.training import sft, trainer

    settings = make_project(tiny_root, {"sft": {"max_steps": 10, "ckpt_every": 4, "val_every": 5}})
    whole = sft.run(settings)
    client = mlflow.MlflowClient()      # after the first run: it set the project's tracking URI
    whole_loss = {m.step: m.value for m in client.get_metric_history(whole["run_id"], "train_loss")}

    import lightning as L

    class Crash(L.Callback):
        def on_train_batch_start(self, tr, module, batch, batch_idx):
            if tr.global_step == 6:
                raise RuntimeError("injected crash at step 7")

    real = trainer.build_trainer
    monkeypatch.setattr(trainer, "build_trainer",
                        lambda *a, callbacks=(), **k: real(*a, callbacks=[*callbacks, Crash()], **k))
    with pytest.raises(RuntimeError, match="injected crash"):
        sft.run(settings)
    monkeypatch.undo()
    ckpt = trainer.last_checkpoint(settings, "sft")
    assert trainer.checkpoint_step(ckpt) == 4
    crashed_id = (layout.checkpoints_dir(settings, "sft") / "run_id.txt").read_text().strip()
    crashed_steps = {m.step for m in client.get_metric_history(crashed_id, "train_loss")}

    resumed = sft.run(settings, resume=True)
    assert resumed["run_id"] == crashed_id and resumed["metrics"]["steps"] == 10
    history = client.get_metric_history(crashed_id, "train_loss")
    # Logged step s is optimizer step s + 1: the crashed run logged 0..5, the resume logs 4.. (the checkpoint's
    # steps 5, 6 are trained again, from the checkpoint's weights); a restart from 0 would log step 0 twice.
    assert crashed_steps == set(range(6))
    resumed_steps = [m.step for m in history]
    assert sorted(resumed_steps) == sorted([*range(6), *range(4, 10)])
    final = {m.step: m.value for m in history}
    assert final[9] == pytest.approx(whole_loss[9], abs=1e-6)
    assert resumed["metrics"]["val_loss"] == pytest.approx(whole["metrics"]["val_loss"], abs=1e-6)
    run = stage_run(settings, crashed_id)
    assert run.data.tags.get("resumed") == "true" and run.info.status == "FINISHED"
