"""Pretraining-step throughput: a plain PyTorch loop vs the project's Lightning step vs Lightning + torch.compile.

Same model, same batches (TrainWindows), same fp32 AdamW + cosine schedule; prints tokens/s, paired ratios,
MFU against the matmul peak measured here, and tokens trained within a wall budget (compile time counted).
Compromise: 2 shared cores, so steady state comes from interleaved rounds, each tagged with other processes' CPU.
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


# ----------------------------------------------------------------------------- (a) the plain eager loop
def eager_run(settings: cfg.Settings, data: TokenData, vocab: int, steps: int) -> dict:
    """forward, loss, backward, clip, step, schedule, zero_grad: what the Lightning step does, nothing else."""
    c = settings.pretrain
    model = fresh_model(settings, vocab, c.seed)
    opt = configure_adamw(model, c)
    sched = cosine_with_warmup(opt, c.warmup_steps, c.max_steps, c.min_lr_ratio)
    params = [p for p in model.parameters() if p.requires_grad]
    batches = iter(data.train_loader(start_step=0))  # the same DataLoader the LightningModule uses
    starts, ends, losses = [], [], []
    for _ in range(steps):
        starts.append(time.perf_counter())
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
        ends.append(time.perf_counter())
    return {"starts": starts, "ends": ends, "losses": losses}


# ----------------------------------------------------------------------------- (b, c) the Lightning step
def lightning_module(settings: cfg.Settings, data: TokenData, vocab: int, fpt: float, peak: float,
                     compile_: bool) -> object:
    """The project's CausalLMModule on the seeded model; compile_ is the pretrain.compile=true path."""
    from components.training.pretrain import CausalLMModule

    c = settings.pretrain.model_copy(update={"compile": compile_})
    return CausalLMModule(fresh_model(settings, vocab, c.seed), c, data, fpt, peak_flops=peak, settings=settings)


def lightning_fit(settings: cfg.Settings, module: object, stage: str, use_mlflow: bool,
                  steps: int | None = None, budget_s: float | None = None) -> dict:
    """One trainer.fit through build_trainer, stopped after `steps` steps or once budget_s (from fit) is spent."""
    from lightning.pytorch.callbacks import Callback

    from components.training.trainer import build_trainer, fit

    class StepClock(Callback):
        """Per-step start/end times and losses; asks the trainer to stop at the step or time limit."""

        def __init__(self) -> None:
            self.t0, self.starts, self.ends, self.losses = 0.0, [], [], []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.starts.append(time.perf_counter())

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.ends.append(time.perf_counter())
            self.losses.append(float(outputs["loss"]))
            if (steps and len(self.ends) >= steps) or (budget_s and self.ends[-1] - self.t0 >= budget_s):
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
    return {"t0": clock.t0, "starts": clock.starts, "ends": clock.ends, "losses": clock.losses}


def budget_figures(r: dict, budget_s: float, warmup: int, tokens_per_step: int) -> dict:
    """Steps and tokens finished within the budget, and the overhead before steady state (setup + compile)."""
    n = sum(1 for e in r["ends"] if e - r["t0"] <= budget_s)
    tps = steady_tps(r["starts"], r["ends"], warmup, tokens_per_step, n)
    # Time to reach step `warmup` beyond what that many steady steps cost: Lightning setup (+ compilation).
    overhead = (r["starts"][warmup] - r["t0"]) - warmup * tokens_per_step / tps
    return {"steps": n, "tokens": n * tokens_per_step, "tps": tps, "overhead_s": overhead,
            "first_step_s": r["ends"][0] - r["t0"]}


# ----------------------------------------------------------------------------- report
def median_row(values: list[float]) -> str:
    return f"{statistics.median(values):,.0f} ({min(values):,.0f}-{max(values):,.0f})"


