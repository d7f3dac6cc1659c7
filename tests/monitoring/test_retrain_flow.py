"""The retrain flow for real on a tiny project: lifecycle -> champion; a monitor run with a drifted window
and feedback -> retrain: new dvc.lock hash, challenger fine-tuned from the champion, gated by the deploy
gate, every run linked to the monitor run; the same feedback again is not_enough_data."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from components import config as cfg
from components import tracking
from tests.flows.conftest import init_project

pytestmark = pytest.mark.usefixtures("prefect_harness")   # the session's one Prefect server

GITIGNORE = "data/\nmlflow/\ncheckpoints/\n.prefect/\ndvc-remote/\n"


def _ask(i: int) -> str:
    return f"Write a test for parse_items_{i}(data) that checks empty input."


def _window(n: int = 40, start: int = 0) -> list[dict]:
    """Drifted requests: tests of functions instead of functions, with the model's (poor) completions."""
    # Logged as the server logs a chat request: the rendered template the model read.
    return [{"id": f"cmpl-{i}", "index": 0, "prompt": f"<|user|>\n{_ask(i)}<|end|>\n<|assistant|>\n",
             "completion": f"def test_parse_items_{i}(:\n    pass", "prompt_tokens": 12, "completion_tokens": 9,
             "latency_s": 0.1, "mean_logprob": -2.5, "version": "1", "key_id": "k", "finish_reason": "stop",
             "ts": f"2026-11-30T00:{i // 60:02d}:{i % 60:02d}Z"} for i in range(start, start + n)]


def _feedback(window: list[dict]) -> list[str]:
    lines = []
    for rec in window:
        i = int(rec["id"].removeprefix("cmpl-"))
        fixed = f"def test_parse_items_{i}():\n    assert parse_items_{i}([]) == []\n"
        if i % 4 == 0:
            lines.append({"kind": "rating", "completion_id": rec["id"], "rating": "up"})
        elif i % 4 == 1:
            lines.append({"kind": "rating", "completion_id": rec["id"], "rating": "down", "corrected": fixed})
        elif i % 4 == 2:
            lines.append({"kind": "preference", "prompt": _ask(i), "chosen": fixed, "rejected": rec["completion"]})
    out = [json.dumps(r) for r in lines]
    return out + ['{"kind": "rating", "completion_id"', json.dumps({"kind": "rating", "completion_id": "nope",
                                                                     "rating": "up"})]


def _monitor_run(settings, window: list[dict], tmp: Path) -> str:
    """A monitor run as flows/monitor.py logs it: drift_detected=1, the window as window/requests.jsonl."""
    import mlflow

    path = tmp / "requests.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in window))
    with tracking.stage_run(settings, "monitor", tags={"window_start": window[0]["ts"], "window_end": window[-1]["ts"],
                                                       "window_n": str(len(window))}) as run:
        mlflow.log_metrics({"drift_detected": 1.0, "drift_share": 0.8})
        mlflow.log_artifact(str(path), "window")
    return run.info.run_id


