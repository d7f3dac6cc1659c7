"""Pretraining-step throughput: plain PyTorch loops (eager; compiled + fused AdamW) vs the project's Lightning stage.

Same model, same batches (TrainWindows), same AdamW (fused in every variant) + cosine schedule, same precision
(--precision, autocast + GradScaler as Lightning does), on --device; prints tokens/s, ratios paired against the
compiled plain loop, MFU against the matmul peak measured here in that precision, and tokens trained within a
wall budget (compile time counted). --preset gpt2-124m is the GPU shape of issue 7 (vocab 50304, random ids).
Compromise: on 2 shared cores steady state comes from interleaved rounds, each tagged with other processes' CPU.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
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
from components.training.hot_path import lm_loss
from components.training.pretrain import flops_per_token, measure_matmul_flops
from components.training.trainer import configure_adamw, cosine_with_warmup, resolve_precision

REPO = Path(__file__).resolve().parents[1]
REAL_TOKENS = REPO / "data" / "processed" / "tokens"
GOAL_RATIO = 1.0  # issue 7: the Lightning stage keeps up with a compiled plain loop (there: nanoGPT's, on an H200)
GPT2_VOCAB = 50304


# ----------------------------------------------------------------------------- setup
def make_project(root: Path, args: argparse.Namespace) -> tuple[cfg.Settings, str]:
    """A throwaway project at root: params.yaml, token arrays (real ones linked, or seeded random ids)."""
    params = {"model": {"preset": args.preset},
              "tokenizer": {"vocab_size": args.vocab},
              "pretrain": {"batch_size": args.batch, "max_steps": args.max_steps,
                           "accelerator": "gpu" if args.device == "cuda" else "cpu", "devices": 1,
                           "precision": args.precision, "fused_adamw": True, "seed": args.seed}}
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
    dtype = np.uint16 if vocab <= 1 << 16 else np.uint32
    for split, n in (("train", 1 << 21), ("val", 1 << 16)):
        rng.integers(0, vocab, size=n, dtype=dtype).tofile(out / f"{split}.bin")
        counts[split] = n
    (out / "meta.json").write_text(json.dumps({"dtype": np.dtype(dtype).name, "vocab_size": vocab, "eot_id": 0,
                                               "pad_id": 1, "tokens": counts}))
    return settings, f"random ids (seed {args.seed}, vocab {vocab})"


def fresh_model(settings: cfg.Settings, vocab: int, seed: int) -> torch.nn.Module:
    """The same seeded initial weights for every variant."""
    torch.manual_seed(seed)
    model = build_model(cfg.resolve_model_shape(settings, vocab_size=vocab))
    return model.train()


def matmul_peak(device: torch.device, precision: str, seconds: float = 1.0) -> float:
    return measure_matmul_flops(device, precision, seconds=seconds)


def sync(device: torch.device) -> None:
    """Wait for queued kernels: taken only at the two ends of a timed window, never per step."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- timing
class OthersCpu:
    """Share of the machine's CPU time that other processes used during a block (Linux /proc/stat).

    On 2 cores any other busy process stalls torch's two threads far beyond its share, so each figure
    carries this: near 0% means the measurement had the machine to itself.
    """

    def __enter__(self) -> "OthersCpu":
        self.t, self.busy, self.own = time.perf_counter(), _busy_cpu_s(), _own_cpu_s()
        return self

    def __exit__(self, *exc: object) -> None:
        wall, busy = time.perf_counter() - self.t, _busy_cpu_s()
        if busy is None or self.busy is None:  # no /proc/stat (not Linux): unknown
            self.share = float("nan")
            return
        others = (busy - self.busy) - (_own_cpu_s() - self.own)
        self.share = max(0.0, others / (wall * (os.cpu_count() or 1)))


def _busy_cpu_s() -> float | None:
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]   # user nice system idle iowait irq softirq steal
    except OSError:
        return None
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    """CPU seconds of this process and its descendants: Inductor compiles in worker processes and g++."""
    tree: dict[int, tuple[int, int]] = {}
    for name in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                v = f.read().rsplit(")", 1)[1].split()  # after the command name: state, ppid, ...
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
        tree[int(name)] = (int(v[1]), sum(int(x) for x in v[11:15]))  # ppid; utime stime cutime cstime
    if not tree:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system
    mine, todo = 0, [os.getpid()]
    while todo:
        pid = todo.pop()
        mine += tree.get(pid, (0, 0))[1]
        todo += [p for p, (ppid, _) in tree.items() if ppid == pid]
    return mine / os.sysconf("SC_CLK_TCK")


