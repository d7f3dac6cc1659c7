"""Append-only request log for monitoring: one JSON line per completion in data/inference/.

Files are requests-<UTC date>.jsonl, rotated daily and past max_bytes (requests-<date>.<n>.jsonl).
A background thread writes: log() only enqueues (and drops + counts when the queue is full), so
a response never waits on the disk. Each record is one os.write of a whole line to an O_APPEND
descriptor, then fsync: a hard kill can lose queued records, never corrupt one already written.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import queue
import threading
from pathlib import Path
from typing import Any

_STOP = object()


class RequestLog:
    def __init__(self, folder: str | Path, max_bytes: int = 64_000_000, max_queue: int = 10_000,
                 prefix: str = "requests"):
        self.folder = Path(folder)
        self.prefix = prefix
        self.max_bytes = max_bytes
        self.queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self.dropped = 0
        self.written = 0
        self.errors = 0
        self._fd: int | None = None
        self._path: Path | None = None
        self._thread = threading.Thread(target=self._run, name="request-log", daemon=True)
        self._thread.start()

    def log(self, record: dict[str, Any]) -> None:
        """Enqueue a record (never blocks); stamps `ts` (UTC ISO) when missing."""
        record.setdefault("ts", dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds"))
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued, then stop the writer."""
        try:
            self.queue.put(_STOP, timeout=timeout)
        except queue.Full:
            pass
        self._thread.join(timeout)

    def flush(self, timeout: float = 5.0) -> None:
        """Wait until every record queued so far is on disk (tests, shutdown)."""
        done = threading.Event()
        self.queue.put(done, timeout=timeout)
        done.wait(timeout)

    # ------------------------------------------------------------------ writer thread
    def _target(self, line_len: int) -> Path:
        day = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
        path = self._path if self._path is not None and self._path.name.startswith(f"{self.prefix}-{day}.") else None
        n = 0 if path is None or path.name.count(".") == 1 else int(path.name.split(".")[1])
        path = path or self.folder / f"{self.prefix}-{day}.jsonl"
        while path.exists() and path.stat().st_size > 0 and path.stat().st_size + line_len > self.max_bytes:
            n += 1
            path = self.folder / f"{self.prefix}-{day}.{n}.jsonl"
        return path

    def _open(self, path: Path) -> None:
        if self._path == path and self._fd is not None:
            return
        if self._fd is not None:
            os.close(self._fd)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._path = path

    def _write(self, record: dict) -> None:
        line = (json.dumps(record, ensure_ascii=False, default=str) + "\n").encode()
        self._open(self._target(len(line)))
        view = memoryview(line)
        while view:  # one write for a regular file; loop only if the kernel wrote part of it
            view = view[os.write(self._fd, view):]
        self.written += 1

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            batch = [item]
            while not self.queue.empty() and len(batch) < 256:
                batch.append(self.queue.get_nowait())
            stop = False
            for rec in batch:
                if rec is _STOP:
                    stop = True
                elif isinstance(rec, threading.Event):
                    if self._fd is not None:
                        os.fsync(self._fd)
                    rec.set()
                else:
                    try:
                        self._write(rec)
                    except Exception:  # noqa: BLE001 - a full disk must not kill the server
                        self.errors += 1
            if self._fd is not None:
                try:
                    os.fsync(self._fd)
                except OSError:
                    self.errors += 1
            if stop:
                if self._fd is not None:
                    os.close(self._fd)
                    self._fd = None
                return
