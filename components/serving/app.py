"""The FastAPI app: OpenAI-compatible /v1 routes over the batching engine, plus health, metrics, admin.

Bodies are read and validated by hand (size cap, JSON, pydantic) so every malformed request is a
4xx OpenAI error naming the field. Generation runs in the engine's thread; handlers only await its
events. Every response names the model version (`model`, `system_fingerprint`, X-Model-Version).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from components.config import Settings
from components.serving import schemas as S
from components.serving.auth import KeyRing
from components.serving.limits import RateLimiter
from components.serving.metrics import CountRequests, Metrics
from components.serving.model_store import ModelStore, Served, UnknownModel
from components.serving.request_log import RequestLog
from components.serving.streams import merge, merge_batches, openai_finish

log = logging.getLogger("llmcycle.serving")


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.body, self.headers = status, S.error_body(message, type_, param, code), headers or {}


def create_app(settings: Settings, keys: KeyRing, model: str | None = None, store: ModelStore | None = None,
               request_log: RequestLog | None = None, load_on_start: bool = True) -> FastAPI:
    cfg = settings.serving
    metrics = Metrics()
    store = store or ModelStore(settings, model, metrics=metrics)
    store.metrics = metrics
    limiter = RateLimiter(cfg.rate_limit)
    reqlog = request_log or RequestLog(settings.path(cfg.log_dir), max_bytes=cfg.log_max_bytes)
    feedback_log = RequestLog(settings.path("data", "feedback"), prefix="feedback")

    def scrape() -> None:
        if store.current is not None:
            metrics.set_engine(store.current.engine.stats)
        metrics.log_dropped.set(reqlog.dropped)
    metrics.on_scrape(scrape)

    async def lifespan(app: FastAPI):
        if load_on_start:
            def boot() -> None:
                store.load_primary()
                store.start_polling()
            asyncio.get_running_loop().run_in_executor(None, boot)
        yield
        store.close()
        reqlog.close()
        feedback_log.close()

    app = FastAPI(title="llmcycle", lifespan=lifespan)
    app.state.store, app.state.metrics, app.state.request_log, app.state.keys = store, metrics, reqlog, keys

    # ------------------------------------------------------------------ errors and accounting
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return JSONResponse(exc.body, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return JSONResponse(S.error_body(str(exc.detail), "invalid_request_error", None, str(exc.status_code)),
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse(S.error_body("internal server error", "server_error", None, "internal_error"),
                            status_code=500)

    app.add_middleware(CountRequests, metrics=metrics, known_routes=KNOWN_ROUTES)

    def authorize(request: Request) -> str:
        kid = keys.check(request.headers.get("authorization"))
        if kid is None:
            raise ApiError(401, "invalid or missing API key (Authorization: Bearer <key>)", None,
                           "invalid_api_key", "authentication_error")
        return kid

    async def read_body(request: Request, model_cls):
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > cfg.max_body_bytes:
            raise ApiError(413, f"request body is {length} bytes; the limit is {cfg.max_body_bytes}", None,
                           "body_too_large")
        raw = bytearray()
        async for part in request.stream():
            raw += part
            if len(raw) > cfg.max_body_bytes:
                raise ApiError(413, f"request body exceeds {cfg.max_body_bytes} bytes", None, "body_too_large")
        try:
            obj = json.loads(bytes(raw) or b"null")
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"body is not valid JSON: {exc}", None, "invalid_json") from None
        except RecursionError:
            raise ApiError(400, "body is nested too deeply", None, "invalid_json") from None
        if not isinstance(obj, dict):
            raise ApiError(400, "body must be a JSON object", None, "invalid_json")
        try:
            return model_cls.model_validate(obj)
        except ValidationError as exc:
            body = S.validation_error_body(exc)
            raise ApiError(400, body["error"]["message"], body["error"]["param"], body["error"]["code"]) from None

    # ------------------------------------------------------------------ completions
    async def complete(request: Request, chat: bool):
        t0 = time.perf_counter()
        kid = authorize(request)
        req = await read_body(request, S.ChatRequest if chat else S.CompletionRequest)
        if req.n > cfg.max_n:
            raise ApiError(400, f"n: at most {cfg.max_n}", "n", "invalid_value")
        count = (1 if chat else len(req.prompts)) * req.n
        if count > cfg.max_queue:   # could never be queued: a 400, not a 503 retried forever
            which = "n" if chat or len(req.prompts) == 1 else "prompt"
            raise ApiError(400, f"{which}: {count} completions in one request (prompts x n); the server queues at "
                           f"most {cfg.max_queue} (serving.max_queue)", which, "invalid_value")
        if req.token_cap is not None and req.token_cap > cfg.max_new_tokens:
            which = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
            raise ApiError(400, f"{which}: at most {cfg.max_new_tokens} (serving.max_new_tokens)", which,
                           "invalid_value")
        if store.current is None:
            raise ApiError(503, "no model loaded yet" + (f" ({store.last_error})" if store.last_error else ""),
                           None, "model_not_ready", "server_error", {"Retry-After": "5"})
        try:
            served = await run_in_threadpool(store.get, req.model)
        except UnknownModel as exc:
            raise ApiError(404, str(exc), "model", "model_not_found") from None
        except Exception as exc:  # noqa: BLE001 - a version that exists but cannot load
            raise ApiError(503, f"model {req.model!r} could not be loaded: {exc}", "model", "model_unavailable",
                           "server_error", {"Retry-After": "30"}) from None
        response = None
        try:
            response = await _generate(request, req, served, kid, chat, t0)
            return response
        finally:   # exactly once: here, or by the stream when it ends (in-flight counts decide when a
            if not isinstance(response, StreamingResponse):   # swapped-out version may stop)
                served.release()

    async def _generate(request: Request, req, served: Served, kid: str, chat: bool, t0: float):
        from components.serving.engine import QueueFull, SamplingParams

        tok = served.tokenizer

        def tokenize() -> tuple[list[str], list[list[int]]]:   # a big prompt must not stall the event loop
            if chat:
                texts = [tok.apply_chat_template([{"role": m.role, "content": m.text} for m in req.messages],
                                                 add_generation_prompt=True, tokenize=False)]
            else:
                texts = req.prompts
            return texts, [tok.encode(t, add_special_tokens=False) for t in texts]
        texts, ids = await run_in_threadpool(tokenize)
        field = "messages" if chat else "prompt"
        limit = min(cfg.max_prompt_tokens, served.context_len - 1)
        for row in ids:
            if len(row) > limit:
                raise ApiError(400, f"{field}: {len(row)} tokens; the limit is {limit} (model context "
                               f"{served.context_len}, serving.max_prompt_tokens {cfg.max_prompt_tokens})",
                               field, "context_length_exceeded")
        longest = max(len(r) for r in ids)
        max_tokens = req.token_cap or min(cfg.max_new_tokens, served.context_len - longest)
        if longest + max_tokens > served.context_len:
            raise ApiError(400, f"max_tokens: prompt ({longest}) + max_tokens ({max_tokens}) exceeds the model "
                           f"context ({served.context_len})", "max_tokens", "context_length_exceeded")
        cost = sum(map(len, ids)) + req.n * len(ids) * max_tokens   # charged up front at its worst case
        verdict = limiter.check(kid, cost)
        if not verdict.allowed and verdict.which == "too_large":
            raise ApiError(400, f"max_tokens: this request may use {cost}"
                           f" tokens (prompt + n x max_tokens); the key's limit is {limiter.tokens_per_minute} per "
                           "minute (serving.rate_limit.tokens_per_minute)", "max_tokens", "request_too_large")
        if not verdict.allowed and verdict.which == "storage":
            raise ApiError(503, "rate-limit storage unreachable (serving.rate_limit.storage)", None,
                           "rate_limit_storage_unavailable", "server_error", {"Retry-After": "5"})
        if not verdict.allowed:
            metrics.rate_limited.labels(limit=verdict.which).inc()
            raise ApiError(429, f"rate limit reached for {verdict.which} per minute; retry in "
                           f"{verdict.retry_after_s}s", None, "rate_limit_exceeded", "rate_limit_error",
                           {"Retry-After": str(verdict.retry_after_s)})
        jobs, handles = [], []
        try:
            for p, row in enumerate(ids):
                for j in range(req.n):
                    params = SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                                            stop=req.stops, seed=None if req.seed is None else req.seed + j)
                    # An upstream engine (serving.engine=vllm) forwards the templated text itself.
                    kw = {"text": texts[p]} if getattr(served.engine, "takes_text", False) else {}
                    handles.append(served.engine.submit(row, params, **kw))
                    jobs.append((p, row))
        except QueueFull as exc:
            for h in handles:
                h.cancel()
            raise ApiError(503, f"server busy: {exc}", None, "queue_full", "server_error",
                           {"Retry-After": str(getattr(exc, "retry_after", 1))}) from None
        rid = S.new_id("chatcmpl" if chat else "cmpl")
        headers = {"X-Model-Version": served.ref.version, "X-Request-Id": rid}
        route = request.url.path
        state = [{"text": [], "lps": [], "n": 0, "finish": None, "toks": []} for _ in handles]
        want_lp = not chat and req.logprobs is not None
        first = [None]

        def record(i: int) -> None:
            st, (p, row) = state[i], jobs[i]
            lps = st["lps"]
            reqlog.log({"id": rid, "index": i, "endpoint": route, "model": served.ref.label,
                        "version": served.ref.version, "key_id": kid, "prompt": texts[p],
                        "completion": "".join(st["text"]), "prompt_tokens": len(row), "completion_tokens": st["n"],
                        "latency_s": round(time.perf_counter() - t0, 4),
                        "ttft_s": None if first[0] is None else round(first[0] - t0, 4),
                        "mean_logprob": (sum(lps) / len(lps)) if lps else None, "finish_reason": st["finish"],
                        "temperature": req.temperature, "stream": req.stream})
            metrics.tokens.labels(version=served.ref.version).inc(st["n"])
            metrics.prompt_tokens.labels(version=served.ref.version).inc(len(row))

        def consume(i: int, ev) -> None:
            st = state[i]
            if first[0] is None and ev.token_id is not None:   # the engine's clock when it has one (afinal)
                first[0] = getattr(handles[i], "first_token_at", None) or time.perf_counter()
                metrics.ttft.labels(route=route).observe(first[0] - t0)
            if ev.text:
                st["text"].append(ev.text)
            if ev.token_id is not None:
                st["n"] += 1
            if ev.logprob is not None:
                st["lps"].append(ev.logprob)
                st["toks"].append((ev.text, ev.logprob))
            if ev.finish_reason is not None:
                st["finish"] = ev.finish_reason
                record(i)

        def totals() -> dict:
            return S.usage(sum(len(r) for _, r in jobs), sum(st["n"] for st in state))

        label, fp = served.ref.label, served.fingerprint
        if req.stream:
            enc = S.ChunkEncoder(rid, label, fp, chat)

            def sse_event(i: int, ev, opened: set, sent: list) -> bytes:
                if ev.finish_reason == "error":   # OpenAI's way: an error object inside the stream
                    return enc.event(S.error_body(f"generation of choice {i} failed in the engine", "server_error",
                                                  None, "engine_error"))
                if ev.finish_reason == "cancelled":   # by the server (a hung-up client reads nothing more)
                    return enc.event(S.error_body(f"generation of choice {i} was cancelled by the server",
                                                  "server_error", None, "generation_cancelled"))
                finish = openai_finish(ev.finish_reason)
                first = chat and i not in opened
                if not (ev.text or finish or first):
                    return b""
                opened.add(i)
                if not (finish or first or want_lp):
                    return enc.text(i, ev.text)       # the per-token case: cached JSON around the text
                c = enc.chunk(i, ev.text, finish, first=first)
                if want_lp:   # the tokens since the last chunk (some decode to no text yet)
                    c["choices"][0]["logprobs"] = S.logprobs_block(state[i]["toks"][sent[i]:])
                    sent[i] = len(state[i]["toks"])
                return enc.event(c)

            async def sse() -> AsyncIterator[bytes]:
                try:
                    opened, sent = set(), [0] * len(handles)
                    # One write per group of ready events: under load the loop runs behind the engine.
                    async with contextlib.aclosing(merge_batches(handles)) as groups:   # a hang-up cancels
                        async for group in groups:
                            out = []
                            for i, ev in group:
                                consume(i, ev)
                                out.append(sse_event(i, ev, opened, sent))
                            if any(out):
                                yield b"".join(out)
                    tail = []
                    if req.stream_options and req.stream_options.include_usage:
                        tail.append(enc.event({**enc.chunk(0, None, None), "choices": [], "usage": totals()}))
                    yield b"".join(tail) + b"data: [DONE]\n\n"
                    metrics.latency.labels(route=route).observe(time.perf_counter() - t0)
                finally:
                    served.release()
                    for i, st in enumerate(state):   # a client that hung up: its partial choices are on record
                        if st["finish"] is None:
                            st["finish"] = "cancelled"
                            record(i)
            return StreamingResponse(sse(), media_type="text/event-stream",
                                     headers={**headers, "Cache-Control": "no-cache"})

        async def collect() -> None:
            if all(hasattr(h, "afinal") for h in handles):   # nothing is sent before the end: wake once
                for i, events in enumerate(await asyncio.gather(*(h.afinal() for h in handles))):
                    for ev in events:
                        consume(i, ev)
                return
            async for i, ev in merge(handles):
                consume(i, ev)
        task = asyncio.ensure_future(collect())
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=0.5)
                if not task.done() and await request.is_disconnected():
                    task.cancel()   # merge() cancels the engine's sequences
            await task
        finally:
            if not task.done():     # this handler was cancelled: stop the collector (and the sequences)
                task.cancel()
        metrics.latency.labels(route=route).observe(time.perf_counter() - t0)
        if any(st["finish"] == "error" for st in state):
            raise ApiError(500, "generation failed in the engine (see the server log)", None, "engine_error",
                           "server_error")
        if any(st["finish"] == "cancelled" for st in state):   # never a cut completion passed off as whole
            raise ApiError(503, "generation was cancelled by the server (shutting down or the model was "
                           "swapped out); retry", None, "generation_cancelled", "server_error", {"Retry-After": "1"})
        choices = []
        for i, st in enumerate(state):
            text = "".join(st["text"])
            if not chat and req.echo:
                text = texts[jobs[i][0]] + text
            finish = openai_finish(st["finish"])
            if chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None,
                                "finish_reason": finish})
            else:
                choices.append({"index": i, "text": text, "finish_reason": finish,
                                "logprobs": S.logprobs_block(st["toks"]) if want_lp else None})
        return JSONResponse(S.completion_response(rid, label, fp, choices, totals(), chat), headers=headers)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await complete(request, chat=True)

    from components.serving.routes import add_routes
    add_routes(app, store=store, keys=keys, metrics=metrics, authorize=authorize, read_body=read_body,
               feedback_log=feedback_log, ApiError=ApiError)
    return app


KNOWN_ROUTES = {"/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/feedback", "/healthz", "/readyz",
                "/metrics", "/admin/reload"}
