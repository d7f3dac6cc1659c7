"""The deploy stage's last step: tell a running server that the champion moved, so it swaps now.

The server also polls the alias (serving.poll_interval_s); this makes the swap immediate. No server
answering is not an error (the next `llmcycle serve` starts on the new champion): the result says so.
The server is found at LLMCYCLE_SERVER_URL, else http://serving.host:serving.port; the admin key is
LLMCYCLE_ADMIN_KEY, else the one `llmcycle serve --generate-key` keeps for this machine.
"""
from __future__ import annotations

import json
import os
import urllib.error
import urllib.request

from components.config import Settings

URL_ENV = "LLMCYCLE_SERVER_URL"


def server_url(settings: Settings) -> str:
    return (os.environ.get(URL_ENV) or f"http://{settings.serving.host}:{settings.serving.port}").rstrip("/")


def admin_key(settings: Settings) -> str | None:
    from components.serving.auth import ADMIN_ENV

    if os.environ.get(ADMIN_ENV):
        return os.environ[ADMIN_ENV]
    kept = settings.path("data", "serving", "admin_key")
    return kept.read_text().strip() or None if kept.is_file() else None


def reload_server(settings: Settings, timeout_s: float = 5.0) -> str:
    """POST /admin/reload {"model": "<name>@champion"}; one line saying what happened (never raises)."""
    url = f"{server_url(settings)}/admin/reload"
    body = json.dumps({"model": f"{settings.registry.model_name}@champion"}).encode()
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
    key = admin_key(settings)
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as resp:
            return f"server at {server_url(settings)} told to reload ({resp.status})"
    except urllib.error.HTTPError as exc:
        return f"server at {server_url(settings)} refused the reload ({exc.code}); it picks the alias up when it polls"
    except (OSError, ValueError):
        return f"no server at {server_url(settings)}; `make serve` starts one on the new champion"
