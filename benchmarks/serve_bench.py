"""Serving throughput and latency: the continuous-batching engine vs HF generate, side by side in one process.

Engine scenarios (this file, part 2 of issue 8): (a) batch-1 decode, engine vs components.model.generation
.generate; (b) N concurrent submissions to the engine vs the sequential baseline (generate at batch 1, one
request at a time): tokens/s ratio, p50/p95 latency against a single request, time to first token.
Each scenario is a function `(Bench) -> (baseline Row, Row)`, listed in SCENARIOS; the HTTP scenarios (the
real server in its own process, driven by 1, 4 and 16 streaming clients) come from serve_http.py. Compromise: random-init model (speed does not depend on the
weights); on 2 shared cores rounds are interleaved and medians reported, ratios only mean something within a run.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from components.config import PRESETS
from components.model.build import build_model
from components.model.generation import generate
from components.serving.engine import Engine, SamplingParams

try:
    import serve_http                      # run as a script: benchmarks/ is on sys.path
except ImportError:
    from benchmarks import serve_http

GOAL_BATCH1 = 2.0        # engine batch-1 decode vs HF generate
GOAL_THROUGHPUT = 6.0    # engine at 16 concurrent vs the sequential baseline
GOAL_P95 = 3.0           # p95 latency at 16 concurrent vs a single request


@dataclass
class Row:
    name: str
    tokens: int
    wall_s: float
    latencies: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    cpu_s: float | None = None     # this process's CPU time (in-process scenarios): at --threads 1 it is the
                                   # work done, whatever other processes take (wall time is not, on 2 cores)

    @property
    def tps(self) -> float:
        return self.tokens / self.wall_s

    def pct(self, xs: list[float], q: float) -> float:
        xs = sorted(xs)
        return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")


@dataclass
class Bench:
    """What every scenario shares: the model, tokenizer, prompts (as text and ids) and the run's knobs."""
    model: object
    tokenizer: object
    prompts: list[str]
    new_tokens: int
    concurrency: int
    batch1_requests: int = 4
    engine: Engine | None = None
    fp32_model: object = None       # the unquantized model (what the HTTP server loads and quantizes itself)
    int8: bool = False
    server: object = None           # serve_http.Server, started by the first HTTP scenario
    server_threads: int = 0         # the server's serving.torch_threads (0: torch's default)
    stepped: Engine | None = None   # an unstarted engine for the "stepped" scenario
    closers: list = field(default_factory=list)

    def ids(self, prompt: str) -> list[int]:
        return self.tokenizer.encode(prompt, add_special_tokens=False)


