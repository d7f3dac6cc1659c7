"""Scoping: how big a model this machine, budget and corpus justify, and what success means.

Measures fp32 matmul FLOP/s and the real training throughput of a candidate model, then sizes the
model with Chinchilla arithmetic (C ~= 6*N*D, D ~= tokens_per_param*N), capped by the tokens the
corpus offers times the allowed epochs. Estimates training memory and serving latency (~2*N FLOPs
per token). The pure arithmetic is separate from the measuring so it can be tested by hand.
"""
from __future__ import annotations

import json
import math
import os
import sysconfig
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from components.config import PRESETS, Settings
from components.errors import ConfigError
from components.data import layout

CHARS_PER_TOKEN = 3.5  # byte-level BPE on Python source at a 4k vocab; only used before the data stage ran


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


def shape_for_params(target: float, vocab_size: int, block_size: int, head_dim: int = 32) -> dict[str, int]:
    """The (n_layer, n_embd) on a small grid whose parameter count is closest to target (log scale)."""
    best: tuple[float, dict[str, int]] | None = None
    for n_embd in (32, 64, 96, 128, 192, 256, 384, 512, 768, 1024):
        for n_layer in range(2, 25):
            n = param_count(n_layer, n_embd, vocab_size)
            # Keep depth and width in proportion (aspect ratio d/L between 16 and 96, as small GPTs do).
            if not 16 <= n_embd / n_layer <= 96:
                continue
            err = abs(math.log(n / target))
            if best is None or err < best[0]:
                best = (err, dict(n_layer=n_layer, n_head=max(1, n_embd // head_dim), n_embd=n_embd,
                                  block_size=block_size, intermediate_size=default_intermediate(n_embd)))
    assert best is not None
    return best[1]


def training_memory_bytes(n_params: float, n_layer: int, n_embd: int, n_head: int, batch: int, block: int) -> float:
    """fp32 AdamW training memory: 16 B/param (weights, grads, two moments) + activations.

    Activations per layer ~ B*T*(34*d + 5*h*T) bytes in 16-bit (Korthikanti et al. 2022), x2 for fp32.
    """
    states = 16.0 * n_params
    activations = 2.0 * n_layer * batch * block * (34 * n_embd + 5 * n_head * block)
    return states + activations


# ----------------------------------------------------------------------------- measuring
def measure_matmul_flops(n: int = 1024, repeats: int = 5) -> float:
    """Best-of-N fp32 matmul FLOP/s on this machine (2*n^3 per product)."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)  # warm-up (thread pool, allocator)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best


def measure_train_throughput(shape: dict[str, int], batch: int, steps: int) -> float:
    """Tokens/s of real AdamW training steps of the model we would build (first step excluded)."""
    import torch

    from components.model.build import build_model

    torch.manual_seed(0)
    model = build_model(shape)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, shape["vocab_size"], (batch, shape["block_size"]))  # (B, T)

    def step() -> None:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * shape["block_size"] * steps / (time.perf_counter() - t0)


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
    matmul_flops: float
    train_tokens_per_sec: float
    achieved_flops: float
    tokens_source: str
    plan: dict
    model: dict
    n_params: int
    pretrain_steps: int
    train_memory_gb: float
    serving_ms_per_token: float
    success: dict
    candidates: list[dict] = field(default_factory=list)
    plan_key: str = ""
    reused: bool = False


def plan_key(settings: Settings) -> str:
    """What the plan depends on besides measurements: its inputs' params. Equal keys reuse the plan."""
    import hashlib

    parts = {k: getattr(settings, k).model_dump(mode="json") for k in ("scoping", "data", "tokenizer", "model")}
    parts["batch_size"] = settings.pretrain.batch_size
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def run(settings: Settings, measure_steps: int | None = None, reuse: bool = False) -> ScopingReport:
    """Measure, size, refuse what cannot work, and write data/scoping/{model,report}.json.

    reuse=True returns the previous plan when its inputs (plan_key) are unchanged: measurements are
    noisy, and a re-run of the lifecycle must build the same model to be reproducible.
    """
    sc = settings.scoping
    key = plan_key(settings)
    previous = layout.scoping_dir(settings) / "report.json"
    if reuse and previous.exists() and (layout.scoping_dir(settings) / "model.json").exists():
        cached = json.loads(previous.read_text())
        if cached.get("plan_key") == key:
            cached["reused"] = True
            return ScopingReport(**cached)
    base = dict(PRESETS["tiny"])
    block = settings.model.block_size or base["block_size"]
    vocab = settings.tokenizer.vocab_size
    batch = settings.pretrain.batch_size

    matmul = measure_matmul_flops()
    probe = dict(base, block_size=block, vocab_size=vocab, intermediate_size=default_intermediate(base["n_embd"]))
    tps = measure_train_throughput(probe, batch, measure_steps or sc.measure_steps)
    # What training really achieves here: 6*N FLOPs per token at the measured token rate.
    achieved = 6.0 * param_count(probe["n_layer"], probe["n_embd"], vocab) * tps
    budget = sc.budget_flops or sc.budget_minutes * 60.0 * achieved

    tokens, tokens_source = available_train_tokens(settings)
    plan = chinchilla_plan(budget, tokens, sc.tokens_per_param, sc.max_epochs)
    if plan.n_params < sc.min_params:
        need_flops = 6.0 * sc.min_params * sc.tokens_per_param * sc.min_params
        need_tokens = sc.tokens_per_param * sc.min_params / sc.max_epochs
        why = (f"needs a budget of {need_flops:.3g} FLOPs (~{need_flops / achieved / 60:.1f} min here)"
               if not plan.data_limited else f"needs >= {need_tokens:,.0f} training tokens (have {tokens:,.0f})")
        raise ConfigError(
            f"scoping: the plan gives {plan.n_params:,.0f} parameters, below scoping.min_params="
            f"{sc.min_params:,}; a model that small {why} (scoping.budget_minutes / budget_flops, data.source)")

    shape = shape_for_params(plan.n_params, vocab, block)
    shape["vocab_size"] = vocab
    n_params = param_count(shape["n_layer"], shape["n_embd"], vocab, shape["intermediate_size"])
    steps = max(1, int(plan.n_tokens // (batch * block)))
    memory = training_memory_bytes(n_params, shape["n_layer"], shape["n_embd"], shape["n_head"], batch, block)
    report = ScopingReport(
        matmul_flops=matmul, train_tokens_per_sec=tps, achieved_flops=achieved, tokens_source=tokens_source,
        plan=asdict(plan), model=shape, n_params=n_params, pretrain_steps=steps,
        train_memory_gb=memory / 1e9, serving_ms_per_token=2.0 * n_params / matmul * 1e3,
        success=sc.success.model_dump(), candidates=sizing_curve(budget, tokens, vocab, block, sc.tokens_per_param),
        plan_key=key)
    out = layout.scoping_dir(settings)
    out.mkdir(parents=True, exist_ok=True)
    if sc.apply:
        _atomic_json(out / "model.json", {k: v for k, v in shape.items() if k != "vocab_size"})
    _atomic_json(out / "report.json", asdict(report))
    return report


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
    return [
        ("matmul peak (fp32)", f"{report.matmul_flops / 1e9:.1f} GFLOP/s"),
        ("training throughput (probe)", f"{report.train_tokens_per_sec:,.0f} tokens/s"),
        ("compute budget", f"{p['budget_flops']:.3g} FLOPs"),
        ("training tokens available", f"{p['available_tokens']:,.0f} ({report.tokens_source})"),
        ("chosen model", f"{m['n_layer']} layers x {m['n_embd']} dims, {m['n_head']} heads, ctx {m['block_size']}"),
        ("parameters", f"{report.n_params:,} (plan {p['n_params']:,.0f})"),
        ("tokens to train", f"{p['n_tokens']:,.0f} ({p['epochs']:.2f} epochs{', data-limited' if p['data_limited'] else ''})"),
        ("pretrain steps at this batch", f"{report.pretrain_steps:,}"),
        ("training memory (fp32 AdamW)", f"{report.train_memory_gb:.2f} GB"),
        ("serving latency estimate (compute-bound)", f"{report.serving_ms_per_token * 1e3:.1f} us/token"),
        ("success: max val perplexity", f"{report.success['max_val_perplexity']}"),
        ("success: min syntax-valid rate", f"{report.success['min_syntax_valid_rate']}"),
    ]
