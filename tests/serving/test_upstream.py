"""serving.engine=vllm end to end without vLLM: the project server in front, the builtin server started as
its upstream process from serving.upstream_command (two real servers on loopback), driven with `openai`.

vLLM itself needs a GPU and wheels too large to carry here; the upstream speaks the same OpenAI
completions protocol (streamed, with logprobs), which is what the proxy path depends on.
"""
from __future__ import annotations

import json
import sys
import time

import httpx
import pytest

from components import config as cfg
from tests.serving.server_helpers import (ADMIN, KEY, auth, build_registry, make_app,
                                          running_server)

pytestmark = [pytest.mark.slow]

# The upstream is the project's own server, started the way users start it; it must not proxy in turn,
# and it keeps its request log apart from the proxy's (the one monitoring reads).
UPSTREAM = ("{python} -m flows.cli serve --no-auth --port {port} --model {model_dir} "
            "--set serving.engine=builtin --set serving.log_dir=data/upstream-log")
LIMITS = {"requests_per_minute": 100000, "tokens_per_minute": 100000000}


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    return build_registry(tmp_path_factory.mktemp("upstreamproj"), {"serving": {
        "poll_interval_s": 0, "engine": "vllm", "upstream_command": UPSTREAM, "upstream_start_timeout_s": 240,
        "rate_limit": LIMITS}})


@pytest.fixture(scope="module")
def proxy(registry):
    app = make_app(cfg.load(registry.root / "params.yaml"))
    with running_server(app, timeout=240) as base:
        yield base, app


def upstream_pid(app) -> int:
    return app.state.store.current.engine.process.pid


def log_rows(app, root, version: str) -> list[dict]:
    app.state.request_log.flush()
    return [r for f in sorted((root / "data" / "inference").glob("requests-*.jsonl"))
            for r in map(json.loads, f.read_text().splitlines()) if r["version"] == version]


