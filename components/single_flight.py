"""Single-flight locks: at most one holder per lock file on this machine (one lifecycle, one retrain per project).

The file holds the holder's pid, host and start time, guarded by flock: the kernel drops the lock when its
holder dies, so a lock left by a killed process is stale by construction and the next one takes it over
(and says whose it was). The file is emptied, never unlinked, on release: unlinking races with a process
that opened it a moment before. Must not import anything above components.config.
"""
from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import socket
import threading
from pathlib import Path
from typing import Any

_HELD: dict[tuple[str, int], list] = {}   # (lock path, thread) -> [depth, holder record]: the locks held here


class SingleFlightLock:
    """Non-blocking exclusive lock; acquire() is False (and `holder` says who) while another process holds it.

    reentrant=True: the thread that holds it may take it again (`llmcycle run` takes the project's lifecycle
    lock before any flow starts, so a refusal is one line, not a failed flow run, and the lifecycle flow inside
    it takes it again). Other threads and processes are refused either way.
    """

    def __init__(self, path: Path, reentrant: bool = False):
        self.path, self.reentrant = Path(path), reentrant
        self.fd: int | None = None
        self.holder: dict[str, Any] = {}
        self.taken_over: dict[str, Any] | None = None
        self._nested = False

    def acquire(self, **info: Any) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        key = (str(self.path.resolve()), threading.get_ident())
        if self.reentrant and key in _HELD:      # this thread holds it already (an outer acquire)
            _HELD[key][0] += 1
            self.holder, self._nested = _HELD[key][1], True
            return True
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.holder = _read(fd)
            os.close(fd)
            return False
        previous = _read(fd)
        # A pid left in a free lock: its holder died without releasing (killed, out of memory).
        self.taken_over = previous or None
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "since": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), **info}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        os.fsync(fd)
        self.fd, self.holder = fd, record
        _HELD[key] = [1, record]
        return True

    def release(self) -> None:
        key = (str(self.path.resolve()), threading.get_ident())
        if self._nested:
            _HELD[key][0] -= 1
            self._nested = False
            return
        if self.fd is None:
            return
        _HELD.pop(key, None)
        os.ftruncate(self.fd, 0)
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> "SingleFlightLock":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _read(fd: int) -> dict[str, Any]:
    raw = os.pread(fd, 4096, 0)
    try:
        obj = json.loads(raw) if raw.strip() else {}
    except ValueError:
        obj = {"unreadable": raw[:80].decode("utf-8", "replace")}
    return obj if isinstance(obj, dict) else {}


def describe(holder: dict[str, Any]) -> str:
    """`pid 123 on host since 2026-12-08T03:00:00+00:00`: who holds a lock, for an error message."""
    return f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since')}"
