"""Datasets and collators for the fine-tuning stages: SFT pairs, preference pairs, PPO prompts.

A pair is format_prompt(prompt) + response + "<|end|>"; only the response tokens (with <|end|>)
are trained or scored, so each example carries a response mask next to its ids. Prompt and
response are tokenized separately (the response boundary stays exact); an over-long pair keeps the
prompt's tail and the response's head. Padding is right-sided for training, left for generation.
"""
from __future__ import annotations

import math

from pathlib import Path
from typing import Any

import torch

from components.data import io, layout
from components.errors import DataError, TrainingError


def read_jsonl(path: Path, required: tuple[str, ...]) -> list[dict[str, Any]]:
    """Rows of a JSONL file; a missing or empty file, or a row missing a field, is a TrainingError."""
    if not path.exists():
        raise TrainingError(f"{path}: dataset file not found (run `llmcycle data datasets` first)")
    rows = []
    try:
        for lineno, row in io.read_jsonl(path):
            missing = [k for k in required if k not in row]
            if missing:
                raise TrainingError(f"{path}:{lineno}: missing field(s) {', '.join(missing)}")
            rows.append(row)
    except DataError as exc:  # a malformed line stops this training stage, not the data stage
        raise TrainingError(str(exc)) from None
    if not rows:
        raise TrainingError(f"{path}: empty dataset, nothing to train on")
    return rows


def sft_rows(settings, split: str) -> list[dict[str, Any]]:
    return read_jsonl(layout.sft_dir(settings) / f"{split}.jsonl", ("prompt", "response"))


def preference_rows(settings, split: str) -> list[dict[str, Any]]:
    return read_jsonl(layout.preference_dir(settings) / f"{split}.jsonl", ("prompt", "chosen", "rejected"))


def prompt_ids(tokenizer, prompts: list[str]) -> list[list[int]]:
    """Token ids of each chat-formatted user turn plus the assistant generation prompt."""
    from components.data.tokenizer import encode_many, format_prompt
    # The template's role tags are control tokens: encode them as such.
    return encode_many(tokenizer, [format_prompt(tokenizer, p) for p in prompts], specials_as_text=False)


