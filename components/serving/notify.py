"""The deploy stage's last step: tell a running server that the champion moved, so it swaps now,
or, with serving.start_on_promote, start one (components/serving/launcher.py) when none answers.

The server also polls the alias (serving.poll_interval_s); this makes the swap immediate. No server
answering is not an error (the next `llmcycle serve` starts on the new champion): the result says so.
The server is found at LLMCYCLE_SERVER_URL, else http://serving.host:serving.port; the admin key is
LLMCYCLE_ADMIN_KEY, else the one `llmcycle serve --generate-key` keeps for this machine.
"""
from __future__ import annotations

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
    """POST /admin/reload with no body: the server re-resolves what it serves (the champion alias unless it
    was started on a fixed version or folder, which it keeps); one line saying what happened (never raises).
    Naming the champion here would switch a server pinned with `--model 3` over to it."""
    url = f"{server_url(settings)}/admin/reload"
    request = urllib.request.Request(url, data=b"", method="POST")
    key = admin_key(settings)
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as resp:
            return f"server at {server_url(settings)} told to reload ({resp.status})"
    except urllib.error.HTTPError as exc:
        return f"server at {server_url(settings)} refused the reload ({exc.code}); it picks the alias up when it polls"
    except (OSError, ValueError):
        return f"{NO_SERVER} at {server_url(settings)}; `make serve` starts one on the new champion"


NO_SERVER = "no server"


def after_promotion(settings: Settings, config: str, overrides: list[str]) -> dict:
    """Reload the running server, or start one when none answers and serving.start_on_promote is on.

    {"action": reloaded|refused|started|start_failed|none, "message": one line, "url", "pid" (started)}.
    Never raises: the promotion stands whatever happens to the server.
    """
    message = reload_server(settings)
    url = server_url(settings)
    if not message.startswith(NO_SERVER):
        return {"action": "refused" if "refused" in message else "reloaded", "message": message, "url": url}
    if not settings.serving.start_on_promote:
        return {"action": "none", "message": message, "url": url}
    from components.serving.launcher import start_server

    # The new server binds serving.host:port (LLMCYCLE_SERVER_URL may name another machine's).
    host = {"0.0.0.0": "127.0.0.1", "::": "[::1]"}.get(settings.serving.host, settings.serving.host)
    url = f"http://{host}:{settings.serving.port}"
    started = start_server(settings, config, overrides, url)
    return {"action": "started" if started["ok"] else "start_failed", "message": started["message"], "url": url,
            "pid": started["pid"]}
