"""serving.engine=vllm: generation forwarded to an OpenAI-compatible upstream (`vllm serve` on a GPU).

UpstreamEngine has the builtin Engine's interface as the routes use it (submit -> handle whose async
events carry text, one event per token with its log-prob, then a finish; cancel; a bound -> QueueFull),
so keys, limits, the request log, metrics and version swaps stay this server's. Each request is one
streamed POST /v1/completions of the prompt text this server already templated, with `logprobs` asked
for (mean_logprob in the log; None when the upstream sends none). start_upstream() runs one upstream
process per model version from serving.upstream_command; stop() ends it once the store has drained it.
Compromises: with serving.upstream_url (an externally managed upstream) a version swap only relabels;
token ids are not known here (events carry 0), counts come from the logprobs or the upstream's usage;
an upstream runs in its own process group (stopped with its workers), so a server killed with SIGKILL
leaves it running (its log, data/serving/upstream-v<version>-<port>.log, names it).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shlex
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, AsyncIterator

import httpx

from components.config import Settings
from components.orchestration import stop_group
from components.serving.engine import QueueFull, SamplingParams, TokenEvent

log = logging.getLogger("llmcycle.serving")


class UpstreamHandle:
    """One forwarded request; its events are produced by the caller's own task (aevents)."""

    def __init__(self, engine: "UpstreamEngine", text: str, params: SamplingParams):
        self.engine, self.text, self.params = engine, text, params
        self.finish_reason: str | None = None
        self.completion_tokens = 0
        self.cancelled = False
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def cancel(self) -> None:
        """Stop forwarding: closing the upstream stream makes the upstream drop the sequence."""
        if self.done:
            return
        self.cancelled = True
        if self._task is None:          # never iterated: just give the slot back
            self._finish("cancelled")
            return
        try:
            self._loop.call_soon_threadsafe(self._task.cancel)
        except RuntimeError:            # the caller's loop is gone
            self._finish("cancelled")

    def _finish(self, reason: str) -> TokenEvent:
        if self.finish_reason is None:
            self.finish_reason = reason
            self.engine._release()
        return TokenEvent(None, "", None, reason)

    async def aevents(self) -> AsyncIterator[TokenEvent]:
        self._loop, self._task = asyncio.get_running_loop(), asyncio.current_task()
        reason = "cancelled" if self.cancelled else "error"
        try:
            if not self.cancelled:
                async with contextlib.aclosing(self.engine._stream(self)) as events:
                    async for ev in events:
                        if ev.finish_reason is not None:
                            reason = ev.finish_reason
                            break
                        if ev.token_id is not None:
                            self.completion_tokens += 1
                        yield ev
        except (asyncio.CancelledError, GeneratorExit):   # client gone: the closed stream tells the upstream
            self._finish("cancelled")
            raise
        except Exception as exc:  # noqa: BLE001 - the upstream failed: an "error" finish, logged
            log.error("upstream %s failed: %s: %s", self.engine.url, type(exc).__name__, exc)
            reason = "error"
        yield self._finish(reason)


def request_body(model: str, text: str, p: SamplingParams) -> dict:
    """The OpenAI /v1/completions body for one prompt text and the engine's sampling parameters."""
    body: dict[str, Any] = {"model": model, "prompt": text, "max_tokens": p.max_tokens, "temperature": p.temperature,
                            "top_p": p.top_p, "stream": True, "logprobs": 1,
                            "stream_options": {"include_usage": True},
                            # vLLM's extension: the text is tokenized as this server counted it (no BOS added);
                            # servers that do not know the field ignore it.
                            "add_special_tokens": False}
    if p.stop:
        body["stop"] = list(p.stop)
    if p.seed is not None:
        body["seed"] = p.seed
    return body


def chunk_events(choice: dict) -> list[TokenEvent]:
    """A streamed choice -> one event per token (the text on the first, the log-prob on each)."""
    text = choice.get("text") or ""
    lps = (choice.get("logprobs") or {}).get("token_logprobs")
    if lps:
        return [TokenEvent(0, text if j == 0 else "", None if lp is None else float(lp)) for j, lp in enumerate(lps)]
    if text:   # no log-probs from this upstream: one event a chunk, counts fixed up from usage at the end
        return [TokenEvent(0, text, None)]
    return []


