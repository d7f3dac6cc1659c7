"""Where the data stage's files live under the project root: one function per artifact.

Every stage and test asks here instead of spelling paths, so the DVC outs in dvc.yaml, the
training datamodules and the evaluation sets cannot drift apart.
"""
from __future__ import annotations

from pathlib import Path

from components.config import Settings

SPLITS = ("train", "val", "test")
RESOLVED_PARAMS = "params.resolved.yaml"

# Special tokens of the tokenizer and the chat template built on them.
EOT = "<|endoftext|>"
PAD = "<|pad|>"
SYSTEM = "<|system|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
END_OF_TURN = "<|end|>"
SPECIAL_TOKENS = [EOT, PAD, SYSTEM, USER, ASSISTANT, END_OF_TURN]


def resolved_params_path(s: Settings) -> Path:
    """params.resolved.yaml: the params the DVC stages read (config + --set + resolved shape).

    At the project root, not under data/, because `--config FILE` takes the project root from the
    file's folder (components.config.load). Written by the `resolve` stage; git-ignored.
    """
    return s.path(RESOLVED_PARAMS)


def fingerprint_path(s: Settings, what: str) -> Path:
    """data/source/<what>.json: a content hash of the corpus source ("corpus") or the user's fine-tuning
    files ("finetune"), so DVC reruns the stage that reads them when they change."""
    return s.path("data", "source", f"{what}.json")


def raw_dir(s: Settings) -> Path:
    return s.path("data", "raw")


def corpus_path(s: Settings) -> Path:
    """data/raw/corpus.jsonl: one JSON object per document: id, source, split, text."""
    return raw_dir(s) / "corpus.jsonl"


def validation_dir(s: Settings, suite: str) -> Path:
    """data/validation/<suite>/: result.json and Data Docs (docs/index.html) of a GE suite."""
    return s.path("data", "validation", suite)


def docs_dir(s: Settings, suite: str) -> Path:
    """data/gx/<suite>/: the GX file context and its Data Docs (docs/index.html).

    Kept out of the DVC outputs on purpose: GX stamps every run with a time, so the site never hashes
    the same twice, while result.json (in validation_dir) is a deterministic function of the data.
    """
    return s.path("data", "gx", suite)


def tokenizer_dir(s: Settings) -> Path:
    """data/processed/tokenizer/: PreTrainedTokenizerFast.save_pretrained (tokenizer.json inside)."""
    return s.path("data", "processed", "tokenizer")


def tokens_dir(s: Settings) -> Path:
    """data/processed/tokens/: {train,val,test}.bin (flat token ids, EOT between documents) + meta.json."""
    return s.path("data", "processed", "tokens")


def sft_dir(s: Settings) -> Path:
    """data/processed/sft/{split}.jsonl: id, doc_id, name, prompt, response."""
    return s.path("data", "processed", "sft")


def preference_dir(s: Settings) -> Path:
    """data/processed/preference/{split}.jsonl: id, doc_id, name, prompt, chosen, rejected, kind."""
    return s.path("data", "processed", "preference")


def scoping_dir(s: Settings) -> Path:
    """data/scoping/: model.json (the chosen shape) and report.json."""
    return s.path("data", "scoping")


def checkpoints_dir(s: Settings, stage: str) -> Path:
    """checkpoints/<stage>/: Lightning checkpoints (git-ignored, resumable)."""
    return s.path("checkpoints", stage)
