"""Start and stop `llmcycle serve --generate-key` as a detached background process.

The deploy stage uses it after a promotion when no server answers (serving.start_on_promote). The
server runs in its own session (process group), so the flow or shell that started it can exit; it
logs to data/serving/server.log and its pid is kept in data/serving/server.pid (one server per
project). Compromise: the pid file is trusted after a liveness check (os.kill 0) plus a look at
/proc/<pid>/cmdline where there is one; a recycled pid without /proc is not detected.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from components.config import Settings

PID_FILE = ("data", "serving", "server.pid")
LOG_FILE = ("data", "serving", "server.log")


def pid_path(settings: Settings) -> Path:
    return settings.path(*PID_FILE)


def log_path(settings: Settings) -> Path:
    return settings.path(*LOG_FILE)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:      # someone else's process took the pid: not our server
        return False
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.is_file():
        try:
            return b"serve" in cmdline.read_bytes()
        except OSError:
            return False
    return True


def running_pid(settings: Settings) -> int | None:
    """The pid of the server this project started, when it still runs; a stale pid file is removed."""
    path = pid_path(settings)
    try:
        pid = int(path.read_text().strip())
    except (OSError, ValueError):
        return None
    if _alive(pid):
        return pid
    path.unlink(missing_ok=True)
    return None


def serve_command(config: str | Path, overrides: list[str], port: int | None = None) -> list[str]:
    """The command line: this interpreter running the `llmcycle` app (the console script may not be on PATH)."""
    cmd = [sys.executable, "-c", "from flows.cli import app; app()", "serve", "--config", str(Path(config).resolve()),
           "--generate-key"]
    for item in overrides:
        cmd += ["--set", item]
    if port is not None:
        cmd += ["--port", str(port)]
    return cmd


def _ready(url: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


def start_server(settings: Settings, config: str | Path, overrides: list[str], url: str) -> dict:
    """Spawn the server, wait for url/readyz; {ok, pid, url, log, message}. Never raises for a server that
    fails: it is stopped (its process group) and the log's last lines go into the message."""
    log = log_path(settings)
    log.parent.mkdir(parents=True, exist_ok=True)
    pid = running_pid(settings)
    if pid is not None:
        return {"ok": False, "pid": pid, "url": url, "log": str(log),
                "message": f"a server this project started (pid {pid}) runs but does not answer at {url}; "
                           f"see {log} or `llmcycle serve --stop`"}
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    root = str(settings.root.resolve())
    # The child imports flows.* from the checkout even when the project root is elsewhere.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[2]),
                                                      env.get("PYTHONPATH")]))
    with open(log, "ab") as out:
        proc = subprocess.Popen(serve_command(config, overrides), cwd=root, env=env, stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)
    pid_path(settings).write_text(f"{proc.pid}\n")
    deadline = time.monotonic() + settings.serving.start_timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pid_path(settings).unlink(missing_ok=True)
            return {"ok": False, "pid": proc.pid, "url": url, "log": str(log),
                    "message": f"the server exited ({proc.returncode}) before it was ready: {_tail(log)} (log {log})"}
        if _ready(url):
            return {"ok": True, "pid": proc.pid, "url": url, "log": str(log),
                    "message": f"started a server (pid {proc.pid}) at {url}/v1 on the new champion; log {log}, "
                               f"`llmcycle serve --stop` stops it"}
        time.sleep(0.5)
    stop_server(settings)
    return {"ok": False, "pid": proc.pid, "url": url, "log": str(log),
            "message": f"the server was not ready at {url} within serving.start_timeout_s="
                       f"{settings.serving.start_timeout_s:g}s and was stopped: {_tail(log)} (log {log})"}


def stop_server(settings: Settings, timeout_s: float = 30.0) -> int | None:
    """SIGTERM the server's process group (SIGKILL after timeout_s); its pid, or None when none ran."""
    pid = running_pid(settings)
    if pid is None:
        return None
    for sig, wait in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pid, sig)      # start_new_session: the pgid is the server's pid
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and _exists(pid):
            time.sleep(0.1)
        if not _exists(pid):
            break
    pid_path(settings).unlink(missing_ok=True)
    return pid


def _exists(pid: int) -> bool:
    """Still there (a zombie child of this process counts as gone once reaped)."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    except ChildProcessError:
        pass                     # not our child: only kill(0) can tell
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
