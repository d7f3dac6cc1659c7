"""Evaluation stage: score any model (runs:/, models:/name@alias, or a local HF folder) on held-out sets.

Test perplexity next to a Kneser-Ney trigram and a unigram floor on the same tokens, greedy and
sampled code completions (parses / defines the name / pass@k), reward and DPO implicit-reward
accuracy when those models exist, latency, and int8 vs fp32. Plots and tables live in report.py.
Compromise: token counts for throughput re-encode the decoded completions (generate returns text).
"""
from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from components import tracking
from components.config import Settings
from components.data import layout
from components.errors import ConfigError

EVAL_BATCH = 8               # windows / prompts per forward; small enough for a CPU, fine on a GPU
SAMPLE_ROWS = 32             # sampled sequences per generate() call (n_prompts * max(pass_k) in chunks)
LATENCY_PROMPTS = 2          # batch-1 greedy generations timed for ms/token (what one user waits)
MAX_PREFERENCE_PAIRS = 256   # test pairs scored for DPO accuracy: forward passes only, so cheap
INT8_WINDOWS = 4             # test windows in the fp32-vs-int8 comparison batch
SEED = 1337


# ----------------------------------------------------------------------------- inputs
def default_model_uri(settings: Settings) -> str:
    """checkpoints/<dpo|ppo>/hf: the last fine-tuning stage's HF folder (per finetune.method)."""
    return str(layout.checkpoints_dir(settings, settings.finetune.method) / "hf")


def load_tokens(settings: Settings, split: str) -> tuple[np.ndarray, dict]:
    """(token ids of a split, meta.json); ConfigError naming the missing file."""
    folder = layout.tokens_dir(settings)
    meta_path, bin_path = folder / "meta.json", folder / f"{split}.bin"
    for path in (meta_path, bin_path):
        if not path.is_file():
            raise ConfigError(f"evaluate: no {path}; run `llmcycle data datasets` first")
    meta = json.loads(meta_path.read_text())
    return np.fromfile(bin_path, dtype=np.dtype(meta.get("dtype", "uint16"))).astype(np.int64), meta


def read_rows(path: Path, limit: int | None = None) -> list[dict[str, Any]]:
    """The first `limit` JSON rows of a JSONL file (file order: deterministic)."""
    from components.data import io

    rows = []
    for _, row in io.read_jsonl(path):
        rows.append(row)
        if limit is not None and len(rows) >= limit:
            break
    return rows


def load_model(settings: Settings, model_uri: str) -> tuple[Any, Any]:
    """(model, tokenizer) for a URI or folder; a missing one is a ConfigError naming it."""
    from components.model.build import load_causal_lm

    try:
        return load_causal_lm(settings, model_uri)
    except ConfigError as exc:
        raise ConfigError(f"evaluate --model {model_uri}: {exc}") from None


def tokenizer_mismatch(model: Any, tokenizer: Any, meta: dict, settings: Settings) -> str | None:
    """Why the model cannot be scored on the data stage's token arrays (another tokenizer), or None.

    Bits per byte needs no such match (each model tokenizes the text itself); per-token perplexity,
    the int8 comparison and the reward/DPO parts (models of the data tokenizer) do, and are skipped.
    """
    from components.data.tokenizer import load_tokenizer

    data_vocab = int(meta["vocab_size"])
    if len(tokenizer) != data_vocab:
        return f"the model's tokenizer has {len(tokenizer)} tokens, the data's {data_vocab}"
    if model.get_input_embeddings().num_embeddings < data_vocab:
        return f"the model has {model.get_input_embeddings().num_embeddings} embedding rows for {data_vocab} tokens"
    if tokenizer.get_vocab() != load_tokenizer(settings).get_vocab():
        return "the model's tokenizer maps tokens to other ids than the data's"
    return None


# ----------------------------------------------------------------------------- perplexity
def eval_windows(ids: np.ndarray, block: int, n: int) -> np.ndarray:
    """n windows of block + 1 tokens, evenly spaced over ids (deterministic) -> (n, block + 1)."""
    if ids.size < 2:
        raise ConfigError(f"evaluate: the test split has {ids.size} tokens; need at least 2")
    width = min(block + 1, ids.size)
    starts = np.unique(np.linspace(0, ids.size - width, n).astype(np.int64))
    return np.stack([ids[s:s + width] for s in starts])


