"""Drift monitoring's power and false-alarm rate: the project's own drift check on the real champion.

What: how often drift.compare() (the Evidently report and decision `llmcycle monitor` uses) says `drift`
for windows of three pools against the champion's cached reference (reference.load_or_build):
  tests      functions of the stdlib `test/` tree (prompts profile `tests`): should drift;
  stdlib     held-out stdlib prompts (profile `stdlib`) that are NOT reference prompts: should not drift.
             With the default reference (every held-out SFT prompt of val+test) these are functions of
             held-out stdlib modules that are not SFT pairs: SFT keeps only pairs that fit the context, so
             they are longer functions (a shift of their own). `--stdlib-sft-only --set
             'monitoring.reference_splits=[val]'` judges the test split's SFT prompts against a val-only
             reference instead (built once, then cached);
  reference  the reference's own rows: the false-alarm floor.
How: each pool's prompts are answered once by the serving engine (the server's engine factory, chat
template, greedy, reference.max_tokens tokens; prompts the server would refuse as too long are dropped),
and described once as monitor.describe_window does (the completion's mean log-prob from the engine's
per-token log-probs, latency from the handle). Each trial draws a window without replacement from a pool
with np.random.default_rng(seed + trial) (Evidently reseeds numpy's global RNG) and runs compare().
Also `disjoint`: the pool cut into pool // window non-overlapping windows of one permutation.
Compromises: windows of one pool overlap when trials * window > pool size (said per row), so the trials
are not independent; latency includes queueing (all prompts are submitted at once), it is no drift
column. Nothing is written to MLflow; the reference cache under data/monitoring/ may be built.
Run: .venv/bin/python benchmarks/drift_bench.py [--trials 20] [--windows 50,100,200]
"""
from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from components.errors import ConfigError  # noqa: E402


def stdlib_pool(settings, n: int, ref_prompts: set[str], sft_only: bool, seed: int) -> tuple[list, int, int]:
    """Up to n profile-`stdlib` prompts not in the reference (a seeded random subset when there are more):
    (prompts, how many are held-out SFT prompts, how many are functions of held-out modules)."""
    from components.monitoring import prompts as P
    from components.training.finetune_data import sft_rows

    got = P.stdlib_prompts(settings, 10 ** 6, exact=False)     # every one the profile holds
    sft = {r["prompt"] for split in P.HELD_OUT for r in sft_rows(settings, split)}
    keep = [p for p in got if p.prompt not in ref_prompts and (p.prompt in sft or not sft_only)]
    if len(keep) > n:   # the profile yields its top-up file by file: a prefix would hold few modules
        keep = [keep[i] for i in np.sort(np.random.default_rng(seed).choice(len(keep), size=n, replace=False))]
    from_sft = sum(p.prompt in sft for p in keep)
    return keep, from_sft, len(keep) - from_sft


def files(prompts: list) -> int:
    """Distinct source files of the prompts (Prompt.id is "<source>:<file>::<function>")."""
    return len({p.id.split("::")[0] for p in prompts})


def answer(settings, model, tok, version: str, texts: list[str], max_tokens: int) -> tuple[list, list, list, int]:
    """Greedy completions from the serving engine: (kept prompts, completions, mean logprobs, latencies),
    and how many prompts were dropped because the server would refuse them (prompt + max_tokens > context)."""
    from components.data.tokenizer import format_prompt
    from components.serving.engine import SamplingParams
    from components.serving.model_store import default_engine_factory

    ctx = int(model.config.max_position_embeddings)
    limit = min(settings.serving.max_prompt_tokens, ctx - 1)
    jobs = []
    for t in texts:
        ids = tok.encode(format_prompt(tok, t), add_special_tokens=False)   # as the server's chat route
        if len(ids) <= limit and len(ids) + max_tokens <= ctx:
            jobs.append((t, ids))
    engine = default_engine_factory(model, tok, settings, version)
    engine.start()
    out: list[tuple] = []
    try:
        step = max(1, engine.max_queue)
        for k in range(0, len(jobs), step):
            handles = [(t, engine.submit(ids, SamplingParams(max_tokens=max_tokens))) for t, ids in jobs[k:k + step]]
            for t, h in handles:
                c = h.result()
                lps = [x for x in c.logprobs if x is not None]
                out.append((t, c.text, sum(lps) / len(lps) if lps else None, h.finished_at - h.submitted_at))
    finally:
        engine.stop()
    cols = list(zip(*out)) if out else [(), (), (), ()]
    return [list(c) for c in cols] + [len(texts) - len(jobs)]