@pytest.mark.slow
def test_retrain_on_drift_is_promoted_and_one_that_learns_nothing_is_rejected(tiny_root: Path, tmp_path_factory):
    """Two retrains whose outcome is known. 1: the drifted domain (tests of functions, one template) learned
    from its feedback for 40 steps: the held-out drifted slice's bits/byte drop significantly, so the gate
    promotes and the champion alias moves. 2: a new drifted window at a learning rate of ~0 (the challenger is
    the champion): no significant gain on the primary, so the gate rejects and the champion stays."""
    import mlflow

    from flows.lifecycle import lifecycle
    from flows.retrain import retrain_flow

    (tiny_root / ".gitignore").write_text(GITIGNORE)
    init_project(tiny_root)
    subprocess.run(["git", "add", "-A"], cwd=tiny_root, check=True)
    subprocess.run(["git", "commit", "-qm", "project"], cwd=tiny_root, check=True)
    config = str(tiny_root / "params.yaml")
    overrides = ["pretrain.max_steps=4", "data.remote=dvc-remote", "retrain.min_new_documents=5",
                 "retrain.sft_max_steps=40", "retrain.lr_scale=1", "retrain.align_max_steps=2"]
    first = lifecycle(config, overrides)
    assert first["deploy"]["decision"] == "promote"
    settings = cfg.load(config, overrides)
    champion = first["deploy"]["version"]
    hash_before, lock_before = tracking.data_hash(tiny_root), tracking.dvc_lock_hashes(tiny_root)

    window = _window()
    monitor_id = _monitor_run(settings, window, tmp_path_factory.mktemp("window"))
    fb = tiny_root / "data" / "feedback" / "feedback-2026-11-30.jsonl"
    fb.parent.mkdir(parents=True, exist_ok=True)
    fb.write_text("\n".join(_feedback(window)) + "\n")

    out = retrain_flow(config, overrides)          # no id: the newest monitor run that detected drift
    assert out["status"] == "promoted", out["reason"]
    assert out["reason"].startswith("sft_drifted_bits_per_byte improved")
    assert out["monitor_run_id"] == monitor_id and out["version"] != champion
    assert out["figures"]["challenger_drifted_bits_per_byte"] < out["figures"]["champion_drifted_bits_per_byte"]

    client = mlflow.MlflowClient()
    run = client.get_run(out["retrain_run_id"])
    assert run.info.run_name == "retrain" and run.data.tags["monitor_run_id"] == monitor_id
    assert run.data.tags["retrain_status"] == out["status"] and run.info.status == "FINISHED"
    note = run.data.tags["mlflow.note.content"]       # the UI description links monitor run and versions
    assert f"/runs/{monitor_id})" in note and f"#/models/llmcycle/versions/{out['version']})" in note
    children = {r.info.run_name for r in tracking.child_runs(settings, out["retrain_run_id"])}
    assert {"data", "sft", "dpo", "evaluate", "deploy"} <= children
    for key in ("champion_drifted_bits_per_byte", "challenger_drifted_bits_per_byte",
                "champion_original_sft_bits_per_byte", "challenger_original_sft_bits_per_byte",
                "champion_test_bits_per_byte", "challenger_test_bits_per_byte"):
        assert key in run.data.metrics, key
    assert run.data.metrics["feedback_dropped"] == 2.0
    dropped = (tiny_root / "data" / "retrain" / "dropped.jsonl").read_text()
    assert f"{fb}:31" in dropped and "unknown completion id 'nope'" in dropped

    # A new data version, and a challenger fine-tuned from the champion it was gated against.
    # The working tree's dvc.lock is back as it was (no tracked file changed); the new version's dvc.lock is
    # the retrain run's artifact and its hash the challenger's data_hash tag.
    assert tracking.data_hash(tiny_root) == hash_before and tracking.dvc_lock_hashes(tiny_root) == lock_before
    import mlflow
    kept = Path(mlflow.artifacts.download_artifacts(run_id=out["retrain_run_id"], artifact_path="retrain/dvc.lock"))
    assert tracking.data_hash(kept.parent) != hash_before
    assert client.get_model_version(settings.registry.model_name, out["version"]).tags["data_hash"] == \
        tracking.data_hash(kept.parent)
    lock_after = tracking.dvc_lock_hashes(kept.parent)
    assert lock_after["data/processed/sft"] != lock_before["data/processed/sft"]
    # Same corpus, same tokenizer: the champion's token ids still mean what they meant.
    for path in ("data/raw", "data/processed/tokenizer", "data/processed/tokens"):
        assert lock_after[path] == lock_before[path], path
    mv = client.get_model_version(settings.registry.model_name, out["version"])
    assert mv.tags["parent_version"] == str(champion)
    assert mv.tags["gate_decision"] == "promote" and float(mv.tags["gate.sft_drifted_bits_per_byte.high"]) < 0
    aliases = client.get_registered_model(settings.registry.model_name).aliases
    assert str(aliases["champion"]) == str(out["version"])

    # The same window and feedback again: nothing new to learn from.
    again = retrain_flow(config, overrides, monitor_run_id=monitor_id)
    assert again["status"] == "not_enough_data" and "min_new_documents is 5" in again["reason"]

    # 2: new drifted prompts, a challenger that cannot learn (lr ~0): rejected on the primary, champion kept.
    window2 = _window(start=100)
    monitor2 = _monitor_run(settings, window2, tmp_path_factory.mktemp("window2"))
    fb.with_name("feedback-2026-12-01.jsonl").write_text("\n".join(_feedback(window2)[:-2]) + "\n")
    frozen = retrain_flow(config, [*overrides, "retrain.lr_scale=1e-9"], monitor_run_id=monitor2)
    assert frozen["status"] == "rejected" and frozen["monitor_run_id"] == monitor2
    # Its reason is the primary's, and no guard fired: the challenger is the champion to ~1e-9.
    assert frozen["reason"].startswith("primary sft_drifted_bits_per_byte "), frozen["reason"]
    tags = client.get_model_version(settings.registry.model_name, frozen["version"]).tags
    assert tags["gate_decision"] == "reject"
    assert float(tags["gate.sft_drifted_bits_per_byte.low"]) <= 0 <= float(tags["gate.sft_drifted_bits_per_byte.high"])
    assert str(client.get_registered_model(settings.registry.model_name).aliases["champion"]) == str(out["version"])
    # Prefect's run list says what each retrain did: the newest drift, then the named monitor run.
    names = _prefect_run_names("retrain")
    assert "retrain on the newest drift" in names and f"retrain on drift of monitor run {monitor2[:8]}" in names
    # ... and its Artifacts tab holds each decision under one key, newest last.
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as c:
        arts = c.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["llmcycle-retrain"])))
    arts = sorted(arts, key=lambda a: a.created)
    assert [a.description for a in arts][-3:] == ["retrain promoted", "retrain not_enough_data", "retrain rejected"]
    assert f"| challenger | {frozen['version']} |" in arts[-1].data and "| status | rejected |" in arts[-1].data


