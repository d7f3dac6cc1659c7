"""Prometheus metrics for the server (prometheus_client, one registry per app so tests stay isolated).

Engine gauges (queue depth, running sequences, batch size) are read from engine.stats at scrape
time rather than pushed from the decode loop, which must not pay for observability.
"""
from __future__ import annotations

from typing import Any, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401 - re-exported for the app

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("llmcycle_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.latency = Histogram("llmcycle_request_latency_seconds", "completion latency", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("llmcycle_time_to_first_token_seconds", "time to the first generated token",
                              ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("llmcycle_tokens_generated", "completion tokens returned", ["version"], registry=r)
        self.prompt_tokens = Counter("llmcycle_prompt_tokens", "prompt tokens accepted", ["version"], registry=r)
        self.queue_depth = Gauge("llmcycle_queue_depth", "requests waiting in the engine queue", registry=r)
        self.running = Gauge("llmcycle_batch_size", "sequences in the engine's current batch", registry=r)
        self.serving = Gauge("llmcycle_serving_version", "1 for the model version now serving", ["name", "version"],
                             registry=r)
        self.reload_failures = Counter("llmcycle_reload_failures", "model loads that failed (old one kept)",
                                       registry=r)
        self.reloads = Counter("llmcycle_reloads", "model versions swapped in", registry=r)
        self.rate_limited = Counter("llmcycle_rate_limited", "requests refused over a rate limit", ["limit"],
                                    registry=r)
        self.log_dropped = Gauge("llmcycle_request_log_dropped", "request-log records dropped (queue full)",
                                 registry=r)
        self._refresh: list[Callable[[], None]] = []

    def on_scrape(self, fn: Callable[[], None]) -> None:
        self._refresh.append(fn)

    def set_serving(self, name: str, version: str) -> None:
        self.serving.clear()
        self.serving.labels(name=name, version=version).set(1)

    def set_engine(self, stats: dict[str, Any]) -> None:
        self.queue_depth.set(stats.get("queue_depth", 0))
        self.running.set(stats.get("running", 0))

    def render(self) -> bytes:
        for fn in self._refresh:
            try:
                fn()
            except Exception:  # noqa: BLE001 - a scrape never fails because a gauge could not be read
                pass
        return generate_latest(self.registry)


class CountRequests:
    """Pure ASGI middleware: counts every HTTP request by route and final status.

    Not `@app.middleware("http")`: Starlette's BaseHTTPMiddleware pipes every body message of a streamed
    response through an extra task and memory stream, a cost paid per token in SSE responses. A request
    whose handler raised (no response started) counts as 500, as the server answers it.
    """

    def __init__(self, app: Any, metrics: Metrics, known_routes: set[str]):
        self.app, self.metrics, self.known = app, metrics, known_routes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [500]

        async def send_status(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)
        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope["path"] if scope["path"] in self.known else "other"
            self.metrics.requests.labels(route=route, status=str(status[0])).inc()
