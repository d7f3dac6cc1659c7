"""A local Prefect API server for schedules and event triggers: `prefect server start` on loopback.

Events and deployment triggers need a real server (the ephemeral one Prefect starts for a lone flow
has no triggers service). When PREFECT_API_URL is set, that server is used as is and nothing starts.
Otherwise one starts as a child process on 127.0.0.1 and a free port, with its own PREFECT_HOME,
and is stopped (its whole process group) on exit. Never imports prefect: it only runs its CLI.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

API_URL_ENV = "PREFECT_API_URL"


class OrchestrationError(RuntimeError):
    """The Prefect server did not come up (the message says where its log is)."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def healthy(api_url: str, timeout_s: float = 2.0) -> bool:
    """GET <api>/health answers 200 (the server's own readiness route)."""
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout_s) as resp:
            return resp.status == 200
    except (OSError, ValueError):
        return False


def _prefect_command() -> list[str]:
    script = Path(sys.executable).with_name("prefect")
    return [str(script)] if script.exists() else [sys.executable, "-m", "prefect"]


@dataclass
class LocalServer:
    """A running `prefect server start` child: its API URL, home, log file and process."""
    api_url: str
    home: Path
    log_path: Path
    process: subprocess.Popen | None = field(default=None, repr=False)

    def stop(self, timeout_s: float = 15.0) -> None:
        """Stop the server's process group (uvicorn + services)."""
        if self.process is not None:
            stop_group(self.process, timeout_s)


def stop_group(proc: subprocess.Popen, timeout_s: float = 15.0) -> None:
    """SIGTERM the process group of a child started with start_new_session, SIGKILL what outlives timeout_s."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def start_server(home: Path, port: int | None = None, ui: bool = True, timeout_s: float = 120.0) -> LocalServer:
    """Start `prefect server start` on 127.0.0.1 (a free port unless given) and wait until /api/health is 200.

    home is its PREFECT_HOME (database, UI build, log). Raises OrchestrationError naming the log on failure.
    """
    home = Path(home).resolve()
    home.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    log_path = home / "server.log"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_SERVER_UI_ENABLED": "true" if ui else "false", "PREFECT_UI_API_URL": api_url,
           "DO_NOT_TRACK": "true"}
    env.pop(API_URL_ENV, None)   # the server must not try to talk to another one
    log = open(log_path, "ab")   # noqa: SIM115 (kept open for the child's lifetime)
    cmd = [*_prefect_command(), "server", "start", "--host", "127.0.0.1", "--port", str(port),
           "--analytics-off", "--no-background"]
    # Its own session: stop() signals the whole group (the server runs uvicorn and its services as children).
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    log.close()
    server = LocalServer(api_url=api_url, home=home, log_path=log_path, process=proc)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise OrchestrationError(f"prefect server exited with code {proc.returncode} before it answered; "
                                     f"see {log_path}")
        if healthy(api_url):
            return server
        time.sleep(0.5)
    server.stop()
    raise OrchestrationError(f"prefect server at {api_url} not healthy after {timeout_s:.0f} s; see {log_path}")


@contextlib.contextmanager
def prefect_api(home: Path, ui: bool = True, timeout_s: float = 120.0) -> Iterator[str]:
    """The Prefect API to use: PREFECT_API_URL when set (checked reachable), else a local server started
    here for the duration of the block. PREFECT_API_URL is set in this process meanwhile (children inherit it).
    """
    existing = os.environ.get(API_URL_ENV)
    if existing:
        if not healthy(existing, timeout_s=5.0):
            raise OrchestrationError(f"{API_URL_ENV}={existing}: no Prefect server answers at {existing}/health")
        yield existing
        return
    server = start_server(home, ui=ui, timeout_s=timeout_s)
    os.environ[API_URL_ENV] = server.api_url
    try:
        yield server.api_url
    finally:
        os.environ.pop(API_URL_ENV, None)
        server.stop()
