"""The drift reference: held-out SFT prompts and the champion's own behaviour on them, cached per version.

Built once per (model version, data version, reference settings): a fixed-seed sample of the held-out
prompts, completions sampled from the champion as the API would (chat template, temperature), and the
same descriptors the window gets. Cached as JSONL under data/monitoring/reference/, so a monitor run
after the first costs a file read. Compromise: generation uses generate() (HF), not the serving engine;
both sample from the same distribution, and the reference needs no running server.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from components import tracking
from components.config import Settings
from components.data import io, layout
from components.errors import ConfigError, TrainingError
from components.monitoring import descriptors as D

REFERENCE_SEED = 0
GEN_BATCH = 16


def reference_key(settings: Settings) -> str:
    """Short hash of what the reference depends on besides the model version: data and reference settings."""
    m = settings.monitoring
    blob = json.dumps({"data": tracking.data_hash(settings.root), "splits": m.reference_splits,
                       "size": m.reference_size, "temperature": m.reference_temperature,
                       "max_tokens": max_tokens(settings), "coverage": m.rare_token_coverage,
                       "embeddings": m.embeddings}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def max_tokens(settings: Settings) -> int:
    return settings.monitoring.reference_max_tokens or settings.serving.max_new_tokens


def reference_path(settings: Settings, model_name: str, version: str) -> Path:
    return settings.path("data", "monitoring", "reference", f"{model_name}-v{version}-{reference_key(settings)}.jsonl")


def reference_prompts(settings: Settings) -> list[str]:
    """Distinct held-out SFT prompts of monitoring.reference_splits, a fixed-seed sample of reference_size."""
    from components.training.finetune_data import sft_rows

    prompts: list[str] = []
    for split in settings.monitoring.reference_splits:
        try:
            prompts.extend(r["prompt"] for r in sft_rows(settings, split))
        except TrainingError as exc:
            raise ConfigError(f"monitoring.reference_splits: {exc}") from None
    prompts = list(dict.fromkeys(prompts))                        # distinct, in file order
    n = settings.monitoring.reference_size
    if len(prompts) > n:
        # Own generator: Evidently reseeds numpy's global one (TRAPS.md).
        keep = np.sort(np.random.default_rng(REFERENCE_SEED).choice(len(prompts), size=n, replace=False))
        prompts = [prompts[i] for i in keep]
    return prompts


def build_reference(settings: Settings, model: Any, tokenizer: Any, stats: D.TokenStats) -> list[dict[str, Any]]:
    """Descriptor rows of the champion answering the reference prompts (slow: generation)."""
    from components.data.tokenizer import format_prompt
    from components.model.generation import generate

    prompts = reference_prompts(settings)
    m = settings.monitoring
    completions: list[str] = []
    for k in range(0, len(prompts), GEN_BATCH):
        chunk = prompts[k:k + GEN_BATCH]
        completions.extend(generate(model, tokenizer, [format_prompt(tokenizer, p) for p in chunk],
                                    max_new_tokens=max_tokens(settings), temperature=m.reference_temperature,
                                    seed=REFERENCE_SEED + k))
    return D.describe(model, tokenizer, stats, prompts, completions, with_embeddings=m.embeddings)


def load_or_build(settings: Settings, model_name: str, version: str, model: Any, tokenizer: Any,
                  stats: D.TokenStats) -> tuple[list[dict[str, Any]], Path, bool]:
    """(rows, cache path, built now?) for this version; a cache from other settings has another key."""
    path = reference_path(settings, model_name, version)
    if path.is_file():
        return [row for _, row in io.read_jsonl(path)], path, False
    rows = build_reference(settings, model, tokenizer, stats)
    path.parent.mkdir(parents=True, exist_ok=True)
    with io.atomic_file(path) as f:
        io.write_jsonl(f, rows)
    return rows, path, True
