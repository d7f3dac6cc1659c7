"""Pretraining data: random (B, block_size + 1) windows over the memmapped token arrays of the data stage.

A training batch is a pure function of (seed, step, rank), so a resumed run draws exactly the batches
the uninterrupted run would have, with no sampler state to checkpoint; each DDP rank draws its own.
Validation uses fixed, evenly spaced windows so every val_loss is measured on the same tokens.
Compromise: windows may straddle document boundaries (EOT separates them), as in nanoGPT.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from components.config import Settings
from components.data import layout
from components.errors import TrainingError


def read_meta(settings: Settings) -> dict:
    """tokens_dir/meta.json: dtype, vocab_size, eot_id, pad_id, tokens per split."""
    path = layout.tokens_dir(settings) / "meta.json"
    if not path.is_file():
        raise TrainingError(f"no token arrays at {path.parent}: run `llmcycle data datasets` first")
    return json.loads(path.read_text())


def open_tokens(settings: Settings, split: str, block_size: int) -> np.memmap:
    """The split's flat token ids (read-only memmap); TrainingError when shorter than one window."""
    meta = read_meta(settings)
    path = layout.tokens_dir(settings) / f"{split}.bin"
    if not path.is_file() or path.stat().st_size == 0:
        n = 0
    else:
        n = len(np.memmap(path, dtype=np.dtype(meta["dtype"]), mode="r"))
    if n < block_size + 1:
        raise TrainingError(f"{split} split ({path}) holds {n} tokens but block_size {block_size} needs at least "
                            f"{block_size + 1}; add data or lower model.block_size")
    return np.memmap(path, dtype=np.dtype(meta["dtype"]), mode="r")


def _windows(tokens: np.ndarray, offsets: np.ndarray, block_size: int) -> torch.Tensor:
    """Stack tokens[o : o + block_size + 1] for each offset -> (B, block_size + 1) int64."""
    rows = np.stack([np.asarray(tokens[o:o + block_size + 1], dtype=np.int64) for o in offsets])
    return torch.from_numpy(rows)


class TrainWindows(IterableDataset):
    """An endless stream of batches; batch k holds windows drawn by default_rng([seed, k, rank]).

    Yields whole batches (DataLoader batch_size=None): the batch, not the sample, is the unit that
    has to be reproducible from the step number alone.
    """

    def __init__(self, path: Path, dtype: str, block_size: int, batch_size: int, seed: int,
                 start_step: int = 0, rank: int = 0):
        self.path, self.dtype, self.block_size, self.batch_size = path, dtype, block_size, batch_size
        self.seed, self.start_step, self.rank = seed, start_step, rank

    def batch_at(self, step: int, tokens: np.ndarray | None = None) -> torch.Tensor:
        tokens = tokens if tokens is not None else np.memmap(self.path, dtype=np.dtype(self.dtype), mode="r")
        rng = np.random.default_rng([self.seed, step, self.rank])
        offsets = rng.integers(0, len(tokens) - self.block_size, size=self.batch_size)  # last start: n - T - 1
        return _windows(tokens, offsets, self.block_size)                                 # (B, T+1)

    def __iter__(self) -> Iterator[torch.Tensor]:
        # Opened here, not in __init__: a memmap should not be pickled into worker processes.
        tokens = np.memmap(self.path, dtype=np.dtype(self.dtype), mode="r")
        # With W DataLoader workers, worker w builds steps start + w, start + w + W, ...; the DataLoader
        # takes one batch from each worker in turn, so the stream is the same as with no workers.
        info = torch.utils.data.get_worker_info()
        step, stride = (self.start_step + info.id, info.num_workers) if info else (self.start_step, 1)
        while True:
            yield self.batch_at(step, tokens)
            step += stride


class FixedWindows(Dataset):
    """n windows at evenly spaced offsets across the split (deterministic, covers all of it)."""

    def __init__(self, tokens: np.ndarray, block_size: int, n: int):
        self.tokens, self.block_size = tokens, block_size
        self.offsets = np.linspace(0, len(tokens) - block_size - 1, num=n).astype(np.int64)

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, i: int) -> torch.Tensor:
        return _windows(self.tokens, self.offsets[i:i + 1], self.block_size)[0]           # (T+1,)


class TokenData:
    """DataLoaders over data/processed/tokens for one block size and batch size.

    Plain torch (no lightning import): the LightningModule calls train_loader(trainer.global_step)
    from its train_dataloader hook, which Lightning runs after restoring a checkpoint's step, with
    trainer.loader_options for its device (workers and pinned memory on CUDA; none on CPU, the default).
    """

    def __init__(self, settings: Settings, block_size: int, batch_size: int, seed: int):
        self.settings, self.block_size, self.batch_size, self.seed = settings, block_size, batch_size, seed
        self.meta = read_meta(settings)

    def check(self, vocab_rows: int | None = None) -> dict[str, int]:
        """Fail early (before any run opens): both splits long enough, ids inside the embedding table."""
        sizes = {split: len(open_tokens(self.settings, split, self.block_size)) for split in ("train", "val")}
        vocab = int(self.meta.get("vocab_size", 0))
        if vocab_rows is not None and vocab > vocab_rows:
            raise TrainingError(f"token arrays use a vocab of {vocab} but the model's embedding has {vocab_rows} "
                                "rows: the tokenizer changed since the model was built")
        return sizes

    def train_loader(self, start_step: int = 0, rank: int = 0, num_workers: int = 0, pin_memory: bool = False,
                     persistent_workers: bool = False) -> DataLoader:
        """The endless batch stream from start_step; (B, block_size + 1) int64 batches."""
        open_tokens(self.settings, "train", self.block_size)
        stream = TrainWindows(layout.tokens_dir(self.settings) / "train.bin", self.meta["dtype"], self.block_size,
                              self.batch_size, self.seed, start_step=start_step, rank=rank)
        # One iterator per fit: persistent workers would buy nothing for an endless stream.
        return DataLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory)

    def val_loader(self, n_batches: int, split: str = "val", num_workers: int = 0, pin_memory: bool = False,
                   persistent_workers: bool = False) -> DataLoader:
        tokens = open_tokens(self.settings, split, self.block_size)
        windows = FixedWindows(tokens, self.block_size, n_batches * self.batch_size)
        # Re-iterated at every validation: persistent workers are not restarted each time.
        return DataLoader(windows, batch_size=self.batch_size, shuffle=False, num_workers=num_workers,
                          pin_memory=pin_memory, persistent_workers=persistent_workers and num_workers > 0)

    def sample_prompts(self, n: int = 4, n_tokens: int = 24, split: str = "val") -> list[list[int]]:
        """Token ids of the first n_tokens of n documents of a split (the text after an EOT)."""
        tokens = open_tokens(self.settings, split, self.block_size)
        eot = self.meta.get("eot_id", 0)
        starts = np.flatnonzero(np.asarray(tokens) == eot) + 1
        starts = starts[starts + n_tokens <= len(tokens)]
        if len(starts) == 0:
            starts = np.array([0])
        picks = starts[np.linspace(0, len(starts) - 1, num=min(n, len(starts))).astype(np.int64)]
        return [np.asarray(tokens[s:s + n_tokens], dtype=np.int64).tolist() for s in picks]