@torch.inference_mode()
def model_perplexity(model: Any, windows: np.ndarray, device: torch.device) -> float:
    """exp(mean next-token NLL) over every window's tokens 1..T (token 0 has no context)."""
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0
    for i in range(0, len(windows), EVAL_BATCH):
        w = torch.as_tensor(windows[i:i + EVAL_BATCH], device=device)              # (B, T+1)
        logits = model(input_ids=w[:, :-1]).logits.float()                       # (B, T, V)
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), w[:, 1:].reshape(-1),
                                                reduction="sum")
        total, count = total + nll.double(), count + w[:, 1:].numel()       # stays on the device: no sync per batch
    return math.exp(float(total) / count)


def baseline_perplexities(models: dict[str, Any], windows: np.ndarray) -> dict[str, float]:
    """KN trigram and add-one unigram (scorecard.fit_count_models) on exactly the tokens the model is scored on.

    Every window scores tokens 1..T, as for the model, so the numbers compare 1:1 with the model's.
    """
    out = {}
    for name, lm in models.items():
        nll = np.concatenate([-lm.token_logprobs(w) for w in windows])
        out[f"baseline_{name}_perplexity"] = math.exp(float(nll.mean()))
    return out


# ----------------------------------------------------------------------------- generation
def _n_tokens(tokenizer: Any, completion: str, cap: int) -> int:
    # +1: the end token that stopped the row (or the last one when it ran to the cap).
    return min(cap, len(tokenizer.encode(completion, add_special_tokens=False)) + 1)


def generation_speed(model: Any, tokenizer: Any, prompts: list[str], completions: list[str], wall_s: float,
                     max_new: int) -> dict:
    """Batched tokens/s of completions already generated in wall_s, and batch-1 ms/token measured now."""
    from components.model.generation import generate

    tokens = sum(_n_tokens(tokenizer, c, max_new) for c in completions)
    # Latency as a single caller sees it: one prompt at a time, no batching to hide per-step cost.
    t1, single_tokens = time.perf_counter(), 0
    for prompt in prompts[:LATENCY_PROMPTS]:
        single_tokens += _n_tokens(tokenizer, generate(model, tokenizer, [prompt], max_new_tokens=max_new)[0], max_new)
    single_wall = time.perf_counter() - t1
    return {"generation_tokens_per_s": tokens / max(wall_s, 1e-9),
            "generation_ms_per_token": 1000.0 * single_wall / max(1, single_tokens)}


def pass_at_k_metrics(model: Any, tokenizer: Any, prompts: list[str], names: list[str], cfg: Any) -> dict:
    """Sampled pass@k (n = max(pass_k) samples per prompt); correct = parses and defines the name."""
    from components.evaluation.scorers import defines_name, extract_code, pass_at_k
    from components.model.generation import generate

    n = max(cfg.pass_k)
    rows = [p for p in prompts for _ in range(n)]
    samples: list[str] = []
    for i in range(0, len(rows), SAMPLE_ROWS):
        samples += generate(model, tokenizer, rows[i:i + SAMPLE_ROWS], max_new_tokens=cfg.max_new_tokens,
                            temperature=cfg.temperature, top_p=cfg.top_p, seed=SEED + i)
    out = {}
    correct = [sum(defines_name(extract_code(s), name) for s in samples[j * n:(j + 1) * n])
               for j, name in enumerate(names)]
    for k in cfg.pass_k:
        out[f"pass_at_{k}"] = float(np.mean([pass_at_k(n, c, k) for c in correct]))
    return out


# ----------------------------------------------------------------------------- preference models
@torch.inference_mode()
def dpo_accuracy(policy: Any, ref: Any, tokenizer: Any, rows: list[dict], beta: float, device: torch.device) -> dict:
    """Share of pairs where the implicit reward beta * (log pi - log pi_ref) ranks chosen above rejected."""
    from components.model.generation import sequence_logprobs
    from components.training.finetune_data import PreferenceCollator, PreferenceDataset

    block = int(policy.config.max_position_embeddings)
    data = PreferenceDataset(rows, tokenizer, block)
    collate = PreferenceCollator(tokenizer.pad_token_id)
    margins = []
    for i in range(0, len(data), EVAL_BATCH):
        items = [data[j] for j in range(i, min(i + EVAL_BATCH, len(data)))]
        batch = {k: v.to(device) for k, v in collate(items).items()}
        args = (batch["input_ids"], batch["attention_mask"], batch["response_mask"])
        r = beta * (sequence_logprobs(policy, *args) - sequence_logprobs(ref, *args))   # (2B,)
        half = r.shape[0] // 2                                                         # rows [:B] chosen
        margins += (r[:half] - r[half:]).tolist()
    return {"dpo_reward_accuracy": float(np.mean([m > 0 for m in margins])),
            "dpo_reward_margin": float(np.mean(margins))}


