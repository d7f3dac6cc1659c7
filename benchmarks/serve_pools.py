"""Batch-1 decode with one torch-running thread per process vs two: why serve_bench's absolute rates are low.

libgomp throttles its spin-wait once a process holds more OpenMP worker threads than cores: a second
thread that has run multi-threaded torch ops (serve_bench's engine loop next to its HF baseline in the
main thread) makes every parallel region of the other pay futex wake-ups. This script measures HF
`generate` and the engine's decode loop (stepped inline, no hand-off) in the main thread, first alone,
then while a started engine thread that has decoded sits idle, then after it stopped. Same model as
serve_bench (its make_bench); greedy, 128 new tokens, 4 prompts; tokens counted from what came back.
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


def hf_rate(b, n: int) -> float:
    t0, tokens = time.perf_counter(), 0
    for p in b.prompts[:n]:
        text = generate(b.model, b.tokenizer, [p], max_new_tokens=b.new_tokens)[0]
        tokens += len(b.tokenizer.encode(text, add_special_tokens=False))
    return tokens / (time.perf_counter() - t0)


def stepped_rate(engine: Engine, b, n: int) -> float:
    t0, tokens = time.perf_counter(), 0
    for p in b.prompts[:n]:
        h = engine.submit(b.ids(p), SamplingParams(max_tokens=b.new_tokens))
        while not h.done:
            engine._step()
        tokens += h.completion_tokens
    return tokens / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=4)
    args = ap.parse_args()
    b = serve_bench.make_bench(argparse.Namespace(preset="tiny", vocab=4096, new_tokens=128, concurrency=16, rounds=1,
                                                  int8=False, threads=0, server_threads=0, scenarios="batch1"))
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