# ----------------------------------------------------------------------------- setup
def stdlib_texts(n_files: int = 60) -> list[str]:
    """Real text for the tokenizer and the prompts: the first stdlib modules, sorted (deterministic)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py"))[:n_files]
    return [p.read_text(encoding="utf-8", errors="replace") for p in files]


def make_bench(args: argparse.Namespace) -> Bench:
    from components.data.tokenizer import train_bpe, wrap

    texts = stdlib_texts()
    tok = wrap(train_bpe(iter(texts), args.vocab, min_frequency=2))
    shape = dict(PRESETS[args.preset], vocab_size=args.vocab)
    shape["intermediate_size"] = max(32, int(round(shape["n_embd"] * 8 / 3 / 32)) * 32)
    torch.manual_seed(0)
    fp32 = model = build_model(shape, tok).eval()
    if args.int8:
        from components.evaluation.quantize import quantize_int8
        model = quantize_int8(fp32)
    # Prompts: 16 different function openings (different lengths), 24-64 tokens each.
    prompts = []
    for text in texts:
        for line in text.splitlines():
            if line.startswith("def ") and 24 <= len(tok.encode(line, add_special_tokens=False)) + 8 <= 72:
                prompts.append(line + "\n    ")
                break
        if len(prompts) == args.concurrency:
            break
    return Bench(model, tok, prompts, args.new_tokens, args.concurrency, fp32_model=fp32, int8=args.int8)


# ----------------------------------------------------------------------------- scenarios
def hf_sequential(b: Bench, n: int) -> Row:
    """The baseline: components.model.generation.generate at batch 1, one request at a time."""
    lat, t0, c0 = [], time.perf_counter(), time.process_time()
    for p in b.prompts[:n]:
        s = time.perf_counter()
        generate(b.model, b.tokenizer, [p], max_new_tokens=b.new_tokens)
        lat.append(time.perf_counter() - s)
    return Row(f"HF generate, batch 1, {n} sequential", n * b.new_tokens, time.perf_counter() - t0, lat,
               cpu_s=time.process_time() - c0)


def engine_concurrent(b: Bench, n: int) -> Row:
    """n requests submitted at once to the running engine; tokens counted from what came back."""
    t0, c0 = time.perf_counter(), time.process_time()
    handles = [b.engine.submit(b.ids(p), SamplingParams(max_tokens=b.new_tokens)) for p in b.prompts[:n]]
    results = [h.result(timeout=600) for h in handles]
    wall = time.perf_counter() - t0
    return Row(f"engine, {n} concurrent", sum(len(r.token_ids) for r in results), wall,
               [h.finished_at - h.submitted_at for h in handles], [h.first_token_at - h.submitted_at for h in handles],
               cpu_s=time.process_time() - c0)


def engine_sequential(b: Bench, n: int) -> Row:
    """The engine at batch 1: n requests, each submitted after the previous one finished."""
    lat, ttft, tokens, t0, c0 = [], [], 0, time.perf_counter(), time.process_time()
    for p in b.prompts[:n]:
        h = b.engine.submit(b.ids(p), SamplingParams(max_tokens=b.new_tokens))
        tokens += len(h.result(timeout=600).token_ids)
        lat.append(h.finished_at - h.submitted_at)
        ttft.append(h.first_token_at - h.submitted_at)
    return Row(f"engine, batch 1, {n} sequential", tokens, time.perf_counter() - t0, lat, ttft,
               cpu_s=time.process_time() - c0)


def engine_stepped(b: Bench, n: int) -> Row:
    """The engine's own decode speed at batch 1 without its thread: _step() called here until done (no
    cross-thread hand-off per token); a second, unstarted engine over the same model."""
    if b.stepped is None:
        b.stepped = Engine(b.model, b.tokenizer, max_batch=1)
        b.stepped.warmup()
    lat, tokens, t0, c0 = [], 0, time.perf_counter(), time.process_time()
    for p in b.prompts[:n]:
        h = b.stepped.submit(b.ids(p), SamplingParams(max_tokens=b.new_tokens))
        while not h.done:
            b.stepped._step()
        tokens += len(h.result().token_ids)
        lat.append(h.finished_at - h.submitted_at)
    return Row(f"engine stepped, batch 1, {n} sequential", tokens, time.perf_counter() - t0, lat,
               cpu_s=time.process_time() - c0)


def scenario_stepped(b: Bench) -> tuple[Row, Row]:
    """(a') batch 1, HF generate vs the engine's step loop run inline (its decode speed minus thread hand-off)."""
    return hf_sequential(b, b.batch1_requests), engine_stepped(b, b.batch1_requests)


def scenario_batch1(b: Bench) -> tuple[Row, Row]:
    """(a) requests one at a time (batch 1): HF generate vs the engine, on the same prompts."""
    return hf_sequential(b, b.batch1_requests), engine_sequential(b, b.batch1_requests)


def scenario_concurrent(b: Bench) -> tuple[Row, Row]:
    """(b) N requests: the sequential HF baseline vs N concurrent submissions to the engine."""
    return hf_sequential(b, b.concurrency), engine_concurrent(b, b.concurrency)


SCENARIOS = {"batch1": scenario_batch1, "stepped": scenario_stepped, "concurrent": scenario_concurrent}
SCENARIOS.update(serve_http.scenarios(Row, hf_sequential))
# Whose single-request latency a scenario's p95 is compared with (the "p95 <= 3x a single request").
SINGLE = {"concurrent": "batch1", "http4": "http1", "http16": "http1"}


# ----------------------------------------------------------------------------- main
def check_same_tokens(b: Bench) -> None:
    """The comparison is fair only if both sides generate the same tokens: greedy must agree."""
    ref = generate(b.model, b.tokenizer, b.prompts, max_new_tokens=b.new_tokens)
    got = [b.engine.submit(b.ids(p), SamplingParams(max_tokens=b.new_tokens)).result(timeout=600)
           for p in b.prompts]
    same = sum(r.text == g for r, g in zip(got, ref))
    full = sum(len(r.token_ids) == b.new_tokens for r in got)
    print(f"greedy outputs identical to generate(): {same}/{len(ref)}; full {b.new_tokens} tokens: {full}/{len(ref)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3, help="rounds (HF then engine in each); medians reported")
    ap.add_argument("--int8", action="store_true", help="torch.ao dynamic int8 linear layers (CPU)")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    ap.add_argument("--threads", type=int, default=0, help="torch threads for both sides and the HTTP server "
                    "(0: torch's default, 2 here); 1 is steadier when other processes take a core")
    ap.add_argument("--server-threads", type=int, default=0, help="serving.torch_threads of the HTTP server "
                    "(0: torch's default); 1 leaves a core to its event loop and the clients")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    b = make_bench(args)
    b.server_threads = args.server_threads
    b.engine = Engine(b.model, b.tokenizer, max_batch=args.concurrency, max_queue=4 * args.concurrency)
    b.engine.start()
    b.engine.warmup()
    generate(b.model, b.tokenizer, b.prompts[:1], max_new_tokens=8)  # warm HF too
    n_params = sum(p.numel() for p in b.model.parameters())
    print(f"model: preset {args.preset}, vocab {args.vocab}, {n_params / 1e6:.2f}M params{' int8' if args.int8 else ''};"
          f" {args.new_tokens} new tokens, greedy; torch threads {torch.get_num_threads()}")
    check_same_tokens(b)
    try:
        for name in args.scenarios.split(","):
            load0, t0 = os.getloadavg()[0], time.time()
            rounds = [SCENARIOS[name](b) for _ in range(args.rounds)]
            report(name, rounds, args)
            print(f"  load average (1 min) {load0:.2f} -> {os.getloadavg()[0]:.2f} over {time.time() - t0:.0f} s "
                  f"(2 cores: above ~1 another process competed)")
    finally:
        b.engine.stop()
        for close in b.closers:
            close()


P50_SINGLE: dict[str, float] = {}    # scenario -> median single-request latency (its rows' p50)


def report(name: str, rounds: list[tuple[Row, Row]], args: argparse.Namespace) -> None:
    med = statistics.median
    base_tps, eng_tps = med(r[0].tps for r in rounds), med(r[1].tps for r in rounds)
    base, eng = rounds[-1]
    p50 = med(r[1].pct(r[1].latencies, 0.5) for r in rounds)
    P50_SINGLE[name] = p50
    print(f"\n[{name}] medians of {len(rounds)} interleaved rounds")
    print(f"  {base.name:<42} {base_tps:9.1f} tok/s")
    print(f"  {eng.name:<42} {eng_tps:9.1f} tok/s   ratio {eng_tps / base_tps:5.2f}x", end="")
    print(f"   (goal >= {GOAL_BATCH1}x)" if name in ("batch1", "stepped") else
          f"   (goal >= {GOAL_THROUGHPUT}x at 16)" if name in ("concurrent", "http16") else "")
    if eng.cpu_s is not None:
        ratio = med((r[0].cpu_s / r[0].tokens) / (r[1].cpu_s / r[1].tokens) for r in rounds)
        print(f"  CPU time per token, HF / engine: {ratio:.2f}x (this process; the load-proof figure at --threads 1)")
    if name in ("batch1", "stepped"):
        return
    p95 = med(r[1].pct(r[1].latencies, 0.95) for r in rounds)
    ttft50 = med(r[1].pct(r[1].ttfts, 0.5) for r in rounds)
    ttft95 = med(r[1].pct(r[1].ttfts, 0.95) for r in rounds)
    hf_single = med(r[0].pct(r[0].latencies, 0.5) for r in rounds)
    print(f"  latency p50 {p50:.2f} s, p95 {p95:.2f} s; TTFT p50 {ttft50 * 1000:.0f} ms, p95 {ttft95 * 1000:.0f} ms; "
          f"HF single request {hf_single:.2f} s")
    ref = SINGLE.get(name)
    if ref in P50_SINGLE:
        print(f"  p95 / single request ({ref}: {P50_SINGLE[ref]:.2f} s): {p95 / P50_SINGLE[ref]:.2f}x"
              f"   (goal <= {GOAL_P95}x at 16)")
    print(f"  p95 / HF single request: {p95 / hf_single:.2f}x")


if __name__ == "__main__":
    main()