@torch.inference_mode()
def mean_reward(reward_dir: Path, tokenizer: Any, prompts: list[str], completions: list[str],
                device: torch.device) -> dict:
    """Mean score of the reward model (a sequence-classification head) on prompt + completion."""
    from transformers import AutoModelForSequenceClassification

    from components.training.finetune_data import encode_pairs

    from components.training.finetune_data import pad_right
    from components.training.reward import score

    rm = AutoModelForSequenceClassification.from_pretrained(str(reward_dir), local_files_only=True).to(device).eval()
    block = int(getattr(rm.config, "max_position_embeddings", 0) or 1024)
    pad = rm.config.pad_token_id if rm.config.pad_token_id is not None else tokenizer.pad_token_id
    seqs = [ids for ids, _ in encode_pairs(tokenizer, prompts, completions, block)]
    scores = []
    for i in range(0, len(seqs), EVAL_BATCH):  # right-padded batches; the head pools the last non-pad token
        batch = seqs[i:i + EVAL_BATCH]
        ids = pad_right(batch, pad).to(device)                                        # (B, T)
        mask = pad_right([[1] * len(s) for s in batch], 0).to(device)                 # (B, T)
        scores.append(score(rm, ids, mask))                                           # (B,)
    return {"mean_reward": float(torch.cat(scores).float().mean()) if scores else float("nan")}


# ----------------------------------------------------------------------------- the stage
def run(settings: Settings, model_uri: str | None = None, label: str = "candidate") -> dict:
    """Evaluate one model inside an `evaluate` MLflow run; returns {run_id, model_uri, metrics}.

    Metrics also land in data/evaluation/<label>.json. Optional parts (reward, DPO accuracy)
    are skipped, with a `skipped` tag saying why, when their models or data are missing.
    """
    import mlflow

    from components.evaluation import report, scorecard
    from components.evaluation.promotion import weights_run_id
    from components.evaluation.quantize import compare_int8

    cfg = settings.evaluate
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", label) or label.startswith("."):
        raise ConfigError(f"evaluate: label {label!r} must be letters, digits, '_', '-' or '.' (it names a file)")
    uri = model_uri or default_model_uri(settings)
    test, meta = load_tokens(settings, "test")
    sft_path = layout.sft_dir(settings) / "test.jsonl"
    if not sft_path.is_file():
        raise ConfigError(f"evaluate: no {sft_path}; run `llmcycle data datasets` first")
    model, tokenizer = load_model(settings, uri)
    other_tokenizer = tokenizer_mismatch(model, tokenizer, meta, settings)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    t_start = time.perf_counter()
    metrics: dict[str, float] = {}
    skipped: list[str] = []

    with tracking.stage_run(settings, "evaluate", params={"evaluate": cfg.model_dump(mode="json"), "label": label},
                            tags={"model_uri": uri, "eval_label": label, **_version_tag(settings, uri)}) as active:
        # The gate's numbers first: bits per byte (per document, baselines alongside) and syntax validity.
        count_models = scorecard.fit_count_models(settings)  # one fit, for bits per byte and perplexity alike
        card, ex = scorecard.score(settings, model, tokenizer, device, baselines=count_models)
        metrics.update(card.metrics)
        mlflow.log_dict(scorecard.card_to_json(card), scorecard.ARTIFACT)
        mlflow.set_tag("eval_params_hash", scorecard.eval_params_hash(settings))
        # Which weights these scores belong to: the gate reuses them only for a version trained by that run.
        mlflow.set_tag("weights_run_id", weights_run_id(settings, uri) or "unknown")
        # Per-token perplexity alongside: readable, but bound to the data's tokenizer (never gated on).
        windows = eval_windows(test, int(model.config.max_position_embeddings), cfg.test_batches)
        if other_tokenizer is None:
            metrics["test_perplexity"] = model_perplexity(model, windows, device)
            metrics.update(baseline_perplexities(count_models, windows))
        else:
            skipped.append(f"test_perplexity, int8, mean_reward, dpo_reward_accuracy: {other_tokenizer}")

        rows, prompts, completions, scored = ex["rows"], ex["prompts"], ex["completions"], ex["checks"]
        names = [r.get("name", "") for r in rows]
        metrics.update(generation_speed(model, tokenizer, prompts, completions, ex["generation_wall_s"],
                                        cfg.max_new_tokens))
        k_prompts = cfg.pass_k_prompts
        metrics.update(pass_at_k_metrics(model, tokenizer, prompts[:k_prompts], names[:k_prompts], cfg))

        if other_tokenizer is None:
            metrics.update(_reward_part(settings, tokenizer, [r["prompt"] for r in rows], completions, device,
                                        skipped))
            metrics.update(_dpo_part(settings, model, tokenizer, device, skipped))

        table = [{"prompt": r["prompt"], "name": n, "completion": c, "syntax_valid": s["syntax_valid"],
                  "defines_name": s["defines_name"]} for r, n, c, s in zip(rows, names, completions, scored)]
        report.log_completions(table)
        report.log_plots(settings, active.info.run_id, model, tokenizer, prompts[0] if prompts else "", metrics, label)

        # Last: compare_int8 moves the model to the CPU, where dynamic int8 runs (fbgemm).
        if other_tokenizer is None:
            q = compare_int8(model, torch.as_tensor(windows[:INT8_WINDOWS, :-1]))
            metrics.update({"int8_perplexity": q["int8_ppl"], "int8_fp32_perplexity": q["fp32_ppl"],
                            "int8_speedup": q["speedup"], "fp32_ms": q["fp32_ms"], "int8_ms": q["int8_ms"]})
        metrics["eval_wall_s"] = time.perf_counter() - t_start
        mlflow.log_metrics(metrics)
        if skipped:
            mlflow.set_tag("skipped", "; ".join(skipped)[:5000])
        run_id = active.info.run_id
        out_path = settings.path("data", "evaluation", f"{label}.json")
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps({"run_id": run_id, "model_uri": uri, "label": label, "metrics": metrics},
                                       indent=2, sort_keys=True))
        mlflow.log_artifact(str(out_path), "evaluation")
    return {"run_id": run_id, "model_uri": uri, "metrics": metrics}