def _fit(p: list[int], r: list[int], max_len: int) -> tuple[list[int], list[int]]:
    if len(p) + len(r) > max_len:
        # The prompt's tail holds the generation prompt; keep at least half the window for it when
        # the response is long, and cut the response's end (its start is what the prompt conditions).
        keep_p = min(len(p), max(max_len - len(r), max_len // 2))
        p = p[len(p) - keep_p:]
        r = r[: max_len - len(p)]
    return p + r, [0] * len(p) + [1] * len(r)


def encode_pairs(tokenizer, prompts: list[str], responses: list[str],
                 max_len: int) -> list[tuple[list[int], list[int]]]:
    """(input_ids, response_mask) per pair for format_prompt(prompt) + response + <|end|>, <= max_len tokens."""
    from components.data.tokenizer import encode_many

    end = tokenizer.convert_tokens_to_ids(layout.END_OF_TURN)
    # Code may quote "<|end|>" and friends: inside a response they are text, never control ids.
    r_ids = encode_many(tokenizer, responses, specials_as_text=True)
    return [_fit(p, r + [end], max_len) for p, r in zip(prompt_ids(tokenizer, prompts), r_ids)]


def row_weights(rows: list[dict[str, Any]]) -> list[float]:
    """Each row's sampling weight (its `weight` field, else 1): a retrain up-weights the pairs it learned."""
    return [float(r.get("weight", 1.0)) for r in rows]


class SftDataset(torch.utils.data.Dataset):
    """Encoded SFT pairs: dict(input_ids, response_mask) as int lists; `weights` per pair for the sampler."""

    def __init__(self, rows: list[dict[str, Any]], tokenizer, max_len: int):
        self.items = encode_pairs(tokenizer, [r["prompt"] for r in rows], [r["response"] for r in rows], max_len)
        self.weights = row_weights(rows)
        self.lengths = [len(ids) for ids, _ in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        ids, mask = self.items[i]
        return {"input_ids": ids, "response_mask": mask}


class PreferenceDataset(torch.utils.data.Dataset):
    """Encoded preference pairs: chosen and rejected completions of the same prompt."""

    def __init__(self, rows: list[dict[str, Any]], tokenizer, max_len: int):
        prompts = [r["prompt"] for r in rows]
        chosen = encode_pairs(tokenizer, prompts, [r["chosen"] for r in rows], max_len)
        rejected = encode_pairs(tokenizer, prompts, [r["rejected"] for r in rows], max_len)
        self.items = list(zip(chosen, rejected))
        self.weights = row_weights(rows)
        self.lengths = [max(len(c[0]), len(r[0])) for c, r in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        (c_ids, c_mask), (r_ids, r_mask) = self.items[i]
        return {"chosen_ids": c_ids, "chosen_mask": c_mask, "rejected_ids": r_ids, "rejected_mask": r_mask}


def pad_right(seqs: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    return torch.tensor([s + [value] * (width - len(s)) for s in seqs], dtype=torch.long)  # (B, T)


def pad_left(seqs: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    return torch.tensor([[value] * (width - len(s)) + s for s in seqs], dtype=torch.long)  # (B, T)


class SftCollator:
    """Right-pads a batch: input_ids, attention_mask, response_mask, all (B, T)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, batch: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        ids = [b["input_ids"] for b in batch]
        return {
            "input_ids": pad_right(ids, self.pad_id),                      # (B, T)
            "attention_mask": pad_right([[1] * len(s) for s in ids], 0),   # (B, T)
            "response_mask": pad_right([b["response_mask"] for b in batch], 0),  # (B, T)
        }


class PreferenceCollator:
    """Stacks chosen then rejected into one (2B, T) batch so a single forward scores both.

    Rows [:B] are the chosen completions, rows [B:] the rejected ones, in the same order.
    """

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, batch: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        ids = [b["chosen_ids"] for b in batch] + [b["rejected_ids"] for b in batch]
        masks = [b["chosen_mask"] for b in batch] + [b["rejected_mask"] for b in batch]
        return {
            "input_ids": pad_right(ids, self.pad_id),                      # (2B, T)
            "attention_mask": pad_right([[1] * len(s) for s in ids], 0),   # (2B, T)
            "response_mask": pad_right(masks, 0),                          # (2B, T)
        }


class PromptDataset(torch.utils.data.Dataset):
    """Encoded PPO prompts; over-long ones keep their tail, which holds the assistant generation prompt."""

    def __init__(self, rows: list[dict[str, Any]], tokenizer, max_prompt_len: int):
        self.rows = rows
        self.ids = [p[-max_prompt_len:] for p in prompt_ids(tokenizer, [r["prompt"] for r in rows])]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"prompt": self.rows[i]["prompt"], "name": self.rows[i].get("name", ""), "ids": self.ids[i]}


class PromptCollator:
    """Left-pads prompts for generation, so new tokens append on the right of every row."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, batch: list[dict[str, Any]]) -> dict[str, Any]:
        ids = [b["ids"] for b in batch]
        return {
            "prompts": [b["prompt"] for b in batch],
            "input_ids": pad_left(ids, self.pad_id),                   # (B, P)
            "attention_mask": pad_left([[1] * len(s) for s in ids], 0),  # (B, P)
        }


def loader(dataset, batch_size: int, collate, shuffle: bool, seed: int = 0, num_workers: int = 0,
           pin_memory: bool = False, persistent_workers: bool = False,
           start_batch: int = 0) -> torch.utils.data.DataLoader:
    """A seeded DataLoader; the defaults suit CPU training (no workers: tiny batches, the cores are the step's).

    On CUDA the stage passes trainer.loader_options (workers, pinned memory); the shuffle order comes
    from the seeded generator in the main process either way. start_batch: the batches a resumed run
    already trained on (its checkpoint's step); the length-grouped order continues from there.
    """
    gen = torch.Generator().manual_seed(seed)
    lengths = getattr(dataset, "lengths", None)
    sampler = LengthGroupedSampler(lengths, batch_size, gen, getattr(dataset, "weights", None), start_batch) \
        if shuffle and lengths else None
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None,
                                       sampler=sampler, collate_fn=collate,
                                       num_workers=num_workers, pin_memory=pin_memory,
                                       persistent_workers=persistent_workers and num_workers > 0,
                                       generator=gen if shuffle and sampler is None else None)


class LengthGroupedSampler(torch.utils.data.Sampler):
    """A seeded shuffle whose consecutive batch_size indices have similar lengths (HF's group_by_length).

    Each pass: draw an epoch of indices (a permutation; with weights that are not all 1, a retrain's new
    rows, draws with replacement in proportion to them), sort each span of GROUP batches by length, cut it
    into batches, shuffle the batches (a partial one last, so the DataLoader's own batching keeps them).
    A right-padded batch then pads to a near neighbour, not to the longest of 8 random pairs: on the
    stdlib SFT set that is about half the tokens a random batch computes. Under DDP, Lightning swaps it
    for its DistributedSampler (a plain sharded shuffle).

    Resumable: with start_batch = k (a checkpoint's step), the first pass replays the draws of the epochs
    before batch k (so the generator is where the uninterrupted run's was) and yields from batch k on:
    a resumed run trains on exactly the batches the uninterrupted one would have.
    """

    GROUP = 32

    def __init__(self, lengths: list[int], batch_size: int, generator: torch.Generator,
                 weights: list[float] | None = None, start_batch: int = 0):
        super().__init__()
        self.lengths, self.batch_size, self.generator = list(lengths), batch_size, generator
        self.weights = weights if weights and any(w != 1.0 for w in weights) else None
        self.start_batch = start_batch

    def __len__(self) -> int:
        return len(self.lengths)

    def _epoch_order(self) -> list[int]:
        """One epoch's indices in yield order (consumes the generator's draws for one epoch)."""
        n = len(self.lengths)
        if self.weights is None:
            order = torch.randperm(n, generator=self.generator).tolist()
        else:
            order = torch.multinomial(torch.tensor(self.weights, dtype=torch.double), n, replacement=True,
                                      generator=self.generator).tolist()
        span = self.batch_size * self.GROUP
        batches: list[list[int]] = []
        for start in range(0, n, span):
            chunk = sorted(order[start:start + span], key=lambda i: self.lengths[i])
            batches += [chunk[j:j + self.batch_size] for j in range(0, len(chunk), self.batch_size)]
        full = [b for b in batches if len(b) == self.batch_size]
        partial = [b for b in batches if len(b) < self.batch_size]
        return [i for k in torch.randperm(len(full), generator=self.generator).tolist() for i in full[k]] + \
            [i for b in partial for i in b]

    def __iter__(self):
        # Batches as the DataLoader cuts them: ceil(n / batch_size) per epoch, full ones first.
        skip, self.start_batch = self.start_batch, 0
        per_epoch = math.ceil(len(self.lengths) / self.batch_size)
        order = self._epoch_order()
        while per_epoch and skip >= per_epoch:
            skip -= per_epoch
            order = self._epoch_order()
        yield from order[skip * self.batch_size:]
