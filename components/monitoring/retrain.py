"""Retraining plumbing: the single-flight lock, the monitor run a retrain answers, old-vs-new scoring.

The lock is data/retrain/retrain.lock holding the holder's pid, host and start time, guarded by
flock: the kernel drops the lock when its holder dies, so a lock left by a killed retrain is stale
by construction and the next retrain takes it over (and says whose it was). The file is emptied, never
unlinked, on release: unlinking races with a process that opened it a moment before.
"""
from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import socket
from pathlib import Path
from typing import Any

from components import tracking
from components.config import Settings
from components.errors import ConfigError


class RetrainLock:
    """Non-blocking exclusive lock; acquire() is False (and `holder` says who) while another retrain runs."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.fd: int | None = None
        self.holder: dict[str, Any] = {}
        self.taken_over: dict[str, Any] | None = None

    def acquire(self, **info: Any) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.holder = _read(fd)
            os.close(fd)
            return False
        previous = _read(fd)
        # A pid left in a free lock: its holder died without releasing (killed, out of memory).
        self.taken_over = previous or None
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "since": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), **info}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        os.fsync(fd)
        self.fd, self.holder = fd, record
        return True

    def release(self) -> None:
        if self.fd is None:
            return
        os.ftruncate(self.fd, 0)
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> "RetrainLock":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _read(fd: int) -> dict[str, Any]:
    raw = os.pread(fd, 4096, 0)
    try:
        obj = json.loads(raw) if raw.strip() else {}
    except ValueError:
        obj = {"unreadable": raw[:80].decode("utf-8", "replace")}
    return obj if isinstance(obj, dict) else {}


def lock_for(settings: Settings) -> RetrainLock:
    return RetrainLock(settings.path("data", "retrain", "retrain.lock"))


# ----------------------------------------------------------------------------- the monitor run
def monitor_run(settings: Settings, run_id: str | None) -> Any | None:
    """The monitor run a retrain answers: the one named (ConfigError when the store has no such run),
    else the newest finished one that detected drift (None when there is none)."""
    if run_id:
        run = tracking.get_run(settings, run_id)
        if run is None:
            raise ConfigError(f"--monitor-run {run_id}: no such run in {tracking.tracking_uri(settings)}")
        if run.data.tags.get("stage") != "monitor" and run.info.run_name != "monitor":
            raise ConfigError(f"--monitor-run {run_id}: run {run.info.run_name!r} is not a monitor run")
        return run
    return tracking.newest_run(settings, "monitor", "metrics.drift_detected = 1")


def window_info(run: Any) -> dict[str, Any]:
    tags, metrics = run.data.tags, run.data.metrics
    return {"monitor_run_id": run.info.run_id, "start": tags.get("window_start"), "end": tags.get("window_end"),
            "n": tags.get("window_n"), "drift_detected": metrics.get("drift_detected"),
            "drift_share": metrics.get("drift_share")}


# ----------------------------------------------------------------------------- old vs new
def bits_per_byte(settings: Settings, models: dict[str, str], sets: dict[str, list[dict]]) -> dict[str, float]:
    """{<model>_<set>_bits_per_byte}: response bits per byte given the prompt (the gate's SFT measure) of
    each model URI on each set of SFT rows; an empty set is left out."""
    import torch

    from components.evaluation.bpb import doc_scores, model_bits, sft_items
    from components.model.build import load_causal_lm

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out: dict[str, float] = {}
    for label, uri in models.items():
        model, tokenizer = load_causal_lm(settings, uri)
        model.to(device).eval()
        block = int(model.config.max_position_embeddings)
        for name, rows in sets.items():
            if rows:
                items = sft_items(tokenizer, rows)
                out[f"{label}_{name}_bits_per_byte"] = doc_scores(items, model_bits(model, items, block, device)
                                                                  ).bits_per_byte
        del model
    return out


def gate_figures(settings: Settings, versions: dict[str, str]) -> dict[str, float]:
    """{<label>_test_bits_per_byte, <label>_sft_bits_per_byte} of registered versions on today's data: the
    scorecards the gate used (cached per version and data hash, so nothing is scored twice)."""
    import mlflow

    from components.evaluation import scorecard

    tracking.configure(settings)
    client = mlflow.MlflowClient()
    out: dict[str, float] = {}
    for label, version in versions.items():
        card, _ = scorecard.for_version(settings, client.get_model_version(settings.registry.model_name, version))
        for key in ("test_bits_per_byte", "sft_bits_per_byte"):
            if key in card.metrics:
                out[f"{label}_{key}"] = float(card.metrics[key])
    return out
