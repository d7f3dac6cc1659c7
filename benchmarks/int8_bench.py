"""Where dynamic int8 pays in the serving engine: fp32 vs torch.ao dynamic int8, by model size and batch.

For each preset (random init, vocab 4096): the engine on the fp32 model and on its int8 copy
(components.evaluation.quantize.quantize_int8), decode time per generated token at batch 1 (one request) and
at batch 16 (16 concurrent requests), interleaved rounds, medians; memory as the serialized weights
(state_dict bytes: packed int8 weights + scales vs fp32) and the RSS of a fresh process serving each (model
built, fp32 copy dropped, engine warmed, one batch-16 generation run).
Compromise: context capped at --block (256) for every preset so the KV cache stays small on this machine;
decode speed at these prompt lengths hardly depends on it.
"""
from __future__ import annotations

import argparse
import gc
import io
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from components.config import PRESETS
from components.evaluation.quantize import quantize_int8
from components.model.build import build_model
from components.serving.engine import Engine, SamplingParams


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def state_mb(model: torch.nn.Module) -> float:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell() / 2**20


def decode_ms_per_token(engine: Engine, prompts: list[list[int]], new_tokens: int) -> float:
    """Wall time of len(prompts) concurrent requests / new tokens: ms per decode step of that batch."""
    t0 = time.perf_counter()
    handles = [engine.submit(p, SamplingParams(max_tokens=new_tokens)) for p in prompts]
    n = [len(h.result(timeout=900).token_ids) for h in handles]
    # A random-init row may end at once (an end token); the batch then runs one row short: ms per step of
    # the longest row is still the figure (fp32 and int8 may differ in which rows end: noted, rare).
    return (time.perf_counter() - t0) * 1000 / max(n)


def build(name: str, args: argparse.Namespace, tok) -> torch.nn.Module:
    """A preset by name; `preset@W` is that preset at hidden size W (heads kept: W must divide by them)."""
    preset, _, width = name.partition("@")
    shape = dict(PRESETS[preset], vocab_size=args.vocab, block_size=args.block)
    if width:
        shape["n_embd"] = int(width)
    shape["intermediate_size"] = max(32, int(round(shape["n_embd"] * 8 / 3 / 32)) * 32)
    torch.manual_seed(0)
    return build_model(shape, tok).eval()


def child_rss(name: str, kind: str, args: argparse.Namespace, tok_dir: str) -> float:
    """VmRSS (MiB) of a fresh process serving preset `name` as `kind` (fp32 | int8) after one batch-16 run."""
    code = ("import sys, warnings; warnings.filterwarnings('ignore'); sys.argv = sys.argv[:1] + sys.argv[2:]\n"
            "import int8_bench as ib; ib.child_main()")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent), "OMP_NUM_THREADS": str(torch.get_num_threads())}
    out = subprocess.run([sys.executable, "-c", code, "--", "--child", name, kind, tok_dir, "--vocab", str(args.vocab),
                          "--block", str(args.block)], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parent, env=env)
    return float(out.stdout.strip().splitlines()[-1])


def child_main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", nargs=3)
    ap.add_argument("--vocab", type=int)
    ap.add_argument("--block", type=int)
    args = ap.parse_args()
    name, kind, tok_dir = args.child
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
    model = build(name, args, tok)
    if kind == "int8":
        model = quantize_int8(model)   # the fp32 model is dropped: only the int8 copy stays referenced
    gc.collect()
    engine = Engine(model, tok, max_batch=16)
    engine.warmup()
    engine.start()
    decode_ms_per_token(engine, [[9 + i] * 32 for i in range(16)], 8)
    engine.stop()
    print(f"{rss_mb():.1f}")


def run_preset(name: str, args: argparse.Namespace, tok) -> dict:
    fp32 = build(name, args, tok)
    int8 = quantize_int8(fp32)
    n_params = sum(p.numel() for p in fp32.parameters())
    prompts = [[(7 * i + j) % (args.vocab - 8) + 8 for j in range(32)] for i in range(16)]  # 32-token prompts
    engines = {k: Engine(m, tok, max_batch=16) for k, m in (("fp32", fp32), ("int8", int8))}
    for e in engines.values():
        e.start()
        e.warmup()
    times: dict[tuple[str, int], list[float]] = {}
    try:
        for _ in range(args.rounds):
            for batch in (1, 16):
                for kind, e in engines.items():
                    times.setdefault((kind, batch), []).append(decode_ms_per_token(e, prompts[:batch], args.new_tokens))
    finally:
        for e in engines.values():
            e.stop()
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {"preset": name, "params_M": n_params / 1e6, "fp32_state_MB": state_mb(fp32), "int8_state_MB": state_mb(int8)}
    with tempfile.TemporaryDirectory() as tok_dir:
        tok.save_pretrained(tok_dir)
        out["fp32_rss_MB"], out["int8_rss_MB"] = (child_rss(name, k, args, tok_dir) for k in ("fp32", "int8"))
    for b in (1, 16):
        out[f"b{b}_fp32_ms"], out[f"b{b}_int8_ms"] = med[("fp32", b)], med[("int8", b)]
        out[f"b{b}_speedup"] = med[("fp32", b)] / med[("int8", b)]
    del engines, fp32, int8
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="tiny,small,gpt2-124m")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--block", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default, 2 here); 1 keeps a "
                    "busy machine from stalling the 2-thread fp32 kernels, which flatters int8 (see README)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import warnings
    warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*")
    from serve_bench import stdlib_texts
    from components.data.tokenizer import train_bpe, wrap
    tok = wrap(train_bpe(iter(stdlib_texts()), args.vocab, min_frequency=2))
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, quantized engine "
          f"{torch.backends.quantized.engine}; {args.new_tokens} new tokens, 32-token prompts, greedy, "
          f"{args.rounds} rounds (medians)")
    print("| preset | params | weights fp32 -> int8 (state_dict) | RSS of a serving process fp32 / int8 | batch 1 ms/token "
          "fp32 / int8 (speedup) | batch 16 ms/step fp32 / int8 (speedup) | load avg |")
    print("|---|---|---|---|---|---|---|")
    for name in args.presets.split(","):
        load0 = os.getloadavg()[0]
        r = run_preset(name, args, tok)
        print(f"| {name} | {r['params_M']:.1f}M | {r['fp32_state_MB']:.1f} -> {r['int8_state_MB']:.1f} MB "
              f"({r['fp32_state_MB'] / r['int8_state_MB']:.1f}x smaller) | {r['fp32_rss_MB']:.0f} / {r['int8_rss_MB']:.0f} MB | "
              f"{r['b1_fp32_ms']:.2f} / {r['b1_int8_ms']:.2f} ({r['b1_speedup']:.2f}x) | "
              f"{r['b16_fp32_ms']:.2f} / {r['b16_int8_ms']:.2f} ({r['b16_speedup']:.2f}x) | "
              f"{load0:.1f} -> {os.getloadavg()[0]:.1f} |", flush=True)


if __name__ == "__main__":
    main()