def steady_tps(starts: list[float], ends: list[float], warmup: int, tokens_per_step: int,
               n: int | None = None) -> float:
    """Tokens/s from the start of step `warmup` to the end of step n-1: every cost between steps counts."""
    n = len(ends) if n is None else n
    if n <= warmup:
        raise RuntimeError(f"only {n} steps measured, {warmup} warm-up steps: nothing steady to time")
    return (n - warmup) * tokens_per_step / (ends[n - 1] - starts[warmup])


# ----------------------------------------------------------------------------- (a, b) the plain loops
def loop_run(settings: cfg.Settings, data: TokenData, vocab: int, steps: int, device: torch.device,
             precision: str, warmup: int, compile_: bool) -> dict:
    """forward + loss (compiled as one graph when compile_), backward, clip, fused AdamW step, schedule, zero_grad.

    What the Lightning step does and nothing else: the baseline. bf16/fp16 autocast as Lightning's plugin does;
    fp16 adds a GradScaler (unscale_, clip, step, update). Losses stay on the device until the end.
    """
    c = settings.pretrain
    model = fresh_model(settings, vocab, c.seed).to(device)
    opt = configure_adamw(model, c)
    sched = cosine_with_warmup(opt, c.warmup_steps, c.max_steps, c.min_lr_ratio)
    params = [p for p in model.parameters() if p.requires_grad]
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler(device.type) if precision == "16-mixed" else None
    loss_fn = functools.partial(lm_loss, model)
    if compile_:
        loss_fn = torch.compile(loss_fn, fullgraph=True)
    batches = iter(data.train_loader(start_step=0, pin_memory=device.type == "cuda"))  # the stage's stream
    starts, ends, losses = [], [], []
    for i in range(steps):
        if i == warmup or i == 0:
            sync(device)
        starts.append(time.perf_counter())
        batch = next(batches).to(device, non_blocking=True)
        x, y = batch[:, :-1], batch[:, 1:]                                  # (B, T) inputs, (B, T) targets
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = loss_fn(x, y)
        (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.unscale_(opt)
        if c.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, c.grad_clip)
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
        if i == steps - 1 or i == 0:
            sync(device)
        ends.append(time.perf_counter())
    return {"starts": starts, "ends": ends, "losses": [float(v) for v in losses]}


# ----------------------------------------------------------------------------- (c, d) the Lightning stage
def lightning_module(settings: cfg.Settings, data: TokenData, vocab: int, fpt: float, peak: float,
                     compile_: bool) -> object:
    """The project's CausalLMModule on the seeded model; compile_ is the pretrain.compile=true path."""
    from components.training.pretrain import CausalLMModule

    c = settings.pretrain.model_copy(update={"compile": compile_})
    return CausalLMModule(fresh_model(settings, vocab, c.seed), c, data, fpt, peak_flops=peak, settings=settings)


def lightning_fit(settings: cfg.Settings, module: object, stage: str, use_mlflow: bool, warmup: int,
                  steps: int | None = None, budget_s: float | None = None) -> dict:
    """One trainer.fit through build_trainer, stopped after `steps` steps or once budget_s (from fit) is spent."""
    from lightning.pytorch.callbacks import Callback

    from components.training.trainer import build_trainer, fit

    class StepClock(Callback):
        """Step start/end times and losses; asks the trainer to stop at the step or time limit.

        On CUDA it waits for the GPU only at the first step, the warm-up boundary and when stopping (a
        sync per step would time launches as the stage never runs them). With a time budget the last
        steps before the stop are timed as launched; their tail is short against the run.
        """

        def __init__(self) -> None:
            self.t0, self.starts, self.ends, self.losses = 0.0, [], [], []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if len(self.starts) == warmup:
                sync(pl_module.device)
            self.starts.append(time.perf_counter())

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.losses.append(outputs["loss"].detach())
            last = steps and len(self.losses) >= steps
            if last or len(self.losses) == 1:
                sync(pl_module.device)
            self.ends.append(time.perf_counter())
            if last or (budget_s and self.ends[-1] - self.t0 >= budget_s):
                trainer.should_stop = True  # max_steps stays the schedule's length: same lr at every step

    clock = StepClock()
    # Validation off: it is the same work for every variant, and under compile it would add an eval graph.
    overrides = dict(limit_val_batches=0, enable_progress_bar=False, enable_model_summary=False)
    if not use_mlflow:
        overrides["logger"] = False
    with (tracking.stage_run(settings, stage) if use_mlflow else contextlib.nullcontext()) as run:
        trainer = build_trainer(settings, module.cfg, stage, run.info.run_id if run else None, callbacks=[clock],
                                **overrides)
        clock.t0 = time.perf_counter()  # the budget clock starts at fit(): setup and compilation count
        fit(trainer, module)
    return {"t0": clock.t0, "starts": clock.starts, "ends": clock.ends, "losses": [float(v) for v in clock.losses]}


