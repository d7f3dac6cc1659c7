"""The monitor flow end to end on a tiny registered champion: request logs written by the server's own
RequestLog writer in its record format, a reference built once and cached, insufficient / no drift /
drift decisions, the MLflow `monitor` run (metrics, tags, report, window artifact), the drift event on
the harness's Prefect server, the webhook POST to a real loopback receiver, and `llmcycle monitor`."""
from __future__ import annotations

import json
import os
import shutil
import time

import pytest

from components import config as cfg
from components import tracking
from components.data import layout
from components.monitoring import alerts
from tests.conftest import restart_events_worker
from tests.monitoring.test_alerts import receiver

# The session's one Prefect harness (requested by name: importing the fixture would start a second server).
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]

WINDOW = 30
MONITORING = {"window": WINDOW, "min_window": 20, "reference_splits": ["train"], "reference_size": 100,
              "reference_max_tokens": 12}


@pytest.fixture(scope="module")
def project(tmp_path_factory, prefect_harness):
    """v1 champion of a tiny project with SFT splits, and a webhook receiver named in params. The events
    worker is restarted on the harness: the drift event must reach the server this module queries."""
    restart_events_worker()
    from tests.serving.server_helpers import URI_VARS, build_registry
    from tests.unit.evaluation.test_evaluate import write_finetune_sets

    with receiver() as (url, received):
        root = tmp_path_factory.mktemp("monitor")
        settings = build_registry(root, {"monitoring": {**MONITORING, "webhook_url": url}})
        write_finetune_sets(settings)
        yield settings, received
    for key in URI_VARS:
        os.environ.pop(key, None)


@pytest.fixture(scope="module")
def champion(project):
    from components.model.build import load_causal_lm

    settings, _ = project
    return load_causal_lm(settings, f"models:/{settings.registry.model_name}/1")


def write_log(settings, champion, prompts: list[str], seed: int) -> list[dict]:
    """Requests answered by the champion, logged by the server's RequestLog in the record format app.py writes."""
    from components.data.tokenizer import format_prompt
    from components.model.generation import generate
    from components.serving.request_log import RequestLog

    model, tok = champion
    folder = settings.path(settings.serving.log_dir)
    shutil.rmtree(folder, ignore_errors=True)
    texts = [format_prompt(tok, p) for p in prompts]
    completions = generate(model, tok, texts, max_new_tokens=12, temperature=0.0)     # as the reference
    log = RequestLog(folder, max_bytes=4000)          # small files: the window spans rotated ones
    for i, (text, comp) in enumerate(zip(texts, completions)):
        log.log({"id": f"chatcmpl-{seed}-{i}", "index": 0, "endpoint": "/v1/chat/completions",
                 "model": "llmcycle@champion", "version": "1", "key_id": "k-test", "prompt": text,
                 "completion": comp, "prompt_tokens": len(tok.encode(text)), "completion_tokens": len(tok.encode(comp)),
                 "latency_s": 0.05, "ttft_s": 0.01, "mean_logprob": None, "finish_reason": "length",
                 "temperature": 0.0, "stream": False})
        time.sleep(0.002)                                # distinct millisecond stamps keep the order exact
    log.flush()
    log.close()
    from components.monitoring.window import log_files           # rotation order (tested in test_drift)
    return [json.loads(line) for p in log_files(folder) for line in p.read_text().splitlines()]


def heldout_prompts(settings) -> list[str]:
    """Train-split prompts the reference sample left out: the same distribution, other prompts. (The tiny
    corpus's test split is not: its function names carry other module numbers, which the classifier sees.)"""
    from components.monitoring.reference import reference_prompts
    from components.training.finetune_data import sft_rows

    ref = set(reference_prompts(settings))
    return [r["prompt"] for r in sft_rows(settings, "train") if r["prompt"] not in ref]


def drifted_prompts(n: int) -> list[str]:
    """Production starts asking for tests: another task, other words, longer prompts, non-ASCII text."""
    return [f"Write a unittest.TestCase class TestCase{i} whose test_{i}_raises method checks with "
            f"self.assertRaises(KeyError) that a mocked os.environ lookup number {i} fails, plus setUp/tearDown "
            f"(données réelles, ✓ {i})"
            for i in range(n)]


def _events(name: str) -> list[dict]:
    import httpx
    from prefect.settings import PREFECT_API_URL

    body = {"filter": {"event": {"name": [name]}}, "limit": 50}
    for _ in range(50):                          # the events worker sends in the background
        resp = httpx.post(f"{PREFECT_API_URL.value()}/events/filter", json=body, timeout=10)
        resp.raise_for_status()
        events = resp.json()["events"]
        if events:
            return events
        time.sleep(0.2)
    return []


