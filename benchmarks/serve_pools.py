"""Batch-1 decode with one torch-running thread per process vs two: why serve_bench's absolute rates are low.

libgomp throttles its spin-wait once a process holds more OpenMP worker threads than cores: a second
thread that has run multi-threaded torch ops (serve_bench's engine loop next to its HF baseline in the
main thread) makes every parallel region of the other pay futex wake-ups. This script measures HF
`generate` and the engine's decode loop (stepped inline, no hand-off) in the main thread, first alone,
then while a started engine thread that has decoded sits idle, then after it stopped. Same model as
serve_bench (its make_bench); greedy, 128 new tokens, 4 prompts; tokens counted from what came back.
`--clean hf|engine` measures one side per process (run both, one after the other, and compare).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import serve_bench  # noqa: E402
from components.model.generation import generate  # noqa: E402
from components.serving.engine import Engine, SamplingParams  # noqa: E402


def generated_tokens(b) -> dict[str, int]:
    """Tokens generate() produces per prompt: the engine's greedy count (its text equals generate()'s, checked
    by serve_bench), stepped inline in this thread. Re-encoding generate()'s text would over-count: a random
    model emits partial UTF-8 byte tokens, which decode to U+FFFD and re-encode to several tokens each."""
    engine = Engine(b.model, b.tokenizer, max_batch=1)
    counts = {}
    for p in b.prompts:
        h = engine.submit(b.ids(p), SamplingParams(max_tokens=b.new_tokens))
        while not h.done:
            engine._step()
        counts[p] = h.completion_tokens
    return counts


def hf_rate(b, n: int) -> float:
    t0, tokens = time.perf_counter(), 0
    for p in b.prompts[:n]:
        generate(b.model, b.tokenizer, [p], max_new_tokens=b.new_tokens)
        tokens += b.counts[p]
    return tokens / (time.perf_counter() - t0)


def stepped_rate(engine: Engine, b, n: int) -> float:
    t0, tokens = time.perf_counter(), 0
    for p in b.prompts[:n]:
        h = engine.submit(b.ids(p), SamplingParams(max_tokens=b.new_tokens))
        while not h.done:
            engine._step()
        tokens += h.completion_tokens
    return tokens / (time.perf_counter() - t0)


def clean(b, mode: str, rounds: int) -> None:
    """One side per process: `hf` (generate in the main thread) or `engine` (the engine's own thread; the
    main thread is held to 1 torch thread so the engine thread owns the only OpenMP pool)."""
    if mode == "hf":
        one = [hf_rate(b, 4) for _ in range(rounds)]
        seq = [hf_rate(b, 16) for _ in range(rounds)]
        print(f"[{mode}] batch 1 (4 requests) {statistics.median(one):.0f} tok/s; "
              f"16 sequential {statistics.median(seq):.0f} tok/s", flush=True)
        return
    engine = Engine(b.model, b.tokenizer, max_batch=16)
    engine.start()
    engine.warmup()
    one, many = [], []
    for _ in range(rounds):
        t0, tokens = time.perf_counter(), 0
        for p in b.prompts[:4]:
            tokens += len(engine.submit(b.ids(p), SamplingParams(max_tokens=b.new_tokens)).result(600).token_ids)
        one.append(tokens / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        handles = [engine.submit(b.ids(p), SamplingParams(max_tokens=b.new_tokens)) for p in b.prompts[:16]]
        many.append(sum(len(h.result(600).token_ids) for h in handles) / (time.perf_counter() - t0))
    engine.stop()
    print(f"[{mode}] batch 1 (4 requests) {statistics.median(one):.0f} tok/s; "
          f"16 concurrent {statistics.median(many):.0f} tok/s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=4)
    ap.add_argument("--clean", choices=["hf", "engine"], help="measure one side alone in this process")
    args = ap.parse_args()
    if args.clean == "engine":
        import torch
        torch.set_num_threads(1)   # per thread: the main thread builds the model without a second pool
    b = serve_bench.make_bench(argparse.Namespace(preset="tiny", vocab=4096, new_tokens=128, concurrency=16, rounds=1,
                                                  int8=False, threads=0, server_threads=0, scenarios="batch1"))
    b.counts = generated_tokens(b)
    if args.clean:
        clean(b, args.clean, args.rounds)
        return
    inline = Engine(b.model, b.tokenizer, max_batch=1)
    stepped_rate(inline, b, 1)

    def measure(label: str) -> None:
        hf = [hf_rate(b, args.requests) for _ in range(args.rounds)]
        eng = [stepped_rate(inline, b, args.requests) for _ in range(args.rounds)]
        h, e = statistics.median(hf), statistics.median(eng)
        print(f"{label:<44} HF {h:7.0f} tok/s   engine {e:7.0f} tok/s   ratio {e / h:4.2f}x", flush=True)

    measure("one torch thread (main) in the process")
    other = Engine(b.model, b.tokenizer, max_batch=16)
    other.start()
    [other.submit(b.ids(p), SamplingParams(max_tokens=16)).result(timeout=600) for p in b.prompts[:4]]
    measure("a second engine thread has decoded, idle")
    other.stop()
    measure("that thread stopped")


if __name__ == "__main__":
    main()