def bench(ref_rows: list[dict], pool: list[dict], w: int, trials: int, seed: int, cfg) -> dict:
    from components.monitoring import drift

    def judge(rows: list[dict]):
        t0 = time.perf_counter()
        res = drift.compare(ref_rows, rows, cfg)
        return res, time.perf_counter() - t0

    hits, insufficient, secs, cols = 0, 0, [], collections.Counter()
    for trial in range(trials):
        idx = np.random.default_rng(seed + trial).choice(len(pool), size=w, replace=False)
        res, s = judge([pool[i] for i in idx])
        hits += res.decision == drift.DRIFT
        insufficient += res.decision == drift.INSUFFICIENT
        secs.append(s)
        cols.update(res.drifted_columns)
    perm = np.random.default_rng(seed).permutation(len(pool))
    disjoint = [judge([pool[i] for i in perm[k * w:(k + 1) * w]])[0] for k in range(len(pool) // w)]
    return {"hits": hits, "insufficient": insufficient, "median_s": statistics.median(secs), "cols": cols,
            "disjoint": (sum(r.decision == drift.DRIFT for r in disjoint), len(disjoint))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="params.yaml")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="settings override (as llmcycle)")
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--windows", default="50,100,200", help="comma-separated window sizes (distinct prompts)")
    ap.add_argument("--pool", type=int, default=400, help="prompts in the tests and stdlib pools (at most)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stdlib-sft-only", action="store_true", help="stdlib pool: only held-out SFT prompts (needs a "
                    "reference that leaves some out, e.g. --set 'monitoring.reference_splits=[val]')")
    args = ap.parse_args()
    windows = [int(x) for x in args.windows.split(",") if x.strip()]
    if args.trials < 1 or not windows or min(windows) < 1 or args.pool < 1:
        ap.error("--trials, --pool and every --windows size must be positive")

    os.chdir(ROOT)
    from flows.cli import load_settings
    try:
        settings = load_settings(args.config, args.set)
        from components.monitoring import monitor
        version = monitor.champion(settings)
    except ConfigError as exc:
        print(f"drift_bench: {exc}\nno champion to measure: run `make run` first", file=sys.stderr)
        return 2
    from components.model.build import load_causal_lm
    from components.monitoring import descriptors as D
    from components.monitoring import prompts as P
    from components.monitoring import reference

    m, name = settings.monitoring, settings.registry.model_name
    model, tok = load_causal_lm(settings, f"models:/{name}/{version}")
    model.eval()
    stats = D.TokenStats.for_tokenizer(settings, tok, m.rare_token_coverage)
    t0 = time.perf_counter()
    ref_rows, ref_path, built = reference.load_or_build(settings, name, version, model, tok, stats)
    ref_s = time.perf_counter() - t0
    mt = reference.max_tokens(settings)

    tests = P.profile_prompts(settings, "tests", args.pool)
    stdlib, from_sft, from_modules = stdlib_pool(settings, args.pool, {r[D.TEXT_COLUMN] for r in ref_rows},
                                                 args.stdlib_sft_only, args.seed)
    if len(stdlib) < min(windows):
        print(f"drift_bench: the stdlib pool holds {len(stdlib)} prompts, fewer than the smallest window",
              file=sys.stderr)
    pools, notes = {}, {}
    for pname, texts in (("tests", [p.prompt for p in tests]), ("stdlib", [p.prompt for p in stdlib])):
        t0 = time.perf_counter()
        kept, comps, lps, lats, dropped = answer(settings, model, tok, version, texts, mt)
        t1 = time.perf_counter()
        pools[pname] = D.describe(model, tok, stats, kept, comps, mean_logprobs=lps, latencies=lats,
                                  with_embeddings=m.embeddings)
        notes[pname] = (f"{len(texts)} drawn, {dropped} dropped (prompt + {mt} tokens over the context); "
                        f"generate {t1 - t0:.0f} s, describe {time.perf_counter() - t1:.0f} s")
    pools["reference"] = ref_rows
    from components.monitoring import drift
    drift.compare(ref_rows, ref_rows, m)     # warm-up: Evidently's and sklearn's imports stay out of the timings

    print(f"champion: {name} v{version}; torch threads {__import__('torch').get_num_threads()}; "
          f"load average (1 min) {os.getloadavg()[0]:.2f}")
    print(f"reference: {len(ref_rows)} rows, {ref_path.relative_to(ROOT)}, "
          f"{'built now' if built else 'cached (file read)'} in {ref_s:.1f} s; splits {m.reference_splits}, "
          f"size <= {m.reference_size}, temperature {m.reference_temperature}, {mt} tokens")
    print(f"monitoring: drift_share_threshold {m.drift_share_threshold}, drift_columns {m.drift_columns}, "
          f"text_threshold {m.text_threshold}, embeddings {m.embeddings}, min_window {m.min_window}")
    print(f"pool tests: {len(pools['tests'])} stdlib test/ function prompts from {files(tests)} files: the first "
          f"{args.pool} that `llmcycle traffic --profile tests` sends ({notes['tests']})")
    print(f"pool stdlib: {len(pools['stdlib'])} held-out stdlib prompts not in the reference: {from_sft} held-out "
          f"SFT prompts + {from_modules} functions of held-out stdlib modules that are not SFT pairs, "
          f"from {files(stdlib)} files ({notes['stdlib']})")
    print(f"pool reference: the reference's own {len(ref_rows)} rows (windows are subsets of the reference)")
    print(f"\n{'pool':<10} {'window':>6} {'drift':>7} {'disjoint':>8} {'median s':>8}  overlap  most drifted columns")
    for pname, rows in pools.items():
        for w in windows:
            if w > len(rows):
                print(f"{pname:<10} {w:>6}  skipped: window larger than the pool ({len(rows)})")
                continue
            r = bench(ref_rows, rows, w, args.trials, args.seed, m)
            cols = ", ".join(f"{c} {k}" for c, k in r["cols"].most_common(3)) or "-"
            ins = f"  ({r['insufficient']} insufficient_data)" if r["insufficient"] else ""
            print(f"{pname:<10} {w:>6} {r['hits']:>3}/{args.trials:<3} {r['disjoint'][0]:>3}/{r['disjoint'][1]:<4} "
                  f"{r['median_s']:>8.2f}  {'yes' if args.trials * w > len(rows) else 'no':<7}  {cols}{ins}")
    print(f"\ndrift = windows judged `drift` of --trials (rng seed {args.seed} + trial, drawn without replacement); "
          "disjoint = of the pool // window non-overlapping windows of one permutation; overlap = yes when "
          "trials * window > pool size (windows share prompts, trials are not independent); "
          "most drifted columns: how many trials each column drifted in")
    print(f"load average (1 min) at the end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