def report(args, info: dict, peak: float, rounds: dict, busy: dict, budget: dict) -> dict:
    """Print the two tables (steady state from interleaved rounds; end to end in a wall budget) + goal check."""
    fpt = info["fpt"]
    names = {"eager": "eager PyTorch loop (baseline)", "lightning": "Lightning pretrain step",
             "compiled": "Lightning + torch.compile"}
    print(f"\nmodel: preset {args.preset}, {info['n_params'] / 1e6:.2f}M params, {fpt / 1e6:.2f} MFLOP/token; "
          f"batch {args.batch} x {info['block']} tokens; data: {info['data']}; torch threads {torch.get_num_threads()}")
    print(f"matmul peak (fp32, best of {len(info['peaks'])}): {peak / 1e9:.0f} GFLOP/s "
          f"(each: {', '.join(f'{p / 1e9:.0f}' for p in info['peaks'])})")
    print(f"\nsteady state: {args.rounds} interleaved rounds of {args.warmup} + {args.steps} steps "
          "(median, min-max; ratios paired within a round)")
    print("| variant | tokens/s | vs eager | MFU | others' CPU (max) |\n|---|---:|---:|---:|---:|")
    out: dict = {"peak_flops": peak, **{k: v for k, v in info.items() if k != "peaks"}, "peaks": info["peaks"]}
    for key, tps in rounds.items():
        ratios = [t / e for t, e in zip(tps, rounds["eager"])]
        mfu = fpt * statistics.median(tps) / peak
        print(f"| {names[key]} | {median_row(tps)} | {statistics.median(ratios):.2f}x "
              f"({min(ratios):.2f}-{max(ratios):.2f}) | {100 * mfu:.1f}% | {100 * max(busy[key]):.0f}% |")
        out[key] = {"tps": tps, "ratio_median": statistics.median(ratios), "mfu": mfu, "others_cpu": busy[key]}
    if budget:
        print(f"\nend to end: tokens trained within {args.budget_s:.0f} s of wall time from trainer.fit()")
        print("| variant | setup + compile s | first step s | steps | tokens | tokens/s after warm-up | others' CPU |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for key, b in budget.items():
            print(f"| {names[key]} | {b['overhead_s']:.1f} | {b['first_step_s']:.1f} | {b['steps']} | "
                  f"{b['tokens']:,} | {b['tps']:,.0f} | {100 * b['others_cpu']:.0f}% |")
            out[key]["budget"] = b
    if "compiled" in budget and "lightning" in budget:
        c, e = budget["compiled"], budget["lightning"]
        print(f"tokens within the budget, Lightning + compile / Lightning: {c['tokens'] / e['tokens']:.2f}x")
        # Rate ratio from the interleaved rounds (paired, so steadier than two long runs apart in time).
        r = statistics.median(a / b for a, b in zip(rounds["compiled"], rounds["lightning"]))
        if r > 1:
            # tokens(B) ~ (B - overhead) * rate for each; equal at B = (o_c * r - o_e) / (r - 1).
            cross = (c["overhead_s"] * r - e["overhead_s"]) / (r - 1)
            print(f"break-even wall budget: ~{cross:.0f} s (compiled / Lightning rate {r:.3f}x in the rounds)")
            out["break_even_s"] = cross
    ratio = out["compiled" if "compiled" in rounds else "lightning"]["ratio_median"]
    mfu = max(v["mfu"] for k, v in out.items() if k in rounds)
    print(f"\ngoals: Lightning{' + compile' if 'compiled' in rounds else ''} / eager = {ratio:.2f}x "
          f"(goal >= {GOAL_RATIO}: {'met' if ratio >= GOAL_RATIO else 'NOT met'}); best MFU = {100 * mfu:.1f}% "
          f"(goal >= {100 * GOAL_MFU:.0f}%: {'met' if mfu >= GOAL_MFU else 'NOT met'})")
    return out


# ----------------------------------------------------------------------------- main
def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny", choices=sorted(cfg.PRESETS))
    p.add_argument("--batch", type=int, default=16, help="sequences per step (pretrain.batch_size default)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant per round")
    p.add_argument("--warmup", type=int, default=3, help="steps left out of every steady-state figure")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (variant order rotates each round)")
    p.add_argument("--budget-s", type=float, default=120.0, help="wall budget of the end-to-end runs; 0 skips them")
    p.add_argument("--max-steps", type=int, default=1000, help="lr schedule length (runs are stopped before it)")
    p.add_argument("--data", default="auto", help="auto (real tokens if data/processed/tokens exists) | random | DIR")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile variant")
    p.add_argument("--no-mlflow", action="store_true", help="Lightning without its MLflow logger (default: a "
                   "throwaway SQLite store, as `llmcycle train pretrain` logs)")
    p.add_argument("--warm-cache", action="store_true", help="keep Inductor's on-disk cache (default: a cold one, "
                   "so compile time is what a first run pays)")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args()
    if args.rounds < 1 or args.steps < 1:
        p.error("--rounds and --steps must be at least 1")
    return args


def main() -> None:
    args = parse_args()
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
        vocab = int(json.loads((layout.tokens_dir(settings) / "meta.json").read_text())["vocab_size"])
        shape = cfg.resolve_model_shape(settings, vocab_size=vocab)
        data = TokenData(settings, block_size=shape["block_size"], batch_size=c.batch_size, seed=c.seed)
        data.check()
        n_params = count_parameters(fresh_model(settings, vocab, c.seed))
        fpt = flops_per_token(n_params, shape["n_layer"], shape["n_embd"], shape["block_size"])
        tok = c.batch_size * shape["block_size"]
        mlf = not args.no_mlflow
        info = {"n_params": n_params, "fpt": fpt, "block": shape["block_size"], "data": data_desc, "peaks": []}

        t_all, whole = time.perf_counter(), OthersCpu().__enter__()
        info["peaks"].append(matmul_peak())
        peak = info["peaks"][0]
        variants = ["eager", "lightning"] + ([] if args.no_compile else ["compiled"])
        budget: dict[str, dict] = {}
        compiled = None
        if args.budget_s > 0:
            for key in variants[1:]:
                print(f"{key}: end-to-end run, {args.budget_s:.0f} s budget ...", flush=True)
                module = lightning_module(settings, data, vocab, fpt, peak, key == "compiled")
                with OthersCpu() as others:
                    r = lightning_fit(settings, module, f"bench_{key}_budget", mlf, budget_s=args.budget_s)
                budget[key] = {**budget_figures(r, args.budget_s, args.warmup, tok), "others_cpu": others.share}
                compiled = module if key == "compiled" else compiled
                print(f"  {budget[key]['steps']} steps, {budget[key]['tps']:,.0f} tokens/s after warm-up", flush=True)

        rounds: dict[str, list[float]] = {k: [] for k in variants}
        busy: dict[str, list[float]] = {k: [] for k in variants}
        first_losses: dict[str, list[float]] = {}
        for i in range(args.rounds):
            order = variants[i % len(variants):] + variants[:i % len(variants)]  # no variant always goes first
            for key in order:
                n = args.warmup + args.steps
                # The compiled module is reused across rounds: compilation is paid once, as in one long run.
                if key == "compiled" and compiled is None:
                    compiled = lightning_module(settings, data, vocab, fpt, peak, True)
                module = compiled if key == "compiled" else \
                    lightning_module(settings, data, vocab, fpt, peak, False) if key == "lightning" else None
                with OthersCpu() as others:
                    r = eager_run(settings, data, vocab, n) if key == "eager" else \
                        lightning_fit(settings, module, f"bench_{key}", mlf, steps=n)
                rounds[key].append(steady_tps(r["starts"], r["ends"], args.warmup, tok))
                busy[key].append(others.share)
                first_losses.setdefault(key, r["losses"])
            print(f"round {i + 1}: " + ", ".join(f"{k} {v[-1]:,.0f}" for k, v in rounds.items()) + " tokens/s "
                  f"(others' CPU: {', '.join(f'{100 * v[-1]:.0f}%' for v in busy.values())})", flush=True)
        info["peaks"].append(matmul_peak())
        out = report(args, info, max(info["peaks"]), rounds, busy, budget)

        # Same seed, same batches, same optimizer: the first losses must agree, or it is not like for like.
        k = min(5, len(first_losses["eager"]), len(first_losses["lightning"]))
        diff = max(abs(a - b) for a, b in zip(first_losses["eager"][:k], first_losses["lightning"][:k]))
        print(f"same math: max |loss(Lightning) - loss(eager)| over the first {k} steps = {diff:.1e}")
        whole.__exit__()
        print(f"total benchmark time {time.perf_counter() - t_all:.0f} s; other processes used "
              f"{100 * whole.share:.0f}% of the machine's CPU meanwhile")
        if args.json:
            out.update(loss_diff=diff, others_cpu=whole.share, args=vars(args),
                       date=time.strftime("%Y-%m-%d %H:%M"))
            Path(args.json).write_text(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()
