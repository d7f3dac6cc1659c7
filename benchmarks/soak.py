"""Load held: 16 concurrent clients against a real `llmcycle serve` for N minutes, with two hot swaps and one restart.

The server runs in its own process on a project whose registry holds versions 1 and 2 (`--project`, e.g. a kept
loop_bench clone: the default champion's shape; default: a tiny registry built in a temp folder). At 1/3 of the
run the champion alias moves to v2 and the server is told (/admin/reload?wait=true); at 1/2 the server is
stopped (SIGTERM) and started again; at 2/3 the alias moves back to v1. Clients retry a refused connection
(the restart) and a 503 "no model loaded yet" (the restarted server loading); anything else that is not a whole answer counts: failed (an HTTP error), cut (a 200 whose
answer stopped short of max_tokens without an end token, or a 503 generation_cancelled). Prints, per minute,
sent / failed / cut / p50 / p95 latency, and the server's RSS at start and end of each process.

    .venv/bin/python benchmarks/soak.py --minutes 10
    .venv/bin/python benchmarks/soak.py --minutes 10 --project /tmp/loop-bench-full-XXXX/llmcycle
"""
from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
KEY, ADMIN = "sk-soak-client", "sk-soak-admin"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_server(root: Path, port: int) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING_URI", "LLMCYCLE_"))}
    env.update(LLMCYCLE_API_KEYS=KEY, LLMCYCLE_ADMIN_KEY=ADMIN)
    proc = subprocess.Popen([str(REPO / ".venv/bin/llmcycle"), "serve", "--config", str(root / "params.yaml"),
                             "--port", str(port), "--set", "serving.rate_limit.requests_per_minute=1000000",
                             "--set", "serving.rate_limit.tokens_per_minute=1000000000"],
                            cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    from tests.serving.server_helpers import wait_ready

    wait_ready(proc, f"http://127.0.0.1:{port}", 180)
    return proc


def set_champion(root: Path, version: str) -> None:
    from components import config as cfg
    from components import tracking

    settings = cfg.load(root / "params.yaml")
    tracking.set_alias(settings, settings.registry.model_name, "champion", version)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--project", type=Path, help="a project with registry versions 1 and 2 (default: a tiny one)")
    args = ap.parse_args()
    root = args.project
    if root is None:
        from tests.serving.server_helpers import build_registry

        root = Path(tempfile.mkdtemp(prefix="soak-")) / "proj"
        root.mkdir(parents=True)
        build_registry(root)
    for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        os.environ.pop(k, None)
    set_champion(root, "1")
    from tests.serving.server_helpers import free_port

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = start_server(root, port)
    rss = [("server 1 start", rss_mb(server.pid))]
    t0, stop = time.monotonic(), threading.Event()
    events: list[tuple[float, str]] = []
    done: list[tuple[float, float, str]] = []      # (start offset s, latency s, outcome: ok | failed | cut)
    retried = [0]
    why: Counter = Counter()                       # failed / cut answers by status (and the error's first words)
    body = {"model": "llmcycle", "prompt": "def parse(items):\n", "max_tokens": args.max_tokens, "temperature": 0}

    def client() -> None:
        with httpx.Client(timeout=120) as c:
            while not stop.is_set():
                start = time.monotonic()
                try:
                    r = c.post(f"{base}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
                except httpx.ConnectError:
                    retried[0] += 1                    # the restart: refused while down, retried
                    time.sleep(0.2)
                    continue
                except httpx.HTTPError as exc:
                    why[type(exc).__name__] += 1
                    done.append((start - t0, time.monotonic() - start, "failed"))
                    continue
                if r.status_code == 503 and "no model loaded yet" in r.text:
                    retried[0] += 1                    # the restarted server is up but still loading: retried
                    time.sleep(0.2)
                    continue
                if r.status_code == 503 and "generation_cancelled" in r.text:
                    outcome = "cut"
                elif r.status_code != 200:
                    outcome = "failed"
                    why[f"{r.status_code} {r.text[:80]}"] += 1
                else:
                    ch = r.json()["choices"][0]
                    whole = ch["finish_reason"] == "stop" or r.json()["usage"]["completion_tokens"] == args.max_tokens
                    outcome = "ok" if whole else "cut"
                done.append((start - t0, time.monotonic() - start, outcome))

    threads = [threading.Thread(target=client, daemon=True) for _ in range(args.clients)]
    for t in threads:
        t.start()
    total = args.minutes * 60
    plan = [(total / 3, "swap to v2"), (total / 2, "restart"), (2 * total / 3, "swap to v1")]
    for at, what in plan:
        time.sleep(max(0.0, at - (time.monotonic() - t0)))
        if what.startswith("swap"):
            version = what[-1]
            set_champion(root, version)
            r = httpx.post(f"{base}/admin/reload?wait=true", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=300)
            events.append((time.monotonic() - t0, f"{what}: {r.status_code} serving v{r.json().get('version')}"))
        else:
            rss.append(("server 1 before restart", rss_mb(server.pid)))
            server.send_signal(signal.SIGTERM)
            server.wait(120)
            server = start_server(root, port)
            rss.append(("server 2 start", rss_mb(server.pid)))
            events.append((time.monotonic() - t0, "restarted"))
    time.sleep(max(0.0, total - (time.monotonic() - t0)))
    rss.append(("server 2 end", rss_mb(server.pid)))
    stop.set()
    for t in threads:
        t.join(180)
    server.send_signal(signal.SIGTERM)
    server.wait(120)

    print(f"soak: {args.clients} clients x {args.minutes:g} min, max_tokens {args.max_tokens}, project {root}")
    for at, what in events:
        print(f"  {at:7.1f} s  {what}")
    print("| minute | sent | failed | cut | p50 ms | p95 ms |\n|---|---|---|---|---|---|")
    for m in range(int(-(-total // 60))):
        rows = [d for d in done if m * 60 <= d[0] < (m + 1) * 60]
        lat = sorted(d[1] * 1000 for d in rows if d[2] == "ok")
        p = (lambda q: f"{lat[min(len(lat) - 1, int(q * len(lat)))]:.0f}") if lat else (lambda q: "-")
        print(f"| {m + 1} | {len(rows)} | {sum(d[2] == 'failed' for d in rows)} | {sum(d[2] == 'cut' for d in rows)} "
              f"| {p(0.5)} | {p(0.95)} |")
    n = len(done)
    print(f"total: sent {n}, failed {sum(d[2] == 'failed' for d in done)}, cut {sum(d[2] == 'cut' for d in done)}, "
          f"refused or loading while restarting (retried) {retried[0]}; p50 {statistics.median(d[1] for d in done) * 1000:.0f} ms")
    for reason, count in why.most_common(5):
        print(f"  failed: {count} x {reason}")
    for label, mb in rss:
        print(f"  RSS {label}: {mb:.0f} MB")
    growth = (rss[-1][1] - rss[-2][1]) / rss[-2][1] * 100
    print(f"  RSS growth of the running server over its life: {growth:+.1f}%")


if __name__ == "__main__":
    main()