class UpstreamEngine:
    """The Engine interface over an OpenAI-compatible upstream; owns the upstream process when it started it."""

    takes_text = True   # the app passes the templated prompt text beside the ids (submit(..., text=...))

    def __init__(self, url: str, settings: Settings, version: str = "", process: subprocess.Popen | None = None,
                 model: str | None = None, log_path: Path | None = None):
        s = settings.serving
        self.url, self.version, self.process, self.log_path = url.rstrip("/"), version, process, log_path
        self.model = model or settings.registry.model_name
        self.capacity = s.max_batch + s.max_queue     # what the builtin engine holds before answering 503
        self.read_timeout = max(60.0, s.upstream_start_timeout_s)
        self._inflight = 0
        self._lock = threading.Lock()
        self._stats = {"submitted": 0, "rejected": 0, "finished": 0}
        self._closed = False

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Nothing to start here: the upstream is already up (see start_upstream / wait_ready)."""

    def warmup(self, max_tokens: int = 4) -> None:
        """One short completion, so the first real request does not pay the upstream's first-call costs."""
        r = httpx.post(f"{self.url}/v1/completions", timeout=self.read_timeout,
                       json={"model": self.model, "prompt": "def", "max_tokens": max_tokens, "temperature": 0})
        if r.status_code != 200:
            raise RuntimeError(f"upstream {self.url} warm-up answered {r.status_code}: {r.text[:300]}")

    def stop(self, drain: bool = False, timeout: float | None = None) -> None:
        """Refuse new work and end the upstream process this engine started (an external one is left alone)."""
        self._closed = True
        proc = self.process
        if proc is None or proc.poll() is not None:
            return
        log.info("stopping upstream pid %s (%s, version %s)", proc.pid, self.url, self.version)
        stop_group(proc, timeout or 30)   # its own session: vLLM's engine workers go with it

    # ---------------------------------------------------------------- requests
    def submit(self, prompt_ids: list[int], params: SamplingParams, text: str | None = None) -> UpstreamHandle:
        if text is None:   # re-decoding ids could differ from what the client sent: the caller passes it
            raise ValueError("UpstreamEngine.submit needs the prompt text (submit(ids, params, text=...))")
        if self._closed:
            raise RuntimeError("engine is stopped")
        with self._lock:
            if self._inflight >= self.capacity:
                self._stats["rejected"] += 1
                raise QueueFull(f"upstream busy ({self._inflight} requests in flight)", retry_after=1)
            self._inflight += 1
            self._stats["submitted"] += 1
        return UpstreamHandle(self, text, params)

    def _release(self) -> None:
        with self._lock:
            self._inflight -= 1
            self._stats["finished"] += 1

    @property
    def stats(self) -> dict:
        return {"queue_depth": 0, "running": self._inflight, "requests_submitted": self._stats["submitted"],
                "requests_finished": self._stats["finished"], "requests_rejected": self._stats["rejected"],
                "version": self.version, "upstream": self.url}

    async def _stream(self, h: UpstreamHandle) -> AsyncIterator[TokenEvent]:
        """POST the request streamed; yield token events, then one finish event (stop | length | error)."""
        timeout = httpx.Timeout(self.read_timeout, connect=10.0)
        body = request_body(self.model, h.text, h.params)
        finish, emitted, usage_tokens = "stop", 0, None
        async with httpx.AsyncClient(timeout=timeout) as client:
            async with client.stream("POST", f"{self.url}/v1/completions", json=body) as r:
                if r.status_code != 200:
                    detail = (await r.aread())[:300].decode("utf-8", "replace")
                    raise RuntimeError(f"upstream answered {r.status_code}: {detail}")
                async for line in r.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    obj = json.loads(data)
                    if "error" in obj:
                        raise RuntimeError(f"upstream error in stream: {obj['error']}")
                    if obj.get("usage"):
                        usage_tokens = obj["usage"].get("completion_tokens")
                    for choice in obj.get("choices") or []:
                        for ev in chunk_events(choice):
                            emitted += 1
                            yield ev
                        if choice.get("finish_reason"):
                            finish = "length" if choice["finish_reason"] == "length" else "stop"
        for _ in range(max(0, (usage_tokens or 0) - emitted)):   # tokens that came without an event of their own
            yield TokenEvent(0, "", None)
        yield TokenEvent(None, "", None, finish)


