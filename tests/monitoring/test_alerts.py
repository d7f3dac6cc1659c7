"""Alerts: the webhook POSTs JSON to a real loopback HTTP receiver; a refused, failing or slow receiver is
reported, never raised. (The event itself is checked on the Prefect server in test_monitor_flow.)"""
from __future__ import annotations

import contextlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from components.monitoring import alerts


@contextlib.contextmanager
def receiver(status: int = 200, delay_s: float = 0.0):
    """A real HTTP server on 127.0.0.1 (a free port) recording the JSON bodies POSTed to it."""
    received: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's name
            time.sleep(delay_s)
            length = int(self.headers.get("Content-Length", 0))
            received.append(json.loads(self.rfile.read(length)))
            self.send_response(status)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook", received
    finally:
        server.shutdown()
        server.server_close()


BODY = alerts.payload({"start": "2026-11-30T00:00:00+00:00", "end": "2026-11-30T01:00:00+00:00", "n": 100, "x": 1},
                      0.6, ["prompt", "prompt_chars"], "run123", "4")


def test_payload_and_resource():
    assert BODY == {"window": {"start": "2026-11-30T00:00:00+00:00", "end": "2026-11-30T01:00:00+00:00", "n": 100},
                    "drift_share": 0.6, "drifted_columns": ["prompt", "prompt_chars"], "monitor_run_id": "run123",
                    "model_version": "4"}
    res = alerts.resource("llmcycle", "4")
    assert res["prefect.resource.id"] == "llmcycle.model.llmcycle.4"
    line = alerts.alert_line("llmcycle", BODY)
    assert line.startswith("ALERT llmcycle.drift.detected: llmcycle v4 drifted on 100 requests")
    assert "prompt, prompt_chars" in line and "run123" in line


def test_webhook_posts_json_to_a_real_receiver():
    with receiver() as (url, received):
        assert alerts.post_webhook(url, BODY, timeout_s=5) == "sent (HTTP 200)"
    assert received == [{"event": "llmcycle.drift.detected", **BODY}]


def test_webhook_failures_are_reported_not_raised(caplog):
    with receiver(status=500) as (url, _):
        assert alerts.post_webhook(url, BODY, timeout_s=5).startswith("failed: HTTP 500")
    with receiver(delay_s=2.0) as (url, _):
        assert "timed out" in alerts.post_webhook(url, BODY, timeout_s=0.3)
    closed = url                                          # the receiver is gone: connection refused
    assert alerts.post_webhook(closed, BODY, timeout_s=2).startswith("failed: ")
    assert alerts.post_webhook("not a url", BODY, timeout_s=2).startswith("failed: ValueError")
    assert "drift webhook failed" in caplog.text

