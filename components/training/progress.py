"""Progress lines for a log that is not a terminal: `make run > log`, CI, a Prefect worker.

On a TTY the rich bar shows progress; elsewhere a training stage would be silent for minutes. This
callback prints one line to stderr at most every `interval_s` seconds (and at the last step):
stage, step/steps, loss, input tokens/s since the stage's first step, and the ETA at that rate.
The loss is read (a host sync) only when a line is due, never per step.
"""
from __future__ import annotations

import sys
import time
from typing import Any, TextIO

import torch

INTERVAL_S = 20.0   # under the 30 s a reader waits at most for a sign of life


def batch_tokens(batch: Any) -> int:
    """Input tokens in a batch: a (B, T) tensor, or the first 2-D tensor of a dict (input_ids, chosen_ids ...)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.numel())
    if isinstance(batch, (list, tuple)) and batch:
        return batch_tokens(batch[0])
    if isinstance(batch, dict):
        for value in batch.values():
            if isinstance(value, torch.Tensor) and value.dim() == 2:
                return int(value.numel())
    return 0


def format_line(stage: str, step: int, steps: int, loss: float | None, tokens_per_s: float, eta_s: float) -> str:
    loss_part = f" loss {loss:.4f}" if loss is not None else ""
    return (f"{stage}: step {step}/{steps}{loss_part}, {tokens_per_s:,.0f} tokens/s, "
            f"ETA {int(eta_s) // 60}m{int(eta_s) % 60:02d}s")


def progress_lines(stage: str, interval_s: float = INTERVAL_S, stream: TextIO | None = None) -> Any:
    """A Lightning callback printing format_line() every interval_s seconds (built here: lightning loads lazily)."""
    from lightning.pytorch.callbacks import Callback

    class ProgressLines(Callback):
        def __init__(self) -> None:
            self.started = self.last = 0.0
            self.tokens = 0
            self.first_step = 0

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            self.started = self.last = time.monotonic()
            self.first_step = trainer.global_step      # a resumed run counts from its checkpoint
            self.tokens = 0

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            self.tokens += batch_tokens(batch)
            now = time.monotonic()
            step, steps = trainer.global_step, trainer.max_steps
            if now - self.last < interval_s and step < steps:
                return
            self.last = now
            loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
            value = float(loss.detach()) if isinstance(loss, torch.Tensor) else None
            elapsed = max(now - self.started, 1e-9)
            done = max(step - self.first_step, 1)
            eta = elapsed / done * max(steps - step, 0)
            out = stream or sys.stderr
            out.write(format_line(stage, step, steps, value, self.tokens / elapsed, eta) + "\n")
            out.flush()

    return ProgressLines()
