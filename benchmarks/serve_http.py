"""HTTP scenarios for serve_bench: the real server (`llmcycle serve`, uvicorn, its own process) on loopback.

The bench's model and tokenizer are saved to a temp folder and served with `llmcycle serve --model <folder>
--no-auth` from a temp project (rate limits raised so the bench is not throttled, champion polling off).
c clients (c = 1, 4, 16) share the fixed prompt list over streaming /v1/completions (greedy, stream_options
include_usage): tokens/s from the usage counts, latency per request, time to first token = the first chunk
with text. Compromise: clients and server share the same 2 cores (as a local user's would).
"""
from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`llmcycle serve` in a child process; base URL once /readyz answers 200."""

    def __init__(self, model, tokenizer, quantize: str = "none", max_batch: int = 16, threads: int = 0,
                 omp_threads: int = 0, timeout: float = 180.0):
        import httpx

        self.dir = tempfile.TemporaryDirectory(prefix="serve-bench-")
        root = Path(self.dir.name)
        model.save_pretrained(root / "model")
        tokenizer.save_pretrained(root / "model")
        params = {"serving": {"quantize": quantize, "poll_interval_s": 0, "max_batch": max_batch,
                              "torch_threads": threads,
                              "max_queue": 4 * max_batch,
                              "rate_limit": {"requests_per_minute": 1_000_000, "tokens_per_minute": 100_000_000}}}
        (root / "params.yaml").write_text(yaml.safe_dump(params))
        port = free_port()
        self.base = f"http://127.0.0.1:{port}"
        import torch
        # The bench's --threads, for the server too (serve_bench's own main thread is held at 1 torch thread).
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlflow.db",
               "OMP_NUM_THREADS": str(omp_threads or torch.get_num_threads())}
        self.log = open(root / "server.log", "w")
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).with_name("llmcycle")), "serve", "--config", str(root / "params.yaml"),
             "--model", str(root / "model"), "--no-auth", "--port", str(port)],
            cwd=root, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}); log: {root / 'server.log'}\n"
                                   + (root / "server.log").read_text()[-2000:])
            try:
                if httpx.get(f"{self.base}/readyz", timeout=2).status_code == 200:
                    self._settle()
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.close()
        raise TimeoutError(f"server not ready in {timeout}s")

    def _cpu_s(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")     # utime + stime

    def _settle(self, quiet_s: float = 0.5, limit_s: float = 60.0) -> None:
        """Wait until the server is idle (after ready it records its deploy in MLflow in the background)."""
        end = time.monotonic() + limit_s
        while time.monotonic() < end:
            before = self._cpu_s()
            time.sleep(quiet_s)
            if self._cpu_s() - before < 0.05 * quiet_s:
                return

    def rss_mb(self) -> float:
        """Resident memory of the server process (Linux /proc), MiB."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()
        self.dir.cleanup()


async def _one(client, base: str, prompt: str, new_tokens: int) -> tuple[float, float, int]:
    """One streamed greedy completion -> (latency s, time to first token s, completion tokens)."""
    body = {"model": "llmcycle", "prompt": prompt, "max_tokens": new_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first, tokens = None, 0
    async with client.stream("POST", f"{base}/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and any(c.get("text") for c in chunk.get("choices", [])):
                first = time.perf_counter()
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    end = time.perf_counter()
    return end - t0, (first or end) - t0, tokens


async def _drive(base: str, prompts: list[str], clients: int, new_tokens: int):
    """clients workers take prompts from one shared list until it is empty."""
    import httpx

    todo = list(prompts)
    out: list[tuple[float, float, int]] = []

    async def worker(client) -> None:
        while todo:
            out.append(await _one(client, base, todo.pop(0), new_tokens))

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(clients)))
        wall = time.perf_counter() - t0
    return out, wall


def scenarios(row_cls, baseline) -> dict:
    """Scenarios `(Bench) -> (baseline Row, HTTP Row)` for 1, 4 and 16 clients; serve_bench passes its Row
    class and its HF baseline (`(Bench, requests) -> Row`: the rows its child process measured). The server
    starts at the first use, once per run, and serves the bench's fp32 model (quantized by the server itself
    when the bench runs --int8)."""
    def http_row(server: Server, prompts: list[str], clients: int, new_tokens: int):
        out, wall = asyncio.run(_drive(server.base, prompts, clients, new_tokens))
        return row_cls(f"HTTP server, {clients} client{'s' if clients > 1 else ''}", sum(t for _, _, t in out),
                       wall, [lat for lat, _, _ in out], [ttft for _, ttft, _ in out])

    def http_scenario(clients: int):
        def scenario(b):
            if b.server is None:
                b.server = Server(b.fp32_model, b.tokenizer, quantize="int8" if b.int8 else "none",
                                  max_batch=b.concurrency, threads=b.server_threads, omp_threads=b.threads)
                b.closers.append(b.server.close)
                http_row(b.server, b.prompts[:2], 2, 8)   # warm the HTTP path (connections, first requests)
            return baseline(b, len(b.prompts)), http_row(b.server, b.prompts, clients, b.new_tokens)
        return scenario

    return {f"http{c}": http_scenario(c) for c in (1, 4, 16)}