# ------------------------------------------------------------------------------------------ processes
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def upstream_command(settings: Settings, model_dir: Path, tokenizer_dir: Path, port: int, version: str) -> list[str]:
    """serving.upstream_command with its placeholders filled in, as an argv list."""
    llmcycle = Path(sys.executable).with_name("llmcycle")
    values = {"model_dir": model_dir, "tokenizer_dir": tokenizer_dir, "port": port,
              "name": settings.registry.model_name, "python": sys.executable,
              "llmcycle": llmcycle if llmcycle.exists() else "llmcycle", "version": version}
    return [part.format(**{k: str(v) for k, v in values.items()})
            for part in shlex.split(settings.serving.upstream_command)]


def start_upstream(settings: Settings, model_dir: Path, tokenizer_dir: Path, version: str) -> UpstreamEngine:
    """Start one upstream for a model version and wait until it answers a completion (or fail, process ended)."""
    port = free_port()
    argv = upstream_command(settings, model_dir, tokenizer_dir, port, version)
    log_dir = settings.path("data", "serving")
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"upstream-v{version}-{port}.log"
    log.info("starting upstream for version %s: %s (log %s)", version, shlex.join(argv), log_path)
    with open(log_path, "ab") as out:
        try:
            proc = subprocess.Popen(argv, cwd=settings.root, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError as exc:
            raise RuntimeError(f"serving.upstream_command could not start ({argv[0]}): {exc}") from None
    engine = UpstreamEngine(f"http://127.0.0.1:{port}", settings, version, process=proc, log_path=log_path)
    try:
        wait_ready(engine, settings.serving.upstream_start_timeout_s)
    except BaseException:
        engine.stop()
        raise
    return engine


def wait_ready(engine: UpstreamEngine, timeout_s: float) -> None:
    """Poll until a warm-up completion succeeds (vLLM listens only once loaded; the builtin server answers
    503 while loading). The served model name is taken from GET /v1/models when ours is not listed."""
    deadline = time.monotonic() + timeout_s
    last = "no answer yet"
    while time.monotonic() < deadline:
        proc = engine.process
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"upstream exited with code {proc.returncode} before it was ready; "
                               f"its log {engine.log_path}: {_tail(engine.log_path)}")
        try:
            r = httpx.get(f"{engine.url}/v1/models", timeout=10)
            if r.status_code == 200:
                ids = [m.get("id") for m in r.json().get("data", [])]
                if ids and engine.model not in ids:
                    engine.model = ids[0]
                engine.warmup()
                return
            last = f"GET /v1/models answered {r.status_code}"
        except (httpx.HTTPError, RuntimeError, ValueError) as exc:
            last = f"{type(exc).__name__}: {str(exc)[:200]}"
        time.sleep(0.5)
    raise TimeoutError(f"upstream {engine.url} not ready in {timeout_s:.0f} s "
                       f"(serving.upstream_start_timeout_s; last: {last}; log {engine.log_path})")


def _tail(path: Path | None, n: int = 600) -> str:
    if path is None or not path.exists():
        return ""
    return path.read_bytes()[-n:].decode("utf-8", "replace").strip()


def load_served(settings: Settings, ref: Any) -> Any:
    """A model version served through an upstream (the store's load() for serving.engine=vllm): the
    tokenizer and context length stay here (templating, prompt limits, counts); generation goes upstream."""
    from transformers import AutoTokenizer

    from components.model.build import _resolve_source, _tokenizer_near, data_tokenizer
    from components.serving.model_store import Served

    t0 = time.perf_counter()
    model_dir = _resolve_source(settings, ref.uri)
    tok_dir = _tokenizer_near(model_dir)
    tokenizer = (AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True) if tok_dir
                 else data_tokenizer(settings))
    config = json.loads((model_dir / "config.json").read_text())
    ctx = int(config.get("max_position_embeddings") or 0) or 1 << 30
    url = settings.serving.upstream_url
    if url:   # externally managed: this version is only a label on what that upstream serves
        engine = UpstreamEngine(url, settings, ref.version)
        wait_ready(engine, settings.serving.upstream_start_timeout_s)
    else:
        engine = start_upstream(settings, model_dir, tok_dir or model_dir, ref.version)
    log.info("serving %s (version %s) through upstream %s (model %r), ready in %.1fs", ref.label, ref.version,
             engine.url, engine.model, time.perf_counter() - t0)
    return Served(ref, None, tokenizer, engine, ctx, precision="upstream",
                  precision_reason=f"serving.engine=vllm via {engine.url}")
