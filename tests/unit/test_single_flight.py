"""The single-flight lock is re-entrant in its own process and exclusive across processes."""
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


def test_reentrant_in_its_process_exclusive_across_processes(tmp_path):
    path = tmp_path / "lifecycle.lock"
    outer, inner = SingleFlightLock(path), SingleFlightLock(path)
    assert outer.acquire(flow="cli") and inner.acquire(flow="lifecycle")
    assert inner.holder["flow"] == "cli"                  # the outer holder's record stands
    inner.release()
    assert not _other_process_gets(path)                  # still held by the outer acquire
    outer.release()
    assert _other_process_gets(path) and path.read_text() == ""
