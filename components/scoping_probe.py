"""Scoping's measurements: the device pretraining will use, its matmul peak, and a probe of one model shape.

The probe runs what a pretraining step runs (the stage's own loss path, fused kernels where the stage
uses them, its AdamW, gradient clipping, the training precision) at the real batch and block size, then
times one validation batch and one checkpoint write of that model. Compromises: plain PyTorch, not
Lightning (importing lightning costs 7-9 s; its per-step bookkeeping is a fixed estimate in scoping.py);
eager even when the stage compiles (compiling would cost scoping ~40 s: scoping counts the stage's
compilation as a fixed cost and its compiled steps run faster than planned); one device (a DDP run is
assumed to step at the single-device rate).
"""
from __future__ import annotations

import contextlib
import functools
import os
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from components.config import TrainConfig


# A few steps can land in a quiet (or a busy) moment of a shared machine: time at least this long.
PROBE_SECONDS = 2.0


@dataclass(frozen=True)
class Target:
    """What pretraining will run on: device type, the device's name (part of the plan key), precision."""
    device: str          # torch device type: cuda | cpu
    name: str            # e.g. "NVIDIA H200" or "cpu: AMD EPYC 7B13 x2 threads"
    precision: str       # resolved Lightning precision: 32-true | bf16-mixed | 16-mixed | ...
    world_size: int      # data-parallel ranks (devices x nodes)


@dataclass(frozen=True)
class Probe:
    """Seconds measured for one model shape (means over the timed repetitions, warm-up excluded)."""
    step_s: float        # forward + backward + clip + AdamW step at (batch, block)
    val_batch_s: float   # one validation batch: forward + loss, no grad
    ckpt_s: float        # one checkpoint file: weights + AdamW moments, torch.save
    warmup_s: float      # the first step (allocation, kernel selection): paid once per fit


def _resolve_precision(precision: str, accelerator: str) -> str:
    # The training stage's own resolution, so scoping measures the precision the run will use.
    from components.training.trainer import resolve_precision

    return resolve_precision(precision, accelerator)


def _cpu_name() -> str:
    """The CPU model (from /proc/cpuinfo on Linux) and torch's thread count: both set a CPU's speed."""
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"cpu: {model} x{torch.get_num_threads()} threads"


def training_target(cfg: TrainConfig) -> Target:
    """The device and precision the pretrain stage will train with (CUDA when present and allowed)."""
    cuda = cfg.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    name = torch.cuda.get_device_name(0) if cuda else _cpu_name()
    if isinstance(cfg.devices, int):
        per_node = cfg.devices
    else:  # "auto" / "-1": every visible device
        per_node = torch.cuda.device_count() if cuda else 1
    return Target(device=device, name=name, precision=_resolve_precision(cfg.precision, device),
                  world_size=max(1, per_node) * cfg.num_nodes)


def _dtypes(precision: str) -> tuple[torch.dtype | None, torch.dtype]:
    """(autocast dtype or None, parameter dtype) for a Lightning precision string."""
    if precision.endswith("-mixed"):
        return (torch.bfloat16 if precision.startswith("bf16") else torch.float16), torch.float32
    if precision.startswith("bf16"):
        return None, torch.bfloat16
    if precision.startswith("16"):
        return None, torch.float16
    if precision.startswith("64"):
        return None, torch.float64
    return None, torch.float32


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()  # kernels are async: time the work, not the launches


def measure_matmul_flops(target: Target, seconds: float = 0.3) -> float:
    """Best observed square-matmul FLOP/s on the target device in the training dtype (2*n^3 per product)."""
    auto, param = _dtypes(target.precision)
    dtype = auto or param
    n = 4096 if target.device == "cuda" else 1024
    a = torch.randn(n, n, device=target.device, dtype=dtype)
    b = torch.randn(n, n, device=target.device, dtype=dtype)
    torch.mm(a, b)  # warm-up (thread pool, allocator, cuBLAS heuristics)
    _sync(target.device)
    best, spent = float("inf"), 0.0
    while spent < seconds:
        t0 = time.perf_counter()
        torch.mm(a, b)
        _sync(target.device)
        dt = time.perf_counter() - t0
        best, spent = min(best, dt), spent + dt
    return 2.0 * n ** 3 / best


