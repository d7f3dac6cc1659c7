"""Scoping: how big a model the training device, budget and corpus justify, and what success means.

The budget is the pretrain stage's wall time on the device it will train on, in the precision it will
use (components/scoping_probe.py measures both). A first guess from the matmul peak picks a shape;
probing that shape's real steps, a validation batch and a checkpoint write turns the budget into
steps (validation, checkpoints, logging and the stage's fixed costs counted), and the tokens those
steps feed say whether another size is compute-optimal (C ~= 6*N*D, D ~= tokens_per_param*N, capped
by the corpus times max_epochs): a few rounds until the shape settles. The pure arithmetic (sizing,
budget -> steps) is separate from the measuring so it can be checked by hand. Compromises: Lightning's
per-step and per-log costs are fixed estimates measured on the 2-core CPU, not probed (see below).
"""
from __future__ import annotations

import json
import math
import os
import sysconfig
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from components.config import PRESETS, ScopingConfig, Settings
from components.errors import ConfigError
from components.data import layout

CHARS_PER_TOKEN = 3.5  # byte-level BPE on Python source at a 4k vocab; only used before the data stage ran
# Only sizes the first probed shape; the measured throughput replaces it (a 2x32 model reaches ~14% on CPU).
FIRST_GUESS_MFU = 0.15
# Lightning's own work per training step (hooks, batch fetch, lr schedule, two self.log calls) and per
# logged point (an MLflow SQLite write, the loss read of the NaN guard): 14-37 ms a point measured here.
LOOP_STEP_S = 0.004
LOG_POINT_S = 0.02
COMPILE_S = 40.0         # torch.compile of the training step before its first step (TRAPS.md: ~41 s on CPU)
CKPT_FILES = 2           # ModelCheckpoint(save_top_k=1, save_last=True) writes step-N.ckpt and last.ckpt
POINTS_PER_CURVE = 100   # trainer.log_every: a point every max(1, max_steps // 100) steps
# An optimum below scoping.min_params is raised to it; refused only when more than this factor below, i.e.
# when the min_params model would see fewer than tokens_per_param / 16 tokens per parameter (~1). Stricter
# refusals failed the default budget whenever other work slowed the probe on a shared 2-core machine.
MIN_PARAMS_SLACK = 4.0


@dataclass
class Plan:
    """The compute-optimal plan for a budget (all pure arithmetic)."""
    budget_flops: float
    available_tokens: float
    n_params: float
    n_tokens: float
    flops: float
    data_limited: bool
    epochs: float


@dataclass(frozen=True)
class StepCosts:
    """Seconds each part of a pretrain stage costs (measured by the probe, or the estimates above)."""
    step_s: float                 # one training step: forward, backward, clip, AdamW
    val_batch_s: float            # one validation batch
    ckpt_s: float                 # one checkpoint file
    fixed_s: float = 0.0          # the stage outside its steps (imports, MLflow, generations, model logging)
    warmup_s: float = 0.0         # what the first step costs beyond step_s
    loop_s: float = LOOP_STEP_S   # Lightning's per-step bookkeeping
    log_s: float = LOG_POINT_S    # one logged point


@dataclass(frozen=True)
class Cadence:
    """How often the stage validates and checkpoints (pretrain.val_every, val_batches, ckpt_every)."""
    val_every: int
    val_batches: int
    ckpt_every: int


# ----------------------------------------------------------------------------- pure arithmetic
def param_count(n_layer: int, n_embd: int, vocab_size: int, intermediate_size: int | None = None) -> int:
    """Parameters of the Llama-style decoder we build (tied embeddings, no biases).

    per layer: attention q,k,v,o = 4*d^2; SwiGLU gate,up,down = 3*d*ff; two RMSNorm weights = 2*d.
    plus token embeddings V*d (tied with the LM head) and the final norm d.
    """
    ff = intermediate_size or default_intermediate(n_embd)
    per_layer = 4 * n_embd * n_embd + 3 * n_embd * ff + 2 * n_embd
    return n_layer * per_layer + vocab_size * n_embd + n_embd


def default_intermediate(n_embd: int) -> int:
    return max(32, int(round(n_embd * 8 / 3 / 32)) * 32)


