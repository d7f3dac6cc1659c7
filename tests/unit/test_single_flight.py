"""The single-flight lock: re-entrant (when asked) in the thread that holds it, exclusive for other threads and
processes."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from components.single_flight import SingleFlightLock


def _other_process_gets(path: Path) -> bool:
    code = f"from components.single_flight import SingleFlightLock as L; print(L({str(path)!r}).acquire())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    return out.stdout.strip() == "True"


def test_reentrant_in_its_thread_exclusive_across_threads_and_processes(tmp_path):
    import threading

    path = tmp_path / "lifecycle.lock"
    outer, inner = SingleFlightLock(path, reentrant=True), SingleFlightLock(path, reentrant=True)
    assert outer.acquire(flow="cli") and inner.acquire(flow="lifecycle")
    assert inner.holder["flow"] == "cli"                  # the outer holder's record stands
    got = []
    t = threading.Thread(target=lambda: got.append(SingleFlightLock(path, reentrant=True).acquire()))
    t.start()
    t.join()
    assert got == [False]                                 # another thread is refused
    inner.release()
    assert not _other_process_gets(path)                  # still held by the outer acquire
    outer.release()
    assert path.read_text() == "" and _other_process_gets(path)
