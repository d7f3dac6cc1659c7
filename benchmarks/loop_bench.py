"""The front door measured: fresh-clone `make run`s at full speed and at half speed, side by side.

Each row clones this repository's HEAD into a temp folder and runs `make run` there, as a new user would:
`full` on every core, `half` on one core (`taskset -c 0`, OMP_NUM_THREADS=1, and serving.torch_threads=1
through the Makefile's RUN_SET). It then reads the clone's own MLflow store and log and prints,
per row: matmul peak, the plan, the champion's margin over the KN trigram with its interval, syntax-valid,
the drift decisions, the retrain decision and swap, the loop's verdict and the wall times.

    .venv/bin/python benchmarks/loop_bench.py                     # full, then half
    .venv/bin/python benchmarks/loop_bench.py --rows full --venv-from .venv   # reuse installed packages
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROWS = {"full": ([], {}), "half": (["taskset", "-c", "0"], {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})}


def clone(dest: Path, venv_from: Path | None) -> None:
    subprocess.run(["git", "clone", "-q", str(REPO), str(dest)], check=True)
    if venv_from:
        # The packages only; the editable install is redone so `llmcycle` imports the clone's code.
        shutil.copytree(venv_from, dest / ".venv", symlinks=True)
        subprocess.run([str(dest / ".venv/bin/python"), "-m", "pip", "install", "-q", "--no-deps", "-e", str(dest)],
                       check=True, cwd=dest)
        stamp = subprocess.run(["sha1sum", "pyproject.toml"], cwd=dest, capture_output=True, text=True, check=True)
        for old in (dest / ".venv").glob(".installed-*"):
            old.unlink()
        (dest / ".venv" / f".installed-{stamp.stdout[:12]}").touch()


def run_row(name: str, prefix: list[str], env_extra: dict, venv_from: Path | None, keep: bool) -> dict:
    work = Path(tempfile.mkdtemp(prefix=f"loop-bench-{name}-"))
    dest = work / "llmcycle"
    t0 = time.monotonic()
    clone(dest, venv_from)
    t_setup = time.monotonic()
    env = {**os.environ, **env_extra}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("PREFECT_API_URL", None)
    extra = "serving.torch_threads=1" if name == "half" else ""
    cmd = [*prefix, "make", "run", *([f"RUN_SET=--set {extra}"] if extra else [])]
    log = work / "make-run.log"
    with open(log, "wb") as f:
        proc = subprocess.run(cmd, cwd=dest, env=env, stdout=f, stderr=subprocess.STDOUT)
    wall = time.monotonic() - t_setup
    # The server `make run` started keeps running by design; stop it so the next row has the port.
    subprocess.run([str(dest / ".venv/bin/llmcycle"), "serve", "--stop"], cwd=dest, env=env, capture_output=True)
    out = {"row": name, "exit": proc.returncode, "wall_s": wall, "clone_s": t_setup - t0, "log": str(log),
           **read_store(dest), **read_log(log.read_text(errors="replace"))}
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=dest, capture_output=True,
                           text=True).stdout.strip()
    out["tracked_files_changed"] = dirty or "none"
    if not keep and proc.returncode == 0:
        shutil.rmtree(dest, ignore_errors=True)
    return out


def read_log(text: str) -> dict:
    verdict = next((line.strip() for line in text.splitlines() if line.strip().startswith("loop ")), "no verdict")
    m = re.search(r"lifecycle: (\d+) s", text)
    return {"verdict": verdict, "lifecycle_wall_s": float(m.group(1)) if m else None}


def read_store(dest: Path) -> dict:
    """The figures from the clone's own MLflow store (its python, so its mlflow)."""
    code = r'''
import json, mlflow
from mlflow import MlflowClient
mlflow.set_tracking_uri("sqlite:///mlflow/mlflow.db")
c = MlflowClient()
exp = c.get_experiment_by_name("llmcycle")
runs = c.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"], max_results=500)
by = lambda n: [r for r in runs if r.info.run_name == n]
out = {}
sc = by("scoping")[-1] if by("scoping") else None
if sc:
    m = sc.data.metrics
    out.update(matmul_gflops=m.get("matmul_gflops"), n_params=m.get("n_params"), steps=m.get("pretrain_steps"),
               probe_tokens_per_sec=m.get("probe_tokens_per_sec"), assumed_tokens_per_sec=m.get("assumed_tokens_per_sec"),
               planned_pretrain_s=m.get("planned_pretrain_seconds"),
               shape="x".join(sc.data.params.get(f"chosen.{k}", "?") for k in ("n_layer", "n_embd", "n_head")))
life = by("lifecycle")
if life:
    r = life[0]
    out["lifecycle_s"] = ((r.info.end_time or 0) - r.info.start_time) / 1000
dep = by("deploy")
if dep:
    t = dep[0].data.tags; m = dep[0].data.metrics
    out["first_gate"] = t.get("gate_decision") or t.get("decision")
ev = by("evaluate")
if ev:
    m = ev[0].data.metrics
    out.update(sft_bpb=m.get("sft_bits_per_byte"), kn3_bpb=m.get("baseline_kn3_sft_bits_per_byte"),
               syntax_valid=m.get("syntax_valid_rate"), defines_name=m.get("defines_name_rate"))
mv = None
try:
    mv = c.get_model_version("llmcycle", "1")
except Exception:
    pass
if mv:
    t = mv.tags
    out.update(margin=t.get("gate.criteria.beats_kn3.delta"), margin_low=t.get("gate.criteria.beats_kn3.low"),
               margin_high=t.get("gate.criteria.beats_kn3.high"), v1_decision=t.get("gate_decision"))
out["monitors"] = [(r.data.tags.get("decision"), r.data.metrics.get("drift_share")) for r in by("monitor")]
rt = by("retrain")
if rt:
    t = rt[-1].data.tags; m = rt[-1].data.metrics
    out.update(retrain=t.get("retrain_status"), retrain_reason=(t.get("retrain_reason") or "")[:300],
               retrain_version=t.get("challenger_version"),
               drifted_before=m.get("champion_drifted_bits_per_byte"), drifted_after=m.get("challenger_drifted_bits_per_byte"),
               original_before=m.get("champion_original_sft_bits_per_byte"),
               original_after=m.get("challenger_original_sft_bits_per_byte"),
               retrain_s=((rt[-1].info.end_time or 0) - rt[-1].info.start_time) / 1000)
try:
    out["champion"] = c.get_model_version_by_alias("llmcycle", "champion").version
except Exception:
    out["champion"] = None
print(json.dumps(out))
'''
    proc = subprocess.run([str(dest / ".venv/bin/python"), "-c", code], cwd=dest, capture_output=True, text=True,
                          env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return {"store_error": proc.stderr[-500:]}


def fmt(r: dict) -> list[tuple[str, str]]:
    f = lambda v, spec=".3f": "n/a" if v is None else format(float(v), spec)  # noqa: E731
    return [
        ("matmul peak", f"{f(r.get('matmul_gflops'), '.0f')} GFLOP/s"),
        ("plan", f"{r.get('shape')} ({f(r.get('n_params'), ',.0f')} params), {f(r.get('steps'), '.0f')} steps; "
                 f"probe {f(r.get('probe_tokens_per_sec'), ',.0f')} tok/s vs assumed "
                 f"{f(r.get('assumed_tokens_per_sec'), ',.0f')}, planned {f(r.get('planned_pretrain_s'), '.0f')} s"),
        ("champion v1 vs KN3", f"SFT bits/byte {f(r.get('sft_bpb'))} vs {f(r.get('kn3_bpb'))}: "
                               f"{f(r.get('margin'), '+.3f')} [{f(r.get('margin_low'), '+.3f')}, "
                               f"{f(r.get('margin_high'), '+.3f')}] ({r.get('v1_decision')})"),
        ("syntax-valid / defines-name", f"{f(r.get('syntax_valid'), '.2f')} / {f(r.get('defines_name'), '.2f')}"),
        ("drift decisions", "; ".join(f"{d} ({f(s, '.2f')})" for d, s in r.get("monitors") or []) or "none"),
        ("retrain", f"{r.get('retrain')} v{r.get('retrain_version')}: drifted {f(r.get('drifted_before'))} -> "
                    f"{f(r.get('drifted_after'))}, original SFT {f(r.get('original_before'))} -> "
                    f"{f(r.get('original_after'))}"),
        ("retrain reason", str(r.get("retrain_reason"))),
        ("verdict", f"{r.get('verdict')} (exit {r.get('exit')})"),
        ("wall", f"make run {f(r.get('wall_s'), '.0f')} s, lifecycle {f(r.get('lifecycle_s'), '.0f')} s, "
                 f"retrain {f(r.get('retrain_s'), '.0f')} s"),
        ("tracked files changed", str(r.get("tracked_files_changed"))),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", nargs="+", default=["full", "half"], choices=sorted(ROWS))
    ap.add_argument("--venv-from", type=Path, default=None, help="copy this venv instead of `make setup`'s install")
    ap.add_argument("--keep", action="store_true", help="keep each clone (its MLflow store, log, data)")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = ap.parse_args()
    results = []
    for name in args.rows:
        prefix, env = ROWS[name]
        print(f"== {name}: fresh clone, make run ...", flush=True)
        r = run_row(name, prefix, env, args.venv_from.resolve() if args.venv_from else None, args.keep)
        results.append(r)
        for what, value in fmt(r):
            print(f"  {what:28s} {value}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    sys.exit(0 if all(r["exit"] == 0 for r in results) else 1)


if __name__ == "__main__":
    main()