def test_openai_client_through_the_proxy_and_the_request_log(proxy, registry):
    import openai

    base, app = proxy
    engine = app.state.store.current.engine
    assert engine.process is not None and engine.process.poll() is None and engine.url != base
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0)
    out = client.completions.create(model="llmcycle", prompt="def add(a, b):", max_tokens=6, temperature=0)
    assert out.system_fingerprint == "llmcycle-v1" and out.usage.completion_tokens >= 1
    chat = client.chat.completions.create(model="llmcycle", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=5, temperature=0.8, top_p=0.9, seed=3, n=2)
    assert len(chat.choices) == 2 and chat.usage.completion_tokens >= 2
    chunks = list(client.chat.completions.create(model="llmcycle", messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=5, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    full = client.chat.completions.create(model="llmcycle", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=5, temperature=0)
    assert streamed == full.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens

    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{base}/v1", api_key="sk-wrong", max_retries=0).completions.create(
            model="llmcycle", prompt="x", max_tokens=2)
    assert httpx.post(f"{base}/v1/completions", json={"model": "llmcycle", "prompt": "x"}).status_code == 401

    rows = log_rows(app, registry.root, "1")
    first = next(r for r in rows if r["prompt"] == "def add(a, b):")
    assert first["completion"] == out.choices[0].text and first["key_id"] and KEY not in json.dumps(first)
    assert first["completion_tokens"] == out.usage.completion_tokens
    assert isinstance(first["mean_logprob"], float) and first["mean_logprob"] < 0
    assert all(r["mean_logprob"] is not None for r in rows)


def test_greedy_output_through_the_proxy_equals_the_builtin_server(proxy, registry):
    base, _ = proxy
    ref_settings = cfg.load(registry.root / "params.yaml", ["serving.engine=builtin",
                                                              "serving.log_dir=data/reference-log"])
    prompts = ["def add(a, b):", "import os\n", "class Stack:"]
    with running_server(make_app(ref_settings)) as ref:
        for prompt in prompts:
            body = {"model": "llmcycle", "prompt": prompt, "max_tokens": 12, "temperature": 0}
            got = httpx.post(f"{base}/v1/completions", json=body, headers=auth(), timeout=60).json()
            want = httpx.post(f"{ref}/v1/completions", json=body, headers=auth(), timeout=60).json()
            assert got["choices"][0]["text"] == want["choices"][0]["text"]
            assert got["usage"] == want["usage"]
        chat = {"model": "llmcycle", "messages": [{"role": "user", "content": "sort a list"}], "max_tokens": 12,
                "temperature": 0, "stop": ["\n\n"]}
        got = httpx.post(f"{base}/v1/chat/completions", json=chat, headers=auth(), timeout=60).json()
        want = httpx.post(f"{ref}/v1/chat/completions", json=chat, headers=auth(), timeout=60).json()
        assert got["choices"][0]["message"] == want["choices"][0]["message"]


def test_swap_starts_a_new_upstream_and_stops_the_old_one(proxy, registry):
    base, app = proxy
    old = app.state.store.current.engine.process
    r = httpx.post(f"{base}/admin/reload?wait=true", json={"model": "llmcycle@challenger"}, headers=auth(ADMIN),
                   timeout=300)
    assert r.status_code == 200 and r.json()["version"] == "2", r.text
    new = app.state.store.current.engine.process
    assert new.pid != old.pid and new.poll() is None
    deadline = time.monotonic() + 60        # the retirer stops the old upstream once nothing holds it
    while old.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert old.poll() is not None
    out = httpx.post(f"{base}/v1/completions", headers=auth(), timeout=60,
                     json={"model": "llmcycle", "prompt": "x = ", "max_tokens": 4})
    assert out.status_code == 200 and out.headers["x-model-version"] == "2"
    assert log_rows(app, registry.root, "2")[-1]["mean_logprob"] is not None
    metrics = httpx.get(f"{base}/metrics").text
    assert 'llmcycle_serving_version{name="llmcycle",version="2"} 1.0' in metrics


def test_a_failed_upstream_start_keeps_the_old_version(proxy, registry):
    base, app = proxy
    store = app.state.store
    before, settings = store.current, store.settings
    # An upstream command that exits at once (a module that does not exist): the load fails fast.
    store.settings = cfg.load(registry.root / "params.yaml",
                              [f"serving.upstream_command={sys.executable} -m no_such_module {{model_dir}} {{port}}"])
    try:
        r = httpx.post(f"{base}/admin/reload?wait=true", json={"model": "llmcycle@champion"},
                       headers=auth(ADMIN), timeout=120)
    finally:
        store.settings = settings
    assert r.status_code == 500 and "exited" in r.json()["error"], r.text
    assert store.current is before and before.engine.process.poll() is None
    assert "llmcycle_reload_failures_total 1.0" in httpx.get(f"{base}/metrics").text
    ok = httpx.post(f"{base}/v1/completions", headers=auth(), timeout=60,
                    json={"model": "llmcycle", "prompt": "x", "max_tokens": 2})
    assert ok.status_code == 200 and ok.headers["x-model-version"] == before.ref.version


def test_the_in_flight_bound_answers_queue_full(registry):
    from components.serving.engine import QueueFull, SamplingParams
    from components.serving.upstream import UpstreamEngine

    settings = cfg.load(registry.root / "params.yaml", ["serving.max_batch=1", "serving.max_queue=1"])
    engine = UpstreamEngine("http://127.0.0.1:9", settings)   # never contacted: nothing is iterated
    first, _ = engine.submit([], SamplingParams(), text="a"), engine.submit([], SamplingParams(), text="b")
    with pytest.raises(QueueFull):
        engine.submit([], SamplingParams(), text="c")
    first.cancel()                                             # a cancelled request gives its place back
    engine.submit([], SamplingParams(), text="d")
    assert engine.stats["requests_rejected"] == 1 and engine.stats["running"] == 2


def test_leaving_a_stream_early_cancels_it_and_frees_its_place(proxy):
    import asyncio
    import contextlib

    from components.serving.engine import SamplingParams

    engine = proxy[1].state.store.current.engine

    async def first_token_then_leave():
        h = engine.submit([], SamplingParams(max_tokens=100, temperature=1.0, seed=1), text="def f(")
        async with contextlib.aclosing(h.aevents()) as events:   # what merge() does when a client hangs up
            async for ev in events:
                assert ev.token_id is not None and ev.logprob is not None
                break
        return h
    handle = asyncio.run(first_token_then_leave())
    assert handle.finish_reason == "cancelled" and engine.stats["running"] == 0


def test_bad_upstream_settings_are_config_errors_naming_the_key(registry):
    from components.errors import ConfigError

    params = registry.root / "params.yaml"
    for override, words in [("serving.upstream_command=vllm serve {model} --port {port}", "{model}"),
                            ("serving.upstream_command=vllm serve {model_dir}", "{port}"),
                            ("serving.upstream_url=localhost:8000", "http"),
                            ("serving.engine=tgi", "vllm")]:
        with pytest.raises(ConfigError) as err:
            cfg.load(params, [override])
        assert override.split("=")[0] in str(err.value) and words.strip("{}") in str(err.value), str(err.value)