def budget_figures(r: dict, budget_s: float, warmup: int, tokens_per_step: int) -> dict:
    """Steps and tokens finished within the budget, and the overhead before steady state (setup + compile)."""
    n = sum(1 for e in r["ends"] if e - r["t0"] <= budget_s)
    tps = steady_tps(r["starts"], r["ends"], warmup, tokens_per_step, n)
    # Time to reach step `warmup` beyond what that many steady steps cost: Lightning setup (+ compilation).
    overhead = (r["starts"][warmup] - r["t0"]) - warmup * tokens_per_step / tps
    return {"steps": n, "tokens": n * tokens_per_step, "tps": tps, "overhead_s": overhead,
            "first_step_s": r["ends"][0] - r["t0"]}


# ----------------------------------------------------------------------------- report
NAMES = {"loop": "plain PyTorch loop, eager", "loop_compiled": "plain PyTorch loop, compiled (baseline)",
         "lightning": "Lightning pretrain stage", "lightning_compiled": "Lightning stage, pretrain.compile=true"}


def median_row(values: list[float]) -> str:
    return f"{statistics.median(values):,.0f} ({min(values):,.0f}-{max(values):,.0f})"


def report(args, info: dict, peak: float, rounds: dict, busy: dict, budget: dict) -> dict:
    """Print the two tables (steady state from interleaved rounds; end to end in a wall budget) + goal check."""
    fpt, base = info["fpt"], info["baseline"]
    print(f"\ndevice {info['device']}, precision {args.precision}, kernels {info['kernels']}; model: preset "
          f"{args.preset}, {info['n_params'] / 1e6:.2f}M params, {fpt / 1e6:.2f} MFLOP/token; batch {args.batch} x "
          f"{info['block']} tokens; data: {info['data']}; torch threads {torch.get_num_threads()}")
    print(f"matmul peak ({args.precision}, best of {len(info['peaks'])}): {peak / 1e9:,.0f} GFLOP/s "
          f"(each: {', '.join(f'{p / 1e9:,.0f}' for p in info['peaks'])})")
    print(f"\nsteady state: {args.rounds} interleaved rounds of {args.warmup} + {args.steps} steps "
          f"(median, min-max; ratios paired within a round, against the {NAMES[base]})")
    print(f"| variant | tokens/s | vs {base} | MFU | others' CPU (max) |\n|---|---:|---:|---:|---:|")
    out: dict = {"peak_flops": peak, **info}
    for key, tps in rounds.items():
        ratios = [t / e for t, e in zip(tps, rounds[base])]
        mfu = fpt * statistics.median(tps) / peak
        print(f"| {NAMES[key]} | {median_row(tps)} | {statistics.median(ratios):.2f}x "
              f"({min(ratios):.2f}-{max(ratios):.2f}) | {100 * mfu:.1f}% | {100 * max(busy[key]):.0f}% |")
        out[key] = {"tps": tps, "ratio_median": statistics.median(ratios), "mfu": mfu, "others_cpu": busy[key]}
    if budget:
        print(f"\nend to end: tokens trained within {args.budget_s:.0f} s of wall time from trainer.fit()")
        print("| variant | setup + compile s | first step s | steps | tokens | tokens/s after warm-up | others' CPU |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for key, b in budget.items():
            print(f"| {NAMES[key]} | {b['overhead_s']:.1f} | {b['first_step_s']:.1f} | {b['steps']} | "
                  f"{b['tokens']:,} | {b['tps']:,.0f} | {100 * b['others_cpu']:.0f}% |")
            out[key]["budget"] = b
    if "lightning_compiled" in budget and "lightning" in budget:
        c, e = budget["lightning_compiled"], budget["lightning"]
        print(f"tokens within the budget, compiled / uncompiled Lightning: {c['tokens'] / e['tokens']:.2f}x")
        # Rate ratio from the interleaved rounds (paired, so steadier than two long runs apart in time).
        r = statistics.median(a / b for a, b in zip(rounds["lightning_compiled"], rounds["lightning"]))
        if r > 1:
            # tokens(B) ~ (B - overhead) * rate for each; equal at B = (o_c * r - o_e) / (r - 1).
            cross = (c["overhead_s"] * r - e["overhead_s"]) / (r - 1)
            print(f"break-even wall budget: ~{cross:.0f} s (compiled / uncompiled rate {r:.3f}x in the rounds)")
            out["break_even_s"] = cross
    best = "lightning_compiled" if "lightning_compiled" in rounds else "lightning"
    ratio = out[best]["ratio_median"]
    print(f"\ngoal: {NAMES[best]} / {NAMES[base]} = {ratio:.2f}x (goal >= {GOAL_RATIO}: "
          f"{'met' if ratio >= GOAL_RATIO else 'NOT met'}); best MFU = "
          f"{100 * max(v['mfu'] for k, v in out.items() if k in rounds):.1f}%")
    return out


# ----------------------------------------------------------------------------- main
def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny", choices=sorted(cfg.PRESETS))
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda when available")
    p.add_argument("--precision", default="auto", help="auto (resolve_precision: bf16-mixed on a bf16 GPU, 32-true "
                   "on CPU) | 32-true | bf16-mixed | 16-mixed")
    p.add_argument("--vocab", type=int, help="vocabulary (random ids); default 50304 for gpt2-124m, else tokenizer's")
    p.add_argument("--batch", type=int, default=16, help="sequences per step (pretrain.batch_size default)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant per round")
    p.add_argument("--warmup", type=int, default=3, help="steps left out of every steady-state figure")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (variant order rotates each round)")
    p.add_argument("--budget-s", type=float, default=120.0, help="wall budget of the end-to-end runs; 0 skips them")
    p.add_argument("--max-steps", type=int, default=1000, help="lr schedule length (runs are stopped before it)")
    p.add_argument("--data", default="auto", help="auto (real tokens if data/processed/tokens exists and the "
                   "preset is not gpt2-124m) | random | DIR")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--no-compile", action="store_true", help="leave out the compiled variants (baseline: eager loop)")
    p.add_argument("--no-mlflow", action="store_true", help="Lightning without its MLflow logger (default: a "
                   "throwaway SQLite store, as `llmcycle train pretrain` logs)")
    p.add_argument("--warm-cache", action="store_true", help="keep Inductor's on-disk cache (default: a cold one, "
                   "so compile time is what a first run pays)")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args()
    if args.rounds < 1 or args.steps < 1:
        p.error("--rounds and --steps must be at least 1")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here")
    args.precision = resolve_precision(args.precision, "gpu" if args.device == "cuda" else "cpu")
    if args.preset == "gpt2-124m":
        args.vocab = args.vocab or GPT2_VOCAB
        args.data = "random" if args.data == "auto" else args.data  # the stdlib tokens use a 4k vocabulary
    args.vocab = args.vocab or cfg.TokenizerConfig().vocab_size
    return args


def run_variant(key: str, settings, data, vocab, fpt, peak, device, args, modules: dict, mlf: bool) -> dict:
    """One round's run of a variant: warm-up + timed steps. Compiled modules are reused across rounds."""
    n = args.warmup + args.steps
    if key.startswith("loop"):
        return loop_run(settings, data, vocab, n, device, args.precision, args.warmup, key == "loop_compiled")
    compiled = key == "lightning_compiled"
    module = modules.get(key) if compiled else None  # compilation is paid once, as in one long run
    if module is None:
        module = modules[key] = lightning_module(settings, data, vocab, fpt, peak, compiled)
    return lightning_fit(settings, module, f"bench_{key}", mlf, args.warmup, steps=n)


def main() -> None:
    args = parse_args()
    tracking.quiet_env()
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # the throwaway store, never a shared server
    import lightning  # noqa: F401  (its import sets its loggers to INFO: quiet them after it)
    for name in ("lightning.pytorch", "lightning.fabric", "mlflow"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*(does not have many workers|treespec|TF32).*")
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # as build_trainer does
    with tempfile.TemporaryDirectory(prefix="llmcycle-bench-") as tmp:
        root = Path(tmp)
        if not args.warm_cache:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(root / "inductor")  # read when compiling, not at import
        settings, data_desc = make_project(root, args)
        c = settings.pretrain
        vocab = int(json.loads((layout.tokens_dir(settings) / "meta.json").read_text())["vocab_size"])
        shape = cfg.resolve_model_shape(settings, vocab_size=vocab)
        data = TokenData(settings, block_size=shape["block_size"], batch_size=c.batch_size, seed=c.seed)
        data.check()
        n_params = count_parameters(fresh_model(settings, vocab, c.seed))
        fpt = flops_per_token(n_params, shape["n_layer"], shape["n_embd"], shape["block_size"])
        tok = c.batch_size * shape["block_size"]
        mlf = not args.no_mlflow
        variants = ["loop", "lightning"] + ([] if args.no_compile else ["loop_compiled", "lightning_compiled"])
        from components.model.kernels import resolve_kernels
        info = {"n_params": n_params, "fpt": fpt, "block": shape["block_size"], "data": data_desc, "peaks": [],
                "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                "kernels": resolve_kernels(c.kernels, device.type),
                "baseline": "loop" if args.no_compile else "loop_compiled"}

        t_all, whole = time.perf_counter(), OthersCpu().__enter__()
        info["peaks"].append(matmul_peak(device, args.precision))
        peak = info["peaks"][0]
        budget: dict[str, dict] = {}
        modules: dict[str, object] = {}
        if args.budget_s > 0:
            for key in [v for v in variants if v.startswith("lightning")]:
                print(f"{key}: end-to-end run, {args.budget_s:.0f} s budget ...", flush=True)
                module = lightning_module(settings, data, vocab, fpt, peak, key == "lightning_compiled")
                with OthersCpu() as others:
                    r = lightning_fit(settings, module, f"bench_{key}_budget", mlf, args.warmup, budget_s=args.budget_s)
                budget[key] = {**budget_figures(r, args.budget_s, args.warmup, tok), "others_cpu": others.share}
                if key == "lightning_compiled":
                    modules[key] = module
                print(f"  {budget[key]['steps']} steps, {budget[key]['tps']:,.0f} tokens/s after warm-up", flush=True)

        rounds: dict[str, list[float]] = {k: [] for k in variants}
        busy: dict[str, list[float]] = {k: [] for k in variants}
        first_losses: dict[str, list[float]] = {}
        for i in range(args.rounds):
            order = variants[i % len(variants):] + variants[:i % len(variants)]  # no variant always goes first
            for key in order:
                with OthersCpu() as others:
                    r = run_variant(key, settings, data, vocab, fpt, peak, device, args, modules, mlf)
                rounds[key].append(steady_tps(r["starts"], r["ends"], args.warmup, tok))
                busy[key].append(others.share)
                first_losses.setdefault(key, r["losses"])
            print(f"round {i + 1}: " + ", ".join(f"{k} {v[-1]:,.0f}" for k, v in rounds.items()) + " tokens/s "
                  f"(others' CPU: {', '.join(f'{100 * v[-1]:.0f}%' for v in busy.values())})", flush=True)
        info["peaks"].append(matmul_peak(device, args.precision))
        info["kernels"] = getattr(modules.get("lightning_compiled"), "kernels", info["kernels"])
        out = report(args, info, max(info["peaks"]), rounds, busy, budget)

        # Same seed, same batches, same optimizer: the first losses must agree, or it is not like for like.
        k = min(5, len(first_losses["loop"]), len(first_losses["lightning"]))
        diff = max(abs(a - b) for a, b in zip(first_losses["loop"][:k], first_losses["lightning"][:k]))
        print(f"same math: max |loss(Lightning) - loss(plain loop)| over the first {k} steps = {diff:.1e}")
        whole.__exit__()
        print(f"total benchmark time {time.perf_counter() - t_all:.0f} s; other processes used "
              f"{100 * whole.share:.0f}% of the machine's CPU meanwhile")
        if args.json:
            out.update(loss_diff=diff, others_cpu=whole.share, args=vars(args),
                       date=time.strftime("%Y-%m-%d %H:%M"))
            Path(args.json).write_text(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()