def test_monitor_flow_decisions_runs_and_alerts(project, champion):
    import mlflow

    from flows.monitor import monitor_flow

    settings, received = project
    config = str(settings.root / "params.yaml")

    # Too few requests: insufficient_data, no reference built, no alert.
    write_log(settings, champion, heldout_prompts(settings)[:5], seed=1)
    small = monitor_flow(config, [])
    assert small["decision"] == "insufficient_data" and small["event_id"] is None and small["drift_share"] is None
    assert small["n_current"] == 5 and small["window"]["n"] == 5
    assert not list(settings.path("data", "monitoring").rglob("*.jsonl"))

    # Held-out prompts of the same kind as the reference: no drift (the reference is built now).
    same = write_log(settings, champion, heldout_prompts(settings), seed=2)
    assert len(same) == 36
    quiet = monitor_flow(config, [], window=len(same))
    assert quiet["decision"] == "no_drift", quiet
    assert quiet["event_id"] is None and "prompt" not in quiet["drifted_columns"]
    cached = list(settings.path("data", "monitoring", "reference").glob("llmcycle-v1-*.jsonl"))
    assert len(cached) == 1

    # Drifted traffic (rotated over several files): drift, event, webhook, everything on the run.
    records = write_log(settings, champion, drifted_prompts(40), seed=3)
    assert len(list(settings.path(settings.serving.log_dir).glob("requests-*.jsonl"))) > 1
    result = monitor_flow(config, [])
    assert result["decision"] == "drift" and result["drift_share"] >= 0.5
    assert {"prompt", "prompt_chars", "prompt_byte_fallback_share"} <= set(result["drifted_columns"])
    assert result["model_version"] == "1" and result["n_current"] == WINDOW
    assert result["window"] == {"start": records[-WINDOW]["ts"], "end": records[-1]["ts"], "n": WINDOW}
    assert result["event_id"]

    run = mlflow.MlflowClient().get_run(result["monitor_run_id"])
    assert run.info.run_name == "monitor" and run.data.tags["stage"] == "monitor"
    assert run.data.metrics["drift_detected"] == 1.0 and run.data.metrics["drift_share"] == result["drift_share"]
    assert run.data.metrics["drifted_prompt"] == 1.0 and 0.5 < run.data.metrics["score_prompt"] <= 1.0
    tags = run.data.tags
    assert tags["decision"] == "drift" and tags["model_version"] == "1" and tags["window_n"] == str(WINDOW)
    assert (tags["window_start"], tags["window_end"]) == (records[-WINDOW]["ts"], records[-1]["ts"])
    assert tags["reference_built"] == "false" and tags["alert_event_id"] == result["event_id"]
    assert tags["alert_webhook"] == "sent (HTTP 200)" and "Monitor: drift" in tags["mlflow.note.content"]
    names = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "drift")}
    assert names == {"drift/report.html", "drift/decision.json"}
    window_file = tracking.download_window(settings, result["monitor_run_id"])
    assert [json.loads(line) for line in window_file.read_text().splitlines()] == records[-WINDOW:]
    assert mlflow.MlflowClient().get_run(quiet["monitor_run_id"]).data.metrics["drift_detected"] == 0.0

    # The webhook got one JSON alert, the same payload as the event.
    assert len(received) == 1
    body = received[0]
    expected = alerts.payload(result["window"], result["drift_share"], result["drifted_columns"],
                              result["monitor_run_id"], "1")
    assert body == {"event": alerts.EVENT, **json.loads(json.dumps(expected))}

    # The event reached the Prefect server, about model version 1.
    events = [e for e in _events(alerts.EVENT) if e["id"] == result["event_id"]]
    assert events, "the drift event never reached the Prefect API"
    assert events[0]["resource"]["prefect.resource.id"] == "llmcycle.model.llmcycle.1"
    assert events[0]["payload"]["monitor_run_id"] == result["monitor_run_id"]


def test_cli_monitor_exit_codes(project, champion, restored_environ):
    from typer.testing import CliRunner

    from flows.cli import app

    settings, _ = project
    config = str(settings.root / "params.yaml")
    write_log(settings, champion, heldout_prompts(settings)[:8], seed=4)
    runner = CliRunner()
    ok = runner.invoke(app, ["monitor", "--config", config, "--json"])
    assert ok.exit_code == 0, ok.output
    out = json.loads(ok.stdout.strip().splitlines()[-1])
    assert out["decision"] == "insufficient_data" and out["monitor_run_id"]

    log_file = sorted(settings.path(settings.serving.log_dir).glob("requests-*.jsonl"))[-1]
    with open(log_file, "a") as f:
        f.write('{"prompt": "half a rec\n')
    bad = runner.invoke(app, ["monitor", "--config", config])
    assert bad.exit_code == 1 and f"{log_file.name}:" in bad.stderr and "not valid JSON" in bad.stderr

    usage = runner.invoke(app, ["monitor", "--config", config, "--set", "monitoring.min_window=500"])
    assert usage.exit_code == 2 and "min_window" in usage.stderr
    shutil.rmtree(settings.path(settings.serving.log_dir))
    missing = runner.invoke(app, ["monitor", "--config", config])
    assert missing.exit_code == 1 and "no request log at" in missing.stderr
    assert layout.tokens_dir(settings).is_dir()