def chinchilla_plan(budget_flops: float, available_tokens: float, tokens_per_param: float = 20.0,
                    max_epochs: float = 4.0) -> Plan:
    """Compute-optimal N and D for a budget C: C = 6*N*D with D = r*N  =>  N = sqrt(C / (6 r)), D = r*N.

    When D exceeds what the data allows (available_tokens * max_epochs), D is capped and N follows the
    same ratio (N = D / r): more parameters would not be fed enough distinct tokens to pay off.
    """
    n_opt = math.sqrt(budget_flops / (6.0 * tokens_per_param))
    d_opt = tokens_per_param * n_opt
    d_max = available_tokens * max_epochs
    if d_opt <= d_max:
        n, d, limited = n_opt, d_opt, False
    else:
        d = d_max
        n = d / tokens_per_param
        limited = True
    return Plan(budget_flops=budget_flops, available_tokens=available_tokens, n_params=n, n_tokens=d,
                flops=6.0 * n * d, data_limited=limited, epochs=d / max(available_tokens, 1.0))


MIN_EMBD = 64    # at least two heads of 32: a 1-head, 32-dim model is mostly embedding table (vocab x 32)


def shape_for_params(target: float, vocab_size: int, block_size: int, head_dim: int = 32,
                     min_params: int = 0) -> dict[str, int]:
    """The (n_layer, n_embd) on a small grid whose parameter count is closest to target (log scale),
    never below min_params and never narrower than MIN_EMBD (two heads)."""
    best: tuple[float, dict[str, int]] | None = None
    for n_embd in (64, 96, 128, 192, 256, 384, 512, 768, 1024):
        for n_layer in range(2, 25):
            n = param_count(n_layer, n_embd, vocab_size)
            # Keep depth and width in proportion (aspect ratio d/L between 16 and 96, as small GPTs do).
            if not 16 <= n_embd / n_layer <= 96 or n < min_params or n_embd < MIN_EMBD:
                continue
            err = abs(math.log(n / target))
            if best is None or err < best[0]:
                best = (err, dict(n_layer=n_layer, n_head=max(1, n_embd // head_dim), n_embd=n_embd,
                                  block_size=block_size, intermediate_size=default_intermediate(n_embd)))
    assert best is not None
    return best[1]


def training_memory_bytes(n_params: float, n_layer: int, n_embd: int, n_head: int, batch: int, block: int,
                          activation_factor: float = 2.0) -> float:
    """AdamW training memory: 16 B/param (fp32 weights, grads, two moments) + activations.

    Activations per layer ~ B*T*(34*d + 5*h*T) bytes in 16-bit (Korthikanti et al. 2022); activation_factor
    2 for fp32 training, 1 under bf16/fp16 autocast.
    """
    states = 16.0 * n_params
    activations = activation_factor * n_layer * batch * block * (34 * n_embd + 5 * n_head * block)
    return states + activations


def stage_seconds(steps: int, costs: StepCosts, cadence: Cadence) -> float:
    """Wall seconds of a pretrain stage of `steps` steps.

    fixed + first-step extra + steps * (step + loop)
    + validations * (val_batches * val_batch + one logged point)   validations = ceil(steps / val_every):
                                                                   one per val_every, and the stage's final one
    + (steps // ckpt_every) * CKPT_FILES * ckpt
    + logged points * log,    points = steps // max(1, steps // POINTS_PER_CURVE)
    """
    n_val = math.ceil(steps / cadence.val_every)
    n_ckpt = steps // cadence.ckpt_every
    n_log = steps // max(1, steps // POINTS_PER_CURVE)
    return (costs.fixed_s + costs.warmup_s + steps * (costs.step_s + costs.loop_s)
            + n_val * (cadence.val_batches * costs.val_batch_s + costs.log_s)
            + n_ckpt * CKPT_FILES * costs.ckpt_s + n_log * costs.log_s)


def steps_for_budget(budget_s: float, costs: StepCosts, cadence: Cadence) -> int:
    """The most steps whose stage_seconds fit in budget_s; at least 1 (a budget below the fixed costs
    cannot be kept: the plan then says so through its planned seconds).

    Bisection: stage_seconds only grows with steps except where the logging interval widens (e.g. 199
    points at 199 steps, 100 at 200), a dip of a few points; the final walk-down settles any overshoot.
    """
    lo, hi = 1, 2
    while stage_seconds(hi, costs, cadence) <= budget_s:
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # invariant (up to the dips): seconds(lo) <= budget < seconds(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if stage_seconds(mid, costs, cadence) <= budget_s else (lo, mid)
    while lo > 1 and stage_seconds(lo, costs, cadence) > budget_s:
        lo -= 1
    return lo


def sizing_curve(budget: float, tokens: float, vocab: int, block: int, ratio: float) -> list[dict]:
    """Iso-FLOP candidates: for N around the optimum, D = C/(6N); the loss proxy favours D ~= ratio*N.

    Loss proxy from Hoffmann et al. (2022) fit: L(N, D) = E + A/N^0.34 + B/D^0.28.
    """
    n_opt = math.sqrt(budget / (6.0 * ratio))
    out = []
    for factor in (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0):
        n = n_opt * factor
        d = budget / (6.0 * n)
        loss = 1.69 + 406.4 / n ** 0.34 + 410.7 / d ** 0.28
        out.append({"n_params": n, "n_tokens": d, "epochs": d / max(tokens, 1.0), "loss_proxy": loss})
    return out


# ----------------------------------------------------------------------------- the corpus
def available_train_tokens(settings: Settings) -> tuple[float, str]:
    """Training tokens the corpus offers: exact after the data stage, else estimated from bytes."""
    meta = layout.tokens_dir(settings) / "meta.json"
    if meta.exists():
        return float(json.loads(meta.read_text())["tokens"]["train"]), "data/processed/tokens/meta.json"
    corpus = layout.corpus_path(settings)
    train_share = 1.0 - settings.data.split.val - settings.data.split.test
    if corpus.exists():
        return corpus.stat().st_size * train_share / CHARS_PER_TOKEN, "estimated from data/raw/corpus.jsonl"
    return _source_bytes(settings) * train_share / CHARS_PER_TOKEN, f"estimated from {settings.data.source} bytes"


def _source_bytes(settings: Settings) -> float:
    src = settings.data.source
    if src.startswith("jsonl:"):
        p = settings.path(src[len("jsonl:"):])
        if not p.exists():
            raise ConfigError(f"data.source: {p} does not exist")
        return float(p.stat().st_size)
    root = Path(sysconfig.get_paths()["stdlib"]) if src == "stdlib" else settings.path(src[len("dir:"):])
    if not root.exists():
        raise ConfigError(f"data.source: {root} does not exist")
    pattern = "**/*.py" if src == "stdlib" else settings.data.glob
    excluded = set(settings.data.exclude_dirs)
    total = 0
    for f in root.glob(pattern):
        if f.is_file() and not excluded.intersection(f.relative_to(root).parts[:-1]):
            total += f.stat().st_size
    return float(total)


# ----------------------------------------------------------------------------- the stage
@dataclass
class ScopingReport:
    matmul_flops: float           # peak of the training device in the training dtype (pretrain's MFU base)
    train_tokens_per_sec: float   # the chosen shape's probed training steps (all ranks)
    achieved_flops: float         # 6 * N * that rate
    tokens_source: str
    plan: dict                    # the Chinchilla plan for what the budget buys at the measured rate
    model: dict
    n_params: int
    pretrain_steps: int
    train_memory_gb: float
    serving_ms_per_token: float
    success: dict
    candidates: list[dict] = field(default_factory=list)
    plan_key: str = ""
    reused: bool = False
    accelerator: str = "cpu"
    device_name: str = ""
    precision: str = "32-true"
    world_size: int = 1
    budget_seconds: float | None = None      # None when scoping.budget_flops sets the budget
    planned_pretrain_seconds: float = 0.0    # stage_seconds(pretrain_steps): what the lifecycle compares with
    tokens_to_train: float = 0.0             # pretrain_steps * batch * block * ranks
    costs: dict = field(default_factory=dict)
    assumed_tokens_per_sec: float | None = None     # scoping.reference_tokens_per_sec (budget_flops plans)
    assumed_pretrain_seconds: float | None = None   # the planned stage at that speed: what the budget expected
    probes: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def plan_key(settings: Settings, accelerator: str, device_name: str, precision: str) -> str:
    """What the plan depends on besides measurements: its inputs' params and the device and precision
    it was measured on. Equal keys reuse the plan."""
    import hashlib

    import torch

    parts: dict = {k: getattr(settings, k).model_dump(mode="json") for k in ("scoping", "data", "tokenizer", "model")}
    pt = settings.pretrain
    parts["pretrain"] = {k: getattr(pt, k, None) for k in (
        "batch_size", "val_every", "val_batches", "ckpt_every", "grad_clip", "devices", "num_nodes", "strategy",
        "compile", "kernels", "fused_adamw")}
    parts["target"] = {"accelerator": accelerator, "device": device_name, "precision": precision,
                       "torch": torch.__version__}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class _Candidate:
    shape: dict
    n_params: int
    costs: StepCosts
    steps: int
    plan: Plan      # the optimum for what this shape's steps buy (or the fixed budget_flops plan)


def _reused(previous: Path, key: str) -> ScopingReport | None:
    cached = json.loads(previous.read_text())
    if cached.get("plan_key") != key:
        return None
    names = {f.name for f in fields(ScopingReport)}
    try:
        return ScopingReport(**{**{k: v for k, v in cached.items() if k in names}, "reused": True})
    except TypeError:  # written by an older version of this module: measure again
        return None


def run(settings: Settings, measure_steps: int | None = None, reuse: bool = False) -> ScopingReport:
    """Measure, size, refuse what cannot work, and write data/scoping/{model,report}.json.

    reuse=True returns the previous plan when its inputs (plan_key) are unchanged: measurements are
    noisy, and a re-run of the lifecycle must build the same model to be reproducible.
    """
    from components import scoping_probe

    sc, pt = settings.scoping, settings.pretrain
    target = scoping_probe.training_target(pt)
    key = plan_key(settings, target.device, target.name, target.precision)
    out = layout.scoping_dir(settings)
    if reuse and (out / "report.json").exists() and (out / "model.json").exists():
        cached = _reused(out / "report.json", key)
        if cached is not None:
            return cached
    block = settings.model.block_size or PRESETS["tiny"]["block_size"]
    vocab = settings.tokenizer.vocab_size
    step_tokens = pt.batch_size * block * target.world_size
    cadence = Cadence(pt.val_every, pt.val_batches, pt.ckpt_every)
    r = sc.tokens_per_param
    budget_s = None if sc.budget_flops else sc.budget_minutes * 60.0
    tokens, tokens_source = available_train_tokens(settings)
    matmul = scoping_probe.measure_matmul_flops(target)
    fixed_s = sc.stage_overhead_s + (COMPILE_S if scoping_probe.compiled(pt, target.device) else 0.0)

    def floor(n_opt: float) -> float:
        return max(n_opt, float(sc.min_params))  # raised to the smallest sensible model (refused below, if too far)

    if budget_s is None:
        plan = chinchilla_plan(sc.budget_flops, tokens, r, sc.max_epochs)
    else:  # first guess only: the probes replace this rate with the measured one
        guess_s = max(budget_s - fixed_s, 0.1 * budget_s)
        plan = chinchilla_plan(guess_s * matmul * FIRST_GUESS_MFU * target.world_size, tokens, r, sc.max_epochs)
    shape = shape_for_params(floor(plan.n_params), vocab, block, min_params=sc.min_params)
    candidates: list[_Candidate] = []
    for _ in range(sc.probe_rounds):
        if any(c.shape == shape for c in candidates):
            break  # settled (or back to a shape already measured)
        full = dict(shape, vocab_size=vocab)
        n = param_count(shape["n_layer"], shape["n_embd"], vocab, shape["intermediate_size"])
        p = scoping_probe.probe(full, pt, target, measure_steps or sc.measure_steps, scratch=out)
        costs = StepCosts(step_s=p.step_s, val_batch_s=p.val_batch_s, ckpt_s=p.ckpt_s, fixed_s=fixed_s,
                          warmup_s=max(0.0, p.warmup_s - p.step_s))
        if budget_s is None:
            # The budget's FLOPs spent on this very shape: C = 6 * N_shape * steps * step_tokens. The plan (hence
            # the model and the step count) is the same on every machine; only its predicted wall time moves.
            steps = max(1, int(sc.budget_flops // (6.0 * n * step_tokens)))
            shape_plan = plan
        else:
            steps = steps_for_budget(budget_s, costs, cadence)
            # What this shape trains in the budget, as FLOPs, sets the optimum for the next round.
            shape_plan = chinchilla_plan(6.0 * n * steps * step_tokens, tokens, r, sc.max_epochs)
            if shape_plan.data_limited:  # more epochs would not pay off: stop early, under budget
                steps = min(steps, max(1, math.ceil(tokens * sc.max_epochs / step_tokens)))
        candidates.append(_Candidate(shape=shape, n_params=n, costs=costs, steps=steps, plan=shape_plan))
        shape = shape_for_params(floor(shape_plan.n_params), vocab, block, min_params=sc.min_params)
    # The probed shape closest to the Chinchilla ratio at its own measured speed (robust to a noisy probe
    # that would send the search back and forth).
    best = min(candidates, key=lambda c: abs(math.log(c.steps * step_tokens / (r * c.n_params))))
    _refuse_too_small(best, sc, tokens, step_tokens)
    return _finish(settings, target, key, matmul, best, candidates, cadence, budget_s, step_tokens,
                   tokens_source)


def _refuse_too_small(best: _Candidate, sc: ScopingConfig, tokens: float, step_tokens: int) -> None:
    """ConfigError when the optimum lies more than MIN_PARAMS_SLACK below scoping.min_params."""
    if best.plan.n_params * MIN_PARAMS_SLACK >= sc.min_params:
        return
    achieved = 6.0 * best.n_params * step_tokens / best.costs.step_s
    need_flops = 6.0 * sc.min_params * sc.tokens_per_param * sc.min_params
    need_tokens = sc.tokens_per_param * sc.min_params / sc.max_epochs
    why = (f"needs a budget of {need_flops:.3g} FLOPs (~{need_flops / achieved / 60:.1f} min of training here)"
           if not best.plan.data_limited else f"needs >= {need_tokens:,.0f} training tokens (have {tokens:,.0f})")
    raise ConfigError(
        f"scoping: the plan gives {best.plan.n_params:,.0f} parameters, below scoping.min_params="
        f"{sc.min_params:,}; a model that small {why} (scoping.budget_minutes / budget_flops, data.source)")


def _finish(settings: Settings, target, key: str, matmul: float, best: _Candidate, candidates: list[_Candidate],
            cadence: Cadence, budget_s: float | None, step_tokens: int, tokens_source: str) -> ScopingReport:
    """The report of the chosen candidate; writes model.json (scoping.apply) and report.json."""
    from components import scoping_probe

    sc, pt = settings.scoping, settings.pretrain
    shape = dict(best.shape, vocab_size=settings.tokenizer.vocab_size)
    tps = step_tokens / best.costs.step_s
    planned = stage_seconds(best.steps, best.costs, cadence)
    notes = []
    if best.plan.n_params < sc.min_params:
        notes.append(f"the optimum, {best.plan.n_params:,.0f} parameters, is below scoping.min_params="
                     f"{sc.min_params:,}: sized for that (nearest shape {best.n_params:,})")
    if budget_s is not None and planned > budget_s * 1.001:
        notes.append(f"the budget ({budget_s:.0f} s) is below the stage's fixed costs plus one step "
                     f"(scoping.stage_overhead_s={sc.stage_overhead_s:g}): planned {planned:.0f} s")
    if best.plan.data_limited:
        notes.append("data-limited: the plan stops at scoping.max_epochs, before the budget is spent")
    if scoping_probe.compiled(pt, target.device):
        notes.append(f"compiled run: {COMPILE_S:.0f} s of compilation counted; steps probed eager, so it may "
                     "finish early")
    assumed_tps = sc.reference_tokens_per_sec if budget_s is None else None
    assumed_s = None
    if assumed_tps:
        # The same stage with its steps at the reference speed (fixed, validation and checkpoint costs as measured).
        assumed_costs = StepCosts(**{**asdict(best.costs), "step_s": step_tokens / assumed_tps})
        assumed_s = stage_seconds(best.steps, assumed_costs, cadence)
        ratio = tps / assumed_tps
        notes.append(f"FLOP budget: the same plan on every machine; measured {tps:,.0f} tokens/s is {ratio:.2f}x the "
                     f"{assumed_tps:,.0f} it was sized for, so pretraining takes ~{planned:.0f} s (not {assumed_s:.0f})")
    mixed = target.precision.endswith("-mixed") or target.precision.startswith(("bf16", "16"))
    memory = training_memory_bytes(best.n_params, shape["n_layer"], shape["n_embd"], shape["n_head"], pt.batch_size,
                                   shape["block_size"], activation_factor=1.0 if mixed else 2.0)
    report = ScopingReport(
        matmul_flops=matmul, train_tokens_per_sec=tps, achieved_flops=6.0 * best.n_params * tps,
        tokens_source=tokens_source, plan=asdict(best.plan), model=shape, n_params=best.n_params,
        pretrain_steps=best.steps, train_memory_gb=memory / 1e9,
        serving_ms_per_token=2.0 * best.n_params / matmul * 1e3, success=sc.success.model_dump(),
        candidates=sizing_curve(best.plan.budget_flops, best.plan.available_tokens, shape["vocab_size"],
                                shape["block_size"], sc.tokens_per_param),
        plan_key=key, accelerator=target.device, device_name=target.name, precision=target.precision,
        world_size=target.world_size, budget_seconds=budget_s, planned_pretrain_seconds=planned,
        tokens_to_train=float(best.steps * step_tokens),
        costs=asdict(best.costs), assumed_tokens_per_sec=assumed_tps, assumed_pretrain_seconds=assumed_s,
        probes=[{"n_layer": c.shape["n_layer"], "n_embd": c.shape["n_embd"], "n_params": c.n_params,
                 "step_s": c.costs.step_s, "tokens_per_sec": step_tokens / c.costs.step_s, "steps": c.steps,
                 "tokens_per_param": c.steps * step_tokens / c.n_params} for c in candidates],
        notes=notes)
    out = layout.scoping_dir(settings)
    out.mkdir(parents=True, exist_ok=True)
    if sc.apply:
        _atomic_json(out / "model.json", {k: v for k, v in shape.items() if k != "vocab_size"})
    _atomic_json(out / "report.json", asdict(report))
    return report


def _atomic_json(path: Path, obj: object) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    os.replace(tmp, path)


def plot_sizing_curve(report: ScopingReport, path: Path) -> Path:
    """The iso-FLOP sizing curve with the chosen point (PNG, for MLflow)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [c["n_params"] for c in report.candidates]
    losses = [c["loss_proxy"] for c in report.candidates]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(ns, losses, "o-", label="iso-FLOP candidates (Chinchilla loss fit)")
    ax.axvline(report.n_params, color="red", ls="--", label=f"chosen: {report.n_params / 1e6:.2f}M params")
    ax.set_xscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("predicted loss (proxy)")
    ax.set_title(f"budget {report.plan['budget_flops']:.2e} FLOPs")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def summary_rows(report: ScopingReport) -> list[tuple[str, str]]:
    """The scoping report as (what, value) rows for the console table and MLflow."""
    p = report.plan
    m = report.model
    c = report.costs
    budget = f"{report.budget_seconds:.0f} s" if report.budget_seconds is not None else f"{p['budget_flops']:.3g} FLOPs"
    trained = report.tokens_to_train

    def ms(key: str) -> str:
        return f"{c.get(key, 0.0) * 1e3:.0f}"
    mfu = report.achieved_flops / (report.matmul_flops * report.world_size)
    rows = [
        ("training device", f"{report.device_name} ({report.accelerator}, {report.precision}"
                            f"{f', {report.world_size} ranks' if report.world_size > 1 else ''})"),
        ("matmul peak", f"{report.matmul_flops / 1e9:.1f} GFLOP/s"),
        ("training throughput (probe, chosen shape)", f"{report.train_tokens_per_sec:,.0f} tokens/s "
                                                      f"({mfu:.0%} MFU)"),
        ("probed shapes", ", ".join(f"{x['n_layer']}x{x['n_embd']}: {x['tokens_per_sec']:,.0f} tok/s"
                                    for x in report.probes)),
        ("budget", budget),
        ("compute the budget buys", f"{p['budget_flops']:.3g} FLOPs"),
        ("training tokens available", f"{p['available_tokens']:,.0f} ({report.tokens_source})"),
        ("chosen model", f"{m['n_layer']} layers x {m['n_embd']} dims, {m['n_head']} heads, ctx {m['block_size']}"),
        ("parameters", f"{report.n_params:,} (optimum {p['n_params']:,.0f})"),
        ("tokens to train", f"{trained:,.0f} ({trained / max(p['available_tokens'], 1.0):.2f} epochs"
                            f"{', data-limited' if p['data_limited'] else ''})"),
        ("pretrain steps", f"{report.pretrain_steps:,}"),
        *([("speed the plan assumed", f"{report.assumed_tokens_per_sec:,.0f} tokens/s: "
                                        f"{report.assumed_pretrain_seconds:.0f} s of pretraining")]
          if report.assumed_tokens_per_sec else []),
        ("planned pretrain wall time", f"{report.planned_pretrain_seconds:.0f} s (step {ms('step_s')} ms, "
                                       f"val batch {ms('val_batch_s')} ms, checkpoint {ms('ckpt_s')} ms, "
                                       f"fixed {c.get('fixed_s', 0):.0f} s)"),
        ("training memory (AdamW)", f"{report.train_memory_gb:.2f} GB"),
        ("serving latency estimate (compute-bound)", f"{report.serving_ms_per_token * 1e3:.1f} us/token"),
    ]
    rows += [(f"success: {k.replace('_', ' ')}", str(v)) for k, v in report.success.items()]
    rows += [("note", n) for n in report.notes]
    return rows
