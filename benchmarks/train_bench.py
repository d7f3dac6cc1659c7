"""Pretraining-step throughput: a plain PyTorch loop vs the project's Lightning step vs Lightning + torch.compile.

One process, one model (a preset, default tiny), the same batches (TrainWindows: batch k is a function of the
seed and k) and the same fp32 AdamW + cosine schedule. Prints tokens/s, ratios to eager, MFU against the
matmul peak measured in this process, and the tokens each Lightning variant trains within a wall budget
(compile time counted). Compromise: on 2 noisy cores the eager baseline is measured before AND after the
Lightning runs (their spread is the noise floor); the Lightning runs are one budget run each.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import yaml

from components import config as cfg
from components import tracking
from components.data import layout
from components.model.build import build_model, count_parameters
from components.training.data import TokenData
from components.training.losses import causal_lm_loss
from components.training.pretrain import flops_per_token, measure_matmul_flops
from components.training.trainer import configure_adamw, cosine_with_warmup

REPO = Path(__file__).resolve().parents[1]
REAL_TOKENS = REPO / "data" / "processed" / "tokens"
GOAL_RATIO, GOAL_MFU = 1.25, 0.55  # the targets for the tiny preset on CPU


# ----------------------------------------------------------------------------- setup
def make_project(root: Path, args: argparse.Namespace) -> tuple[cfg.Settings, str]:
    """A throwaway project at root: params.yaml, token arrays (real ones linked, or seeded random ids)."""
    params = {"model": {"preset": args.preset},
              "pretrain": {"batch_size": args.batch, "max_steps": args.max_steps, "accelerator": "cpu",
                           "devices": 1, "precision": "32-true", "seed": args.seed}}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    settings = cfg.load(root / "params.yaml")
    out = layout.tokens_dir(settings)
    out.mkdir(parents=True)
    source = REAL_TOKENS if args.data == "auto" and (REAL_TOKENS / "train.bin").is_file() else \
        Path(args.data) if args.data not in ("auto", "random") else None
    if source is not None:
        for name in ("train.bin", "val.bin", "meta.json"):  # linked, not copied: the arrays are read-only memmaps
            (out / name).symlink_to((source / name).resolve())
        return settings, f"real tokens ({source})"
    vocab = settings.tokenizer.vocab_size
    rng = np.random.default_rng(args.seed)
    counts = {}
    for split, n in (("train", 1 << 21), ("val", 1 << 16)):
        rng.integers(0, vocab, size=n, dtype=np.uint16).tofile(out / f"{split}.bin")
        counts[split] = n
    (out / "meta.json").write_text(json.dumps({"dtype": "uint16", "vocab_size": vocab, "eot_id": 0, "pad_id": 1,
                                               "tokens": counts}))
    return settings, f"random ids (seed {args.seed}, vocab {vocab})"


def fresh_model(settings: cfg.Settings, vocab: int, seed: int) -> torch.nn.Module:
    """The same seeded initial weights for every variant."""
    torch.manual_seed(seed)
    model = build_model(cfg.resolve_model_shape(settings, vocab_size=vocab))
    return model.train()


def matmul_peak(seconds: float = 1.0) -> float:
    return measure_matmul_flops(torch.device("cpu"), "32-true", seconds=seconds)


# ----------------------------------------------------------------------------- (a) the plain eager loop
def eager_loop(settings: cfg.Settings, data: TokenData, vocab: int, steps: int, warmup: int) -> dict:
    """forward, loss, backward, clip, step, schedule, zero_grad: what the Lightning step does, nothing else."""
    c = settings.pretrain
    model = fresh_model(settings, vocab, c.seed)
    opt = configure_adamw(model, c)
    sched = cosine_with_warmup(opt, c.warmup_steps, c.max_steps, c.min_lr_ratio)
    params = [p for p in model.parameters() if p.requires_grad]
    batches = iter(data.train_loader(start_step=0))  # the same DataLoader the LightningModule uses
    losses, t0 = [], time.perf_counter()
    for step in range(warmup + steps):
        if step == warmup:
            t0 = time.perf_counter()
        batch = next(batches)
        x, y = batch[:, :-1], batch[:, 1:]                                  # (B, T) inputs, (B, T) targets
        loss = causal_lm_loss(model(input_ids=x).logits, y)
        loss.backward()
        if c.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, c.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    dt = time.perf_counter() - t0
    tokens = steps * batch.shape[0] * (batch.shape[1] - 1)
    return {"tps": tokens / dt, "losses": losses, "steps": warmup + steps}


# ----------------------------------------------------------------------------- (b, c) the Lightning step
def lightning_run(settings: cfg.Settings, data: TokenData, vocab: int, fpt: float, peak: float, compile_: bool,
                  budget_s: float, warmup: int, use_mlflow: bool) -> dict:
    """The project's CausalLMModule under build_trainer, stopped once budget_s of wall time (from fit) is spent."""
    from lightning.pytorch.callbacks import Callback

    from components.training.pretrain import CausalLMModule
    from components.training.trainer import build_trainer, fit

    class StepClock(Callback):
        """Per-step start/end times and losses; asks the trainer to stop when the budget is spent."""

        def __init__(self) -> None:
            self.t0, self.starts, self.ends, self.losses = 0.0, [], [], []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.starts.append(time.perf_counter())

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.ends.append(time.perf_counter())
            self.losses.append(float(outputs["loss"]))
            if self.ends[-1] - self.t0 >= budget_s:
                trainer.should_stop = True

    c = settings.pretrain.model_copy(update={"compile": compile_})
    stage = "bench_compiled" if compile_ else "bench_eager"
    module = CausalLMModule(fresh_model(settings, vocab, c.seed), c, data, fpt, peak_flops=peak, settings=settings)
    clock = StepClock()
    # Validation is off: it is the same for every variant, and under compile it would add a second (eval) graph.
    overrides = dict(limit_val_batches=0, enable_progress_bar=False, enable_model_summary=False)
    if not use_mlflow:
        overrides["logger"] = False
    with (tracking.stage_run(settings, stage) if use_mlflow else contextlib.nullcontext()) as run:
        trainer = build_trainer(settings, c, stage, run.info.run_id if run else None, callbacks=[clock], **overrides)
        clock.t0 = time.perf_counter()  # the budget clock starts at fit(): setup and compilation count
        fit(trainer, module)

    tokens_per_step = c.batch_size * data.block_size
    in_budget = sum(1 for e in clock.ends if e - clock.t0 <= budget_s)
    if in_budget <= warmup:
        raise RuntimeError(f"{stage}: only {in_budget} steps within {budget_s} s; raise --budget-s")
    steady_s = clock.ends[in_budget - 1] - clock.starts[warmup]
    tps = (in_budget - warmup) * tokens_per_step / steady_s
    step_s = steady_s / (in_budget - warmup)
    return {"tps": tps, "losses": clock.losses, "steps": len(clock.ends), "budget_steps": in_budget,
            "budget_tokens": in_budget * tokens_per_step, "first_step_s": clock.ends[0] - clock.t0,
            # Everything before steady state beyond what steady steps would have cost: setup (+ compilation).
            "overhead_s": (clock.starts[warmup] - clock.t0) - warmup * step_s}


