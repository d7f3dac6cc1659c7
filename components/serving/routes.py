"""The server's non-generation routes: /v1/models, /v1/feedback, /healthz, /readyz, /metrics, /admin/reload.

Kept apart from app.py (the completion path) so each file reads top to bottom. /healthz answers as
soon as the process is up; /readyz only once a model is loaded and warmed (what a load balancer or
Kubernetes readiness probe should route on).
"""
from __future__ import annotations

import time
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from components.serving import schemas as S
from components.serving.metrics import CONTENT_TYPE_LATEST


RELOAD_BODY_MAX = 4096


def add_routes(app: FastAPI, store: Any, keys: Any, metrics: Any, authorize: Callable, read_body: Callable,
               feedback_log: Any, ApiError: type) -> None:
    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        cur = store.current
        if cur is None:
            return JSONResponse({"status": "loading", "error": store.last_error}, status_code=503)
        return {"status": "ready", "model": cur.ref.label, "version": cur.ref.version,
                "loaded_at": cur.loaded_at, "last_reload_error": store.last_error}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        versions = await run_in_threadpool(store.versions)
        cur = store.current
        now = int(time.time())
        data = [{"id": store.name, "object": "model", "created": now, "owned_by": "llmcycle",
                 "serving_version": cur.ref.version if cur else None}]
        for v in versions:
            meta = {"object": "model", "created": v["created"], "owned_by": "llmcycle", "version": v["version"],
                    "aliases": v["aliases"]}
            data += [{"id": f"{store.name}@{a}", **meta} for a in v["aliases"]]
            data.append({"id": f"{store.name}/{v['version']}", **meta})
        if cur is not None and not any(d["id"] == cur.ref.label for d in data):
            data.append({"id": cur.ref.label, "object": "model", "created": int(cur.loaded_at),
                         "owned_by": "llmcycle", "version": cur.ref.version, "aliases": []})
        return {"object": "list", "data": data}

    @app.post("/v1/feedback")
    async def feedback(request: Request):
        kid = authorize(request)
        fb = await read_body(request, S.FeedbackRequest)
        if fb.completion_id and fb.rating:
            kind = "rating"
        elif fb.prompt and fb.chosen and fb.rejected:
            kind = "preference"
        else:
            raise ApiError(400, "feedback needs completion_id + rating (up|down), or prompt + chosen + rejected",
                           "completion_id" if not fb.prompt else ("chosen" if not fb.chosen else "rejected"),
                           "missing_field")
        cur = store.current
        feedback_log.log({"kind": kind, "key_id": kid, "version": cur.ref.version if cur else None,
                          **fb.model_dump(exclude_none=True)})
        return {"status": "recorded", "kind": kind}

    @app.post("/admin/reload")
    async def reload(request: Request, wait: bool = False):
        if not keys.check_admin(request.headers.get("authorization")):
            raise ApiError(401, "admin key required (LLMCYCLE_ADMIN_KEY)", None, "invalid_api_key",
                           "authentication_error")
        raw = bytearray()   # read with a cap: {"model": "..."} is all this route takes
        async for part in request.stream():
            raw += part
            if len(raw) > RELOAD_BODY_MAX:
                raise ApiError(413, f"request body exceeds {RELOAD_BODY_MAX} bytes", None, "body_too_large")
        spec = None
        if raw.strip():
            try:
                import json
                spec = (json.loads(raw) or {}).get("model")
            except (ValueError, AttributeError):
                raise ApiError(400, "body must be a JSON object like {\"model\": \"llmcycle@champion\"}",
                               "model", "invalid_json") from None
            if spec is not None and not isinstance(spec, str):
                raise ApiError(400, "model: must be a string", "model", "invalid_value")
        if not wait:
            store.reload_async(spec)
            return JSONResponse({"status": "reloading", "target": spec or store.primary_spec}, status_code=202)
        ok = await run_in_threadpool(store.reload, spec, True)
        cur = store.current
        return JSONResponse({"status": "swapped" if ok else "failed", "error": None if ok else store.last_error,
                             "serving": cur.ref.label if cur else None, "version": cur.ref.version if cur else None},
                            status_code=200 if ok else 500)