def _loss_fn(model: Any, cfg: TrainConfig, device: str,
             autocast: Callable[[], contextlib.AbstractContextManager]) -> Callable[..., torch.Tensor]:
    """The loss the pretrain stage trains with on this device: liger's fused path where the stage would
    use it (hot_path probes it first and may fall back), else the plain lm_loss. Eager: never compiled."""
    from components.model.kernels import resolve_kernels
    from components.training.hot_path import liger_loss_fn, lm_loss

    kernels = getattr(cfg, "kernels", "none")
    if resolve_kernels(kernels, device) == "liger":
        fn = liger_loss_fn(model, autocast, False, explicit=kernels == "liger")
        if fn is not None:
            return fn
    return functools.partial(lm_loss, model)


def compiled(cfg: TrainConfig, device: str) -> bool:
    """Whether the pretrain stage will torch.compile its loss path on this device (pretrain.compile)."""
    try:
        from components.training.trainer import resolve_compile
    except ImportError:  # a trainer whose pretrain.compile is a plain bool
        return bool(cfg.compile)
    return resolve_compile(cfg.compile, device)


def probe(shape: dict, cfg: TrainConfig, target: Target, steps: int, scratch: Path | None = None,
          min_seconds: float | None = None) -> Probe:
    """Time real training steps, one validation batch and one checkpoint write of a freshly built model.

    shape: n_layer, n_head, n_embd, block_size, intermediate_size, vocab_size; cfg: pretrain settings
    (batch_size, grad_clip, optimizer); steps: timed steps at least, repeated until min_seconds
    (default PROBE_SECONDS) passed;
    scratch: folder for the checkpoint file (the checkpoints' disk).
    """
    from components.model.build import build_model
    from components.training.trainer import configure_adamw

    torch.manual_seed(0)
    auto, param = _dtypes(target.precision)
    model = build_model(shape).to(device=target.device, dtype=param)
    model.train()

    def autocast() -> contextlib.AbstractContextManager:
        return torch.autocast(target.device, dtype=auto) if auto is not None else contextlib.nullcontext()

    loss_fn = _loss_fn(model, cfg, target.device, autocast)
    opt = configure_adamw(model, cfg)
    scaler = torch.amp.GradScaler(target.device) if auto is torch.float16 else None
    batch = torch.randint(0, shape["vocab_size"], (cfg.batch_size, shape["block_size"] + 1),
                          device=target.device)                                  # (B, T+1) like the data stage
    x, y = batch[:, :-1], batch[:, 1:]                                           # (B, T)

    def step() -> None:
        with autocast():
            loss = loss_fn(x, y)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
        else:
            loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)

    warmup_s = _timed(step, 1, target.device)
    step_s = _timed(step, steps, target.device, PROBE_SECONDS if min_seconds is None else min_seconds)

    model.eval()
    with torch.no_grad():
        def val() -> None:
            with autocast():
                loss_fn(x, y)
        _timed(val, 1, target.device)  # warm-up: eval mode may pick other kernels
        val_s = _timed(val, 2, target.device)
    model.train()

    with _scratch_file(scratch) as path:
        # What a Lightning checkpoint mostly holds: the module's weights and the optimizer's moments.
        ckpt_s = _timed(lambda: torch.save({"state_dict": model.state_dict(), "optimizer": opt.state_dict()}, path),
                        1, "cpu")
    return Probe(step_s=step_s, val_batch_s=val_s, ckpt_s=ckpt_s, warmup_s=warmup_s)


def _timed(fn: Callable[[], Any], repeats: int, device: str, min_seconds: float = 0.0, cap: int = 200) -> float:
    """Mean seconds of fn over rounds of `repeats` calls, repeated until min_seconds passed (at most cap
    calls); synchronised with the device once per round, not per call."""
    _sync(device)
    t0 = time.perf_counter()
    calls = 0
    while True:
        for _ in range(repeats):
            fn()
        calls += repeats
        _sync(device)
        spent = time.perf_counter() - t0
        if spent >= min_seconds or calls >= cap:
            return spent / calls


@contextlib.contextmanager
def _scratch_file(folder: Path | None) -> Iterator[Path]:
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(suffix=".ckpt", dir=str(folder) if folder is not None else None)
    os.close(fd)
    try:
        yield Path(name)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(name)