# ----------------------------------------------------------------------------- report
def report(args, data_desc, n_params, fpt, peak, peaks, eager, light, comp) -> dict:
    e_mean = statistics.fmean(r["tps"] for r in eager)
    rows = [(f"eager PyTorch loop (run {i + 1} of {len(eager)})", r, None) for i, r in enumerate(eager)]
    rows += [("eager PyTorch loop (mean) = baseline", {"tps": e_mean}, None),
             ("Lightning pretrain step", light, light), ("Lightning + torch.compile", comp, comp)]
    print(f"\nmodel: preset {args.preset}, {n_params / 1e6:.2f}M params, {fpt / 1e6:.2f} MFLOP/token; "
          f"batch {args.batch} x {args.block} tokens; data: {data_desc}; threads {torch.get_num_threads()}")
    print(f"matmul peak (fp32, best of {len(peaks)}): {peak / 1e9:.0f} GFLOP/s "
          f"(each: {', '.join(f'{p / 1e9:.0f}' for p in peaks)})")
    print(f"\n| variant | tokens/s | vs eager | MFU | setup+compile s | tokens in {args.budget_s:.0f} s |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r, b in rows:
        if r is None:
            print(f"| {name} | {'skipped' if args.no_compile else 'failed'} | | | | |")
            continue
        extra = (f"{b['overhead_s']:.1f} | {b['budget_tokens']:,} ({b['budget_steps']} steps)" if b else " | ")
        print(f"| {name} | {r['tps']:,.0f} | {r['tps'] / e_mean:.2f}x | {100 * fpt * r['tps'] / peak:.1f}% | {extra} |")
    spread = (max(r["tps"] for r in eager) - min(r["tps"] for r in eager)) / e_mean
    print(f"\nnoise: the eager runs differ by {100 * spread:.1f}% of their mean")
    out = {"eager_tps": [r["tps"] for r in eager], "eager_mean_tps": e_mean, "peak_flops": peak,
           "flops_per_token": fpt, "n_params": n_params, "data": data_desc, "budget_s": args.budget_s}
    if light:
        # Same seed, same batches, same optimizer: the losses must agree, or the comparison is not like for like.
        k = min(len(light["losses"]), len(eager[0]["losses"]), 5)
        diff = max(abs(a - b) for a, b in zip(light["losses"][:k], eager[0]["losses"][:k]))
        print(f"same math: max |loss(Lightning) - loss(eager)| over the first {k} steps = {diff:.2e}")
        out.update(lightning_tps=light["tps"], lightning_budget_tokens=light["budget_tokens"],
                   lightning_overhead_s=light["overhead_s"], loss_diff=diff)
    if comp:
        out.update(compiled_tps=comp["tps"], compiled_budget_tokens=comp["budget_tokens"],
                   compiled_overhead_s=comp["overhead_s"], compiled_first_step_s=comp["first_step_s"])
    if light and comp:
        print(f"compile time ~ {comp['overhead_s'] - light['overhead_s']:.1f} s (overhead difference; first compiled "
              f"step took {comp['first_step_s']:.1f} s); budget tokens compiled/eager = "
              f"{comp['budget_tokens'] / light['budget_tokens']:.2f}x")
        if comp["tps"] > light["tps"]:
            # tokens(B) = (B - overhead) * tps for each; they cross where both have trained as much.
            cross = (comp["overhead_s"] * comp["tps"] - light["overhead_s"] * light["tps"]) / (comp["tps"] - light["tps"])
            print(f"break-even budget (compiled trains more tokens after): ~{cross:.0f} s")
            out["break_even_s"] = cross
    best = comp["tps"] if comp else (light["tps"] if light else e_mean)
    ratio = best / e_mean
    mfu = fpt * max(r["tps"] for r in (light, comp, {"tps": e_mean}) if r) / peak
    print(f"goals: best Lightning variant / eager = {ratio:.2f}x (goal >= {GOAL_RATIO}: "
          f"{'met' if ratio >= GOAL_RATIO else 'NOT met'}); best MFU = {100 * mfu:.1f}% "
          f"(goal >= {100 * GOAL_MFU:.0f}%: {'met' if mfu >= GOAL_MFU else 'NOT met'})")
    return out


# ----------------------------------------------------------------------------- main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny", choices=sorted(cfg.PRESETS))
    p.add_argument("--batch", type=int, default=16, help="sequences per step (pretrain.batch_size default)")
    p.add_argument("--steps", type=int, default=20, help="timed steps of each eager-loop run")
    p.add_argument("--warmup", type=int, default=3, help="steps left out of every steady-state figure")
    p.add_argument("--budget-s", type=float, default=120.0, help="wall budget of each Lightning run, from fit()")
    p.add_argument("--max-steps", type=int, default=1000, help="lr schedule length (runs stop at the budget first)")
    p.add_argument("--data", default="auto", help="auto (real tokens if data/processed/tokens exists) | random | DIR")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile run")
    p.add_argument("--no-mlflow", action="store_true", help="Lightning without its MLflow logger (default: a "
                   "throwaway SQLite store, as `llmcycle train pretrain` logs)")
    p.add_argument("--warm-cache", action="store_true", help="keep Inductor's on-disk cache (default: a cold one, "
                   "so compile time is what a first run pays)")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args()

    tracking.quiet_env()
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # the throwaway store, never a shared server
    import lightning  # noqa: F401  (its import sets its loggers to INFO: quiet them after it)
    for name in ("lightning.pytorch", "lightning.fabric", "mlflow"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*(does not have many workers|treespec|TF32).*")
    with tempfile.TemporaryDirectory(prefix="llmcycle-bench-") as tmp:
        root = Path(tmp)
        if not args.warm_cache:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(root / "inductor")  # read when compiling, not at import
        settings, data_desc = make_project(root, args)
        c = settings.pretrain
        meta = json.loads((layout.tokens_dir(settings) / "meta.json").read_text())
        vocab = int(meta["vocab_size"])
        shape = cfg.resolve_model_shape(settings, vocab_size=vocab)
        args.block = shape["block_size"]
        data = TokenData(settings, block_size=shape["block_size"], batch_size=c.batch_size, seed=c.seed)
        data.check()
        probe = fresh_model(settings, vocab, c.seed)
        n_params = count_parameters(probe)
        fpt = flops_per_token(n_params, shape["n_layer"], shape["n_embd"], shape["block_size"])
        del probe

        t_all, load_start = time.perf_counter(), os.getloadavg()[0]
        peaks = [matmul_peak()]
        print(f"eager loop 1 ({args.warmup} + {args.steps} steps) ...", flush=True)
        eager = [eager_loop(settings, data, vocab, args.steps, args.warmup)]
        print(f"  {eager[0]['tps']:,.0f} tokens/s\nLightning, eager ({args.budget_s:.0f} s budget) ...", flush=True)
        peak = max(peaks)
        light = lightning_run(settings, data, vocab, fpt, peak, False, args.budget_s, args.warmup, not args.no_mlflow)
        print(f"  {light['tps']:,.0f} tokens/s", flush=True)
        comp = None
        if not args.no_compile:
            print(f"Lightning + torch.compile ({args.budget_s:.0f} s budget, compilation included) ...", flush=True)
            try:
                comp = lightning_run(settings, data, vocab, fpt, peak, True, args.budget_s, args.warmup,
                                     not args.no_mlflow)
                print(f"  {comp['tps']:,.0f} tokens/s", flush=True)
            except Exception as exc:  # a compiler failure is a result to report, not a reason to lose the others
                print(f"  compile run failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
        print(f"eager loop 2 ({args.warmup} + {args.steps} steps) ...", flush=True)
        eager.append(eager_loop(settings, data, vocab, args.steps, args.warmup))
        peaks.append(matmul_peak())
        out = report(args, data_desc, n_params, fpt, max(peaks), peaks, eager, light, comp)
        # Other processes on 2 cores starve torch's two threads far more than their share: print the context.
        load_end = os.getloadavg()[0]
        print(f"\ntotal benchmark time {time.perf_counter() - t_all:.0f} s; 1-min load average {load_start:.2f} "
              f"at start, {load_end:.2f} at end (above ~2.2 on 2 cores: something else was running)")
        out.update(load_avg=[load_start, load_end])
        if args.json:
            out.update(args={k: v for k, v in vars(args).items()}, date=time.strftime("%Y-%m-%d"))
            Path(args.json).write_text(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()
