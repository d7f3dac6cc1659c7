"""Silence third-party messages that tell a llmcycle user nothing, once per process.

Each entry names the library and the exact message, so a real warning from the same library still shows:
Lightning's litlogger advert and TPU line, its pytree deprecation (fixed upstream, not ours to act on),
its "modules in eval mode" warning (frozen reference models are in eval mode on purpose), its mid-epoch
resume warning (the samplers here resume by step), and
mlflow.transformers' "model card could not be retrieved from the hub" and "license information" (models
here never come from a hub), and transformers' per-save "Writing model shards" bar.
"""
from __future__ import annotations

import logging
import warnings

_DONE = False
# (the logger that emits it, substring of the message): a filter on a logger sees only its own records.
LOG_NOISE = (("lightning.pytorch.utilities.rank_zero", "litlogger"),
             ("lightning.pytorch.utilities.rank_zero", "TPU available"),
             ("lightning.fabric.utilities.rank_zero", "TPU available"),
             ("mlflow.transformers", "model card could not be retrieved"),
             ("mlflow.transformers", "Unable to find license information"))
# Substrings of Python warnings that are ignored.
# The mid-epoch resume warning: the fine-tune samplers resume by the checkpoint's step (finetune_data), and
# pretraining batches are a pure function of the step, so a mid-epoch checkpoint resumes exactly.
WARNING_NOISE = (r".*isinstance\(treespec, LeafSpec\).*", r".*module\(s\) in eval mode at the start of training.*",
                 r".*resuming from a checkpoint that ended before the epoch ended.*")


class _Drop(logging.Filter):
    def __init__(self, needle: str):
        super().__init__()
        self.needle = needle

    def filter(self, record: logging.LogRecord) -> bool:
        return self.needle not in record.getMessage()


def third_party() -> None:
    """Install the filters (idempotent)."""
    global _DONE
    if _DONE:
        return
    _DONE = True
    for message in WARNING_NOISE:
        warnings.filterwarnings("ignore", message=message)
    for name, needle in LOG_NOISE:
        logging.getLogger(name).addFilter(_Drop(needle))
    # transformers' "Writing model shards" bar on every save_pretrained of a single-shard model.
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
