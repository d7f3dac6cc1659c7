"""The traffic simulator: prompt profiles, and real requests + feedback against a real uvicorn server."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from components import config as cfg
from components.data import layout
from components.errors import ConfigError, DataError
from components.monitoring.prompts import profile_prompts, stdlib_prompts, stdlib_test_prompts
from components.monitoring.traffic import TrafficError, run_traffic
from tests.conftest import write_params
from tests.serving.server_helpers import KEY, build_registry, free_port, make_app, running_server


@pytest.fixture
def settings(tmp_path) -> cfg.Settings:
    write_params(tmp_path)
    return cfg.load(tmp_path / "params.yaml")


def test_stdlib_and_tests_profiles_draw_distinct_prompts_in_the_sft_form(settings):
    val = layout.sft_dir(settings) / "val.jsonl"
    val.parent.mkdir(parents=True)
    val.write_text(json.dumps({"id": "v1", "name": "clamp", "prompt": "Write a Python function `clamp(x, lo, hi)` "
                               "that limit x to [lo, hi].", "response": "def clamp(x, lo, hi):\n    return x"}) + "\n")
    stdlib, tests = stdlib_prompts(settings, 40, seed=1), stdlib_test_prompts(40, seed=1)
    for drawn in (stdlib, tests):
        assert len({p.prompt for p in drawn}) == 40                        # without replacement
        assert all(p.prompt.startswith("Write a Python function `") and p.name for p in drawn)
    assert not {p.prompt for p in stdlib} & {p.prompt for p in tests}
    assert stdlib[0].name == "clamp" and stdlib[0].reference.startswith("def clamp")   # held-out SFT pairs first
    assert all("test" not in p.id.split(":", 1)[1].split("/")[:-1] for p in stdlib[1:])
    assert all(p.id.startswith("stdlib-test:") for p in tests)
    assert [p.prompt for p in stdlib_test_prompts(40, seed=1)] == [p.prompt for p in tests]   # seeded
    assert [p.prompt for p in stdlib_test_prompts(40, seed=2)] != [p.prompt for p in tests]


def test_jsonl_profile_and_its_errors(settings, tmp_path):
    good = tmp_path / "prompts.jsonl"
    good.write_text('{"prompt": "a"}\n\n{"prompt": "b", "name": "f", "reference": "def f(): pass"}\n{"prompt": "a"}\n')
    drawn = profile_prompts(settings, f"jsonl:{good}", 2)
    assert sorted(p.prompt for p in drawn) == ["a", "b"]
    with pytest.raises(ConfigError, match="only 2 distinct prompts"):
        profile_prompts(settings, "jsonl:prompts.jsonl", 3)                  # relative to the project root
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{"text": "no prompt"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: missing or empty string field 'prompt'"):
        profile_prompts(settings, f"jsonl:{bad}", 1)
    bad.write_text('{"prompt": "a"}\n{not json\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not valid JSON"):
        profile_prompts(settings, f"jsonl:{bad}", 1)
    with pytest.raises(ConfigError, match="file does not exist"):
        profile_prompts(settings, "jsonl:missing.jsonl", 1)
    for profile in ("stdlb", "jsonl:", "jsonl"):
        with pytest.raises(ConfigError, match="--profile: expected one of stdlib, tests"):
            profile_prompts(settings, profile, 1)


def _records(folder) -> list[dict]:
    return [json.loads(line) for path in sorted(folder.glob("*.jsonl")) for line in path.read_text().splitlines()
            if line.strip()]


def test_traffic_and_feedback_reach_a_real_server(tmp_path):
    settings = build_registry(tmp_path)
    with running_server(make_app(settings)) as base:
        with pytest.raises(TrafficError, match=r"refused the API key \(401\)"):
            run_traffic(settings, base, "stdlib", 2, key="sk-wrong", max_tokens=4)
        with pytest.raises(TrafficError, match="cannot reach the server"):
            run_traffic(settings, f"http://127.0.0.1:{free_port()}", "stdlib", 2, key=KEY)
        with pytest.raises(TrafficError, match="--url: expected a base URL"):
            run_traffic(settings, "localhost:8000", "stdlib", 2, key=KEY)
        same = run_traffic(settings, base + "/v1", "stdlib", 6, key=KEY, feedback=True, concurrency=3, max_tokens=8)
        assert (same.sent, same.ok, dict(same.errors), dict(same.versions)) == (6, 6, {}, {"1": 6})
        assert same.completion_tokens > 0 and same.prompt_tokens > 0
        assert same.feedback["preference"] >= 1 and same.feedback["up"] + same.feedback["down"] + \
            same.feedback["corrected"] >= 1 and not same.feedback["failed"]
        # The real command, in its own process: the drifted profile, summary as JSON.
        cmd = [sys.executable, "-c", "from flows.cli import app; app()", "traffic", "--config",
               str(tmp_path / "params.yaml"), "--url", base, "--profile", "tests", "--n", "4", "--key", KEY,
               "--max-tokens", "8", "--json"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        drift = json.loads(done.stdout.strip().splitlines()[-1])
        assert (drift["sent"], drift["ok"], drift["profile"]) == (4, 4, "tests")
        refused = subprocess.run(cmd[:-5] + ["--key", "sk-wrong"], capture_output=True, text=True, timeout=300)
        assert refused.returncode == 1 and "refused the API key (401)" in refused.stderr
    # Past the key's rate limit: without retries the 429s are counted, not fatal.
    limited = settings.model_copy(update={"serving": settings.serving.model_copy(update={
        "rate_limit": settings.serving.rate_limit.model_copy(update={"requests_per_minute": 2})})})
    with running_server(make_app(limited)) as base:
        capped = run_traffic(limited, base, "tests", 3, key=KEY, concurrency=1, max_tokens=4, max_retries=0, seed=5)
        assert (capped.sent, capped.ok, dict(capped.errors), capped.retries) == (3, 2, {429: 1}, 0)
    requests = _records(tmp_path / "data" / "inference")
    assert len(requests) == 12 and all(r["version"] == "1" for r in requests)
    sent = {p.prompt for p in stdlib_prompts(settings, 6)} | {p.prompt for p in stdlib_test_prompts(4)}
    assert sum(any(s in r["prompt"] for s in sent) for r in requests[:10]) == 10    # the chat template wraps each prompt
    feedback = _records(tmp_path / "data" / "feedback")
    kinds = [f["kind"] for f in feedback]
    assert len(feedback) == sum(same.feedback.values()) and "preference" in kinds and "rating" in kinds
    ids = {r["id"] for r in requests}
    assert all(f["completion_id"] in ids and f["rating"] in ("up", "down") for f in feedback if f["kind"] == "rating")
    corrected = [f for f in feedback if f.get("corrected")]
    assert len(corrected) == same.feedback["corrected"] and all(f["rating"] == "down" for f in corrected)
    assert all(f["chosen"].startswith("def ") for f in feedback if f["kind"] == "preference")