def _version_tag(settings: Settings, uri: str) -> dict[str, str]:
    """models:/name@alias moves; record the version it pointed at when this evaluation ran."""
    if not (uri.startswith("models:/") and "@" in uri):
        return {}
    name, alias = uri[len("models:/"):].split("@", 1)
    mv = tracking.get_alias_version(settings, name, alias)
    return {"model_version": str(mv.version)} if mv is not None else {}


def _reward_part(settings: Settings, tokenizer: Any, prompts: list[str], completions: list[str],
                 device: torch.device, skipped: list[str]) -> dict:
    """Mean reward when checkpoints/reward/hf holds a sequence-classification reward model."""
    reward_dir = layout.checkpoints_dir(settings, "reward") / "hf"
    config = reward_dir / "config.json"
    if not config.is_file():
        skipped.append(f"mean_reward: no reward model at {reward_dir}")
        return {}
    archs = json.loads(config.read_text()).get("architectures") or []
    if not any("SequenceClassification" in a for a in archs):
        skipped.append(f"mean_reward: {reward_dir} is {archs}, not a sequence-classification model")
        return {}
    return mean_reward(reward_dir, tokenizer, prompts, completions, device)


def _dpo_part(settings: Settings, model: Any, tokenizer: Any, device: torch.device, skipped: list[str]) -> dict:
    """DPO implicit-reward accuracy against the SFT reference, when both it and the pairs exist."""
    from transformers import LlamaForCausalLM

    ref_dir = layout.checkpoints_dir(settings, "sft") / "hf"
    pairs = layout.preference_dir(settings) / "test.jsonl"
    if not (ref_dir / "config.json").is_file():
        skipped.append(f"dpo_reward_accuracy: no SFT reference at {ref_dir}")
        return {}
    if not pairs.is_file():
        skipped.append(f"dpo_reward_accuracy: no {pairs}")
        return {}
    source = getattr(model, "name_or_path", "") or ""
    if source and Path(source).resolve() == ref_dir.resolve():
        skipped.append("dpo_reward_accuracy: the evaluated model is the SFT reference itself")
        return {}
    ref = LlamaForCausalLM.from_pretrained(str(ref_dir), local_files_only=True).to(device).eval()
    if ref.get_input_embeddings().num_embeddings < len(tokenizer):
        skipped.append(f"dpo_reward_accuracy: the SFT reference at {ref_dir} has a smaller vocabulary")
        return {}
    rows = read_rows(pairs, MAX_PREFERENCE_PAIRS)
    return dpo_accuracy(model, ref, tokenizer, rows, settings.dpo.beta, device)