def _prefect_run_names(flow_name: str) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    with get_client(sync_client=True) as c:
        return [r.name for r in c.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])))]


def _llmcycle(root: Path, *args: str) -> subprocess.CompletedProcess:
    """The real command in its own process, on the session's Prefect test server (as tests/e2e do)."""
    import prefect.settings

    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI" and not k.startswith("LLMCYCLE_")}
    env["PREFECT_API_URL"] = prefect.settings.PREFECT_API_URL.value()
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=root, env=env, capture_output=True,
                          text=True, timeout=300)


def test_cli_exit_codes(tiny_root: Path):
    config = str(tiny_root / "params.yaml")
    r = _llmcycle(tiny_root, "retrain", "--config", config, "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["status"] == "not_enough_data" and "no monitor run with drift_detected=1" in out["reason"]
    r = _llmcycle(tiny_root, "retrain", "--config", config, "--monitor-run", "0" * 32)
    assert r.returncode == 2 and f"--monitor-run {'0' * 32}: no such run" in r.stderr, r.stderr[-2000:]
    r = _llmcycle(tiny_root, "retrain", "--config", config, "--set", "retrain.holdout_share=1.5")
    assert r.returncode == 2 and "retrain.holdout_share" in r.stderr

    # A drift to answer but no data yet (no lifecycle ran): exit 2 naming what to run, the run tagged failed.
    import mlflow

    settings = cfg.load(config)
    monitor_id = _monitor_run(settings, _window(3), tiny_root)
    r = _llmcycle(tiny_root, "retrain", "--config", config)
    assert r.returncode == 2 and "run the lifecycle (`llmcycle run`) first" in r.stderr, r.stderr[-2000:]
    (failed,) = mlflow.search_runs(experiment_names=[tracking.EXPERIMENT], output_format="list",
                                   filter_string=f"tags.stage = 'retrain' and tags.monitor_run_id = '{monitor_id}'")
    assert failed.data.tags["retrain_status"] == "failed" and failed.info.status == "FAILED"
    assert "ConfigError" in failed.data.tags["retrain_reason"]
