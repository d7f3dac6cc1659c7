"""The OpenAI-compatible server end to end: a real uvicorn on loopback, a tiny model from a SQLite
MLflow registry, driven over HTTP with httpx and the official `openai` client.
"""
from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from components import tracking
from tests.serving.server_helpers import (ADMIN, KEY, auth, build_registry, make_app,
                                          running_server)



@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    return build_registry(tmp_path_factory.mktemp("serveproj"))


@pytest.fixture(scope="module")
def server(registry):
    from components import config as cfg

    # Generous limits: this server is shared by many tests (test_429_with_retry_after has its own).
    settings = cfg.load(registry.root / "params.yaml", ["serving.rate_limit.requests_per_minute=100000",
                                                        "serving.rate_limit.tokens_per_minute=100000000"])
    app = make_app(settings)
    with running_server(app) as base:
        yield base, app


def post(base, path, body, key=KEY, **kw):
    return httpx.post(f"{base}{path}", json=body, headers=auth(key) if key else {}, timeout=60, **kw)


# ----------------------------------------------------------------------------- OpenAI client
def test_openai_client_completions_chat_and_streaming(server):
    import openai

    base, _ = server
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0)
    out = client.completions.create(model="llmcycle", prompt="def add(a, b):", max_tokens=6, temperature=0)
    assert out.model == "llmcycle@champion" and out.system_fingerprint == "llmcycle-v1"
    assert out.usage.completion_tokens <= 6 and out.usage.prompt_tokens > 0
    again = client.completions.create(model="llmcycle", prompt="def add(a, b):", max_tokens=6, temperature=0)
    assert again.choices[0].text == out.choices[0].text          # greedy is deterministic

    chat = client.chat.completions.create(model="llmcycle", messages=[{"role": "user", "content": "hi"}],
                                          max_completion_tokens=5, temperature=0.8, top_p=0.9, seed=3, n=2)
    assert len(chat.choices) == 2 and chat.choices[0].message.role == "assistant"
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens

    stream = client.chat.completions.create(model="llmcycle", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=5, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens <= 5
    assert any(c.choices and c.choices[0].finish_reason in ("stop", "length") for c in chunks)
    full = client.chat.completions.create(model="llmcycle", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=5, temperature=0)
    assert text == full.choices[0].message.content


def test_sse_ends_with_done_and_names_version(server):
    base, _ = server
    with httpx.stream("POST", f"{base}/v1/completions", headers=auth(), timeout=60,
                      json={"model": "llmcycle", "prompt": "x = ", "max_tokens": 4, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["x-model-version"] == "1"
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    first = json.loads(lines[0][len("data: "):])
    assert first["object"] == "text_completion" and first["system_fingerprint"] == "llmcycle-v1"


def test_models_health_ready_metrics(server):
    base, _ = server
    ids = [m["id"] for m in httpx.get(f"{base}/v1/models", headers=auth()).json()["data"]]
    assert {"llmcycle", "llmcycle@champion", "llmcycle@challenger", "llmcycle/1", "llmcycle/2"} <= set(ids)
    assert httpx.get(f"{base}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{base}/readyz").json()
    assert ready["status"] == "ready" and ready["version"] == "1"
    post(base, "/v1/completions", {"model": "llmcycle", "prompt": "a", "max_tokens": 2})
    text = httpx.get(f"{base}/metrics").text
    for name in ("llmcycle_requests_total", "llmcycle_request_latency_seconds_bucket",
                 "llmcycle_time_to_first_token_seconds_bucket", "llmcycle_tokens_generated_total",
                 "llmcycle_batch_size", "llmcycle_queue_depth", 'llmcycle_serving_version{name="llmcycle",version="1"}',
                 "llmcycle_reload_failures_total"):
        assert name in text, name


def test_stop_and_echo(server):
    base, _ = server
    plain = post(base, "/v1/completions", {"model": "llmcycle", "prompt": "def foo(", "max_tokens": 8,
                                            "temperature": 0}).json()["choices"][0]["text"]
    assert plain                                          # greedy text of the tiny model, then cut it
    cut = post(base, "/v1/completions", {"model": "llmcycle", "prompt": "def foo(", "max_tokens": 8,
                                          "temperature": 0, "stop": plain[-1]}).json()["choices"][0]
    assert plain[-1] not in cut["text"] and plain.startswith(cut["text"]) and cut["finish_reason"] == "stop"
    echo = post(base, "/v1/completions", {"model": "llmcycle", "prompt": "def foo(", "max_tokens": 8,
                                           "temperature": 0, "echo": True}).json()["choices"][0]["text"]
    assert echo == "def foo(" + plain


def test_unknown_routes_and_methods_are_openai_errors(server):
    base, _ = server
    r = httpx.get(f"{base}/v1/nothing", headers=auth())
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.get(f"{base}/v1/completions", headers=auth())
    assert r.status_code == 405 and "error" in r.json()


def test_request_by_version_or_alias(server):
    base, _ = server
    r = post(base, "/v1/completions", {"model": "llmcycle@challenger", "prompt": "a", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["system_fingerprint"] == "llmcycle-v2"
    r = post(base, "/v1/completions", {"model": "2", "prompt": "a", "max_tokens": 2})
    assert r.status_code == 200 and r.headers["x-model-version"] == "2"


def test_greedy_over_http_equals_generate_on_the_served_model(server, registry):
    """The whole path (tokenize, engine, detokenize, SSE or JSON) gives generate()'s text, token for token."""
    from components.model.build import load_causal_lm
    from components.model.generation import generate

    base, app = server
    served = app.state.store.current
    model, tok = load_causal_lm(registry, served.ref.uri)
    prompts = ["def add(a, b):", "import os\n\nclass ", "    return [x for x in"]
    want = [generate(model.eval(), tok, [p], max_new_tokens=12)[0] for p in prompts]   # batch 1, the reference
    got = post(base, "/v1/completions", {"model": "llmcycle", "prompt": prompts, "max_tokens": 12, "temperature": 0})
    assert [c["text"] for c in sorted(got.json()["choices"], key=lambda c: c["index"])] == want
    with httpx.stream("POST", f"{base}/v1/completions", headers=auth(), timeout=60,
                      json={"model": "llmcycle", "prompt": prompts[0], "max_tokens": 12, "temperature": 0,
                            "stream": True}) as r:
        chunks = [json.loads(ln[6:]) for ln in r.iter_lines() if ln.startswith("data: {")]
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == want[0]


# ----------------------------------------------------------------------------- security
def test_401_without_or_with_wrong_key(server):
    base, _ = server
    for key in (None, "sk-wrong"):
        r = post(base, "/v1/completions", {"model": "llmcycle", "prompt": "a"}, key=key)
        assert r.status_code == 401
        assert r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{base}/v1/models").status_code == 401
    assert post(base, "/admin/reload", {}, key=KEY).status_code == 401      # a user key is not the admin key
    r = post(base, "/admin/reload", {"model": "x" * 5000}, key=ADMIN)       # the admin body is capped too
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"


@pytest.mark.parametrize("body,param,status", [
    ('{"model": "llmcycle", "prompt": ', None, 400),                          # bad JSON
    ('[1, 2]', None, 400),
    ('[' * 100_000 + ']' * 100_000, None, 400),                               # nested too deeply
    ('{"model": "llmcycle", "prompt": "a", "temperature": NaN}', "temperature", 400),
    ('{"model": "llmcycle", "prompt": "a", "max_tokens": 1' + '0' * 5000 + '}', None, 400),
    (b'{"model": "llmcycle", "prompt": "\xff\xfe"}', None, 400),             # not UTF-8
    ({"model": "llmcycle", "prompt": 123}, "prompt", 400),                     # wrong types
    ({"model": "llmcycle", "prompt": "a", "max_tokens": "many"}, "max_tokens", 400),
    ({"model": "llmcycle", "prompt": "a", "temperature": "hot"}, "temperature", 400),
    ({"model": "llmcycle", "prompt": "a", "max_tokens": -5}, "max_tokens", 400),
    ({"model": "llmcycle", "prompt": "a", "max_tokens": 10 ** 9}, "max_tokens", 400),
    ({"model": "llmcycle", "prompt": "a", "n": 1000}, "n", 400),
    ({"model": "llmcycle", "prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, "stop", 400),
    ({"prompt": "a"}, "model", 400),
    ({"model": "gpt-4", "prompt": "a"}, "model", 404),                         # unknown model
    ({"model": "llmcycle/99", "prompt": "a"}, "model", 404),
    ({"model": "llmcycle@nosuchalias", "prompt": "a"}, "model", 404),
    ({"model": "llmcycle", "prompt": "word " * 2000}, "prompt", 400),          # longer than the context
])
def test_malformed_completions_are_4xx_naming_the_field(server, body, param, status):
    base, _ = server
    content = body if isinstance(body, (str, bytes)) else json.dumps(body)
    r = httpx.post(f"{base}/v1/completions", content=content, timeout=60,
                   headers={**auth(), "content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"] and err["type"]


@pytest.mark.parametrize("body,param", [
    ({"model": "llmcycle", "messages": []}, "messages"),
    ({"model": "llmcycle"}, "messages"),
    ({"model": "llmcycle", "messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ({"model": "llmcycle", "messages": [{"role": "user"}]}, "messages.0.content"),
])
def test_malformed_chat_is_400_naming_the_field(server, body, param):
    base, _ = server
    r = post(base, "/v1/chat/completions", body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_oversized_body_is_413(server, registry):
    base, _ = server
    big = "a" * (registry.serving.max_body_bytes + 10)
    r = post(base, "/v1/completions", {"model": "llmcycle", "prompt": big})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"


def test_429_with_retry_after(registry):
    from components import config as cfg

    settings = cfg.load(registry.root / "params.yaml", ["serving.rate_limit.requests_per_minute=2"])
    app = make_app(settings)
    with running_server(app) as base:
        codes = [post(base, "/v1/completions", {"model": "llmcycle", "prompt": "a", "max_tokens": 1})
                 for _ in range(3)]
        assert [r.status_code for r in codes] == [200, 200, 429]
        assert int(codes[-1].headers["retry-after"]) >= 1
        assert codes[-1].json()["error"]["type"] == "rate_limit_error"
        # another key has its own budget
    settings = cfg.load(registry.root / "params.yaml", ["serving.rate_limit.tokens_per_minute=20"])
    with running_server(make_app(settings)) as base:
        assert post(base, "/v1/completions", {"model": "llmcycle", "prompt": "a", "max_tokens": 15}).status_code == 200
        r = post(base, "/v1/completions", {"model": "llmcycle", "prompt": "a", "max_tokens": 15})
        assert r.status_code == 429 and "tokens" in r.json()["error"]["message"]
    with running_server(make_app(settings)) as base:   # more than the whole budget: never a 429 to retry
        r = post(base, "/v1/completions", {"model": "llmcycle", "prompt": "a", "max_tokens": 30})
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
        assert r.json()["error"]["code"] == "request_too_large" and "20 per minute" in r.json()["error"]["message"]
        assert post(base, "/v1/completions", {"model": "llmcycle", "prompt": "a", "max_tokens": 15}).status_code == 200


def test_client_disconnect_cancels_its_sequences_and_logs_what_it_got(server, registry):
    base, app = server
    engine = app.state.store.current.engine
    before = engine.stats["requests_cancelled"]
    with httpx.stream("POST", f"{base}/v1/completions", headers=auth(), timeout=60,
                      json={"model": "llmcycle", "prompt": "def f(" * 20, "max_tokens": 128, "n": 8,
                            "temperature": 1.0, "stream": True}) as r:
        rid = json.loads(next(ln for ln in r.iter_lines() if ln.startswith("data: "))[6:])["id"]   # then hang up
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and engine.stats["requests_cancelled"] == before:
        time.sleep(0.05)
    assert engine.stats["requests_cancelled"] > before
    mine = []
    while time.monotonic() < deadline and len(mine) < 8:   # each choice on record, cut where it stopped
        app.state.request_log.flush()
        mine = [rec for f in sorted((registry.root / "data" / "inference").glob("requests-*.jsonl"))
                for rec in map(json.loads, f.read_text().splitlines()) if rec["id"] == rid]
        time.sleep(0.05)
    assert sorted(rec["index"] for rec in mine) == list(range(8))
    assert "cancelled" in {rec["finish_reason"] for rec in mine}


def test_engine_failure_is_a_500_or_a_stream_error_never_an_empty_200(server, monkeypatch):
    base, app = server
    engine = app.state.store.current.engine
    if not hasattr(engine, "_decode"):
        pytest.skip("the engine no longer has the _decode step this test breaks on purpose")

    def boom(*a, **k):
        raise RuntimeError("simulated device failure")
    monkeypatch.setattr(engine, "_decode", boom)
    served = app.state.store.current
    r = post(base, "/v1/completions", {"model": "llmcycle", "prompt": "a", "max_tokens": 8})
    assert r.status_code == 500 and r.json()["error"]["code"] == "engine_error"
    assert served.inflight == 0   # released once: a swap waits for in-flight requests by this count
    with httpx.stream("POST", f"{base}/v1/completions", headers=auth(), timeout=60,
                      json={"model": "llmcycle", "prompt": "a", "max_tokens": 8, "stream": True}) as s:
        lines = [ln for ln in s.iter_lines() if ln]
    assert any('"engine_error"' in ln for ln in lines) and lines[-1] == "data: [DONE]"
    assert served.inflight == 0
    monkeypatch.undo()
    assert post(base, "/v1/completions", {"model": "llmcycle", "prompt": "a", "max_tokens": 2}).status_code == 200


def test_any_64_bit_seed_and_any_temperature_in_range_are_served(server):
    base, app = server
    engine = app.state.store.current.engine
    errors = engine.stats["step_errors"]
    r = post(base, "/v1/completions", {"model": "llmcycle", "prompt": "a", "max_tokens": 2, "seed": 2**64})
    assert r.status_code == 400 and r.json()["error"]["param"] == "seed"
    for body in ({"seed": 2**63 - 1, "n": 2, "temperature": 1.0},    # seed + 1 for the second choice
                 {"seed": -(2**63), "temperature": 0.7},
                 {"temperature": 1e-300, "seed": 1}):                  # as good as greedy, never NaN
        r = post(base, "/v1/completions", {"model": "llmcycle", "prompt": "a", "max_tokens": 4, **body})
        assert r.status_code == 200, (body, r.text)
    assert engine.stats["step_errors"] == errors


def test_full_queue_is_503_with_retry_after_and_an_unqueueable_request_is_400(registry):
    from components import config as cfg

    settings = cfg.load(registry.root / "params.yaml", ["serving.max_batch=1", "serving.max_queue=1"])
    app = make_app(settings)
    with running_server(app) as base:
        # More completions than the queue holds could never be served: 400 naming the field, not 503.
        r = post(base, "/v1/completions", {"model": "llmcycle", "prompt": "a", "max_tokens": 5, "n": 2})
        assert r.status_code == 400 and r.json()["error"]["param"] == "n"
        r = post(base, "/v1/completions", {"model": "llmcycle", "prompt": ["a", "b"], "max_tokens": 5})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
        # One slot and a queue of one: of 8 requests sent at once at least one finds the queue full.
        body = {"model": "llmcycle", "prompt": "a", "max_tokens": 50}
        for _ in range(5):
            results = []
            threads = [threading.Thread(target=lambda: results.append(post(base, "/v1/completions", body)))
                       for _ in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert {x.status_code for x in results} <= {200, 503} and 200 in {x.status_code for x in results}
            busy = [x for x in results if x.status_code == 503]
            if busy:
                break
        r = busy[0]
        assert r.json()["error"]["code"] == "queue_full"
        assert int(r.headers["retry-after"]) >= 1
        assert post(base, "/v1/completions", {"model": "llmcycle", "prompt": "a", "max_tokens": 2}).status_code == 200


def test_int8_serving_answers(registry):
    from components import config as cfg

    settings = cfg.load(registry.root / "params.yaml", ["serving.quantize=int8"])
    app = make_app(settings)
    with running_server(app) as base:
        r = post(base, "/v1/completions", {"model": "llmcycle", "prompt": "def f(", "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    import torch
    assert any(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in app.state.store.current.model.modules())


# ----------------------------------------------------------------------------- versions
def test_broken_extra_version_is_503_and_not_reloaded_per_request(server):
    base, app = server
    first = post(base, "/v1/completions", {"model": "llmcycle/3", "prompt": "a", "max_tokens": 2})
    assert first.status_code == 503 and first.json()["error"]["param"] == "model"
    t0 = time.perf_counter()
    again = post(base, "/v1/completions", {"model": "llmcycle/3", "prompt": "a", "max_tokens": 2})
    assert again.status_code == 503 and "retried after" in again.json()["error"]["message"]
    assert time.perf_counter() - t0 < 5
    assert post(base, "/v1/completions", {"model": "llmcycle", "prompt": "a", "max_tokens": 2}).status_code == 200


def test_failed_reload_keeps_serving(server):
    base, _ = server
    r = post(base, "/admin/reload?wait=true", {"model": "llmcycle/3"}, key=ADMIN)   # v3 has broken weights
    assert r.status_code == 500 and r.json()["status"] == "failed" and r.json()["version"] == "1"
    ok = post(base, "/v1/completions", {"model": "llmcycle", "prompt": "a", "max_tokens": 2})
    assert ok.status_code == 200 and ok.json()["system_fingerprint"] == "llmcycle-v1"
    assert "llmcycle_reload_failures_total 1.0" in httpx.get(f"{base}/metrics").text
    assert httpx.get(f"{base}/readyz").json()["last_reload_error"]


def test_hot_swap_under_concurrent_load(registry):
    """8 clients ask for 128 greedy tokens each while the champion moves and the server reloads. Every answer
    is whole (finish_reason "length", 128 tokens: these weights never emit an end token on this prompt),
    at least one v1 request was in flight across the swap (started before v2 was loaded, ended after the
    reload returned) and finished whole on v1, and every request after the reload is v2. Any exception
    in a client thread fails the test."""
    from components import config as cfg

    settings = cfg.load(registry.root / "params.yaml", ["serving.rate_limit.requests_per_minute=100000",
                                                        "serving.rate_limit.tokens_per_minute=100000000"])
    app = make_app(settings)
    done, failures, stop = [], [], threading.Event()
    body = {"model": "llmcycle", "prompt": "def f(", "max_tokens": 128, "temperature": 0}

    def client(base):
        try:
            with httpx.Client(timeout=60) as c:
                while not stop.is_set():
                    t0 = time.time()
                    r = c.post(f"{base}/v1/completions", headers=auth(), json=body)
                    t1 = time.time()
                    if r.status_code != 200:
                        failures.append((r.status_code, r.text))
                        continue
                    out = r.json()
                    done.append((t0, t1, out["system_fingerprint"], out["choices"][0]["finish_reason"],
                                 out["usage"]["completion_tokens"]))
        except Exception as exc:  # noqa: BLE001 - any error in a client is a failed request, reported below
            failures.append(("exception", repr(exc)))

    with running_server(app) as base:
        workers = [threading.Thread(target=client, args=(base,)) for _ in range(8)]
        for w in workers:
            w.start()
        time.sleep(1.0)
        tracking.set_alias(registry, "llmcycle", "champion", "2")       # the champion moves ...
        try:
            r = post(base, "/admin/reload?wait=true", None, key=ADMIN)  # ... and the server is told
            returned = time.time()
            assert r.status_code == 200 and r.json()["version"] == "2"
            loaded = httpx.get(f"{base}/readyz").json()["loaded_at"]    # when v2 finished loading
            time.sleep(1.0)
        finally:
            stop.set()
            for w in workers:
                w.join(60)
            tracking.set_alias(registry, "llmcycle", "champion", "1")
    assert not failures, failures[:3]
    assert all(w.is_alive() is False for w in workers)
    assert {(reason, n) for _, _, _, reason, n in done} == {("length", 128)}      # every answer whole
    across = [d for d in done if d[0] < loaded and d[1] > returned]
    assert across and {d[2] for d in across} == {"llmcycle-v1"}, (loaded, returned, done[-20:])
    assert {d[2] for d in done if d[0] > returned} == {"llmcycle-v2"}
    assert {d[2] for d in done if d[1] < loaded} == {"llmcycle-v1"}


def test_each_version_put_live_is_an_mlflow_deploy_run(registry):
    import mlflow

    from components.serving.model_store import ModelStore

    app = make_app(registry, store=ModelStore(registry, record_deploys=True))
    with running_server(app) as base:
        assert post(base, "/admin/reload?wait=true", {"model": "llmcycle/2"}, key=ADMIN).status_code == 200
        tracking.configure(registry)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            # FINISHED only: a run just created has its tags but not yet its params.
            runs = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                      filter_string="tags.stage = 'deploy' and attributes.status = 'FINISHED'")
            if len(runs) >= 2:
                break
            time.sleep(0.2)
    by_version = {r.data.params["model_version"]: r for r in runs}
    assert set(by_version) == {"1", "2"}
    assert by_version["2"].data.params["previous_version"] == "1"
    assert by_version["2"].data.metrics["went_live_unix"] > 0


def test_poller_follows_the_champion_alias(registry):
    from components import config as cfg

    settings = cfg.load(registry.root / "params.yaml", ["serving.poll_interval_s=0.2"])
    app = make_app(settings)
    with running_server(app) as base:
        tracking.set_alias(registry, "llmcycle", "champion", "2")
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and httpx.get(f"{base}/readyz").json()["version"] != "2":
                time.sleep(0.2)
            r = post(base, "/v1/completions", {"model": "llmcycle", "prompt": "a", "max_tokens": 2})
            assert r.json()["system_fingerprint"] == "llmcycle-v2"
        finally:
            tracking.set_alias(registry, "llmcycle", "champion", "1")


# ----------------------------------------------------------------------------- request log
def test_request_log_records_completions_without_the_key(server, registry):
    base, app = server
    r = post(base, "/v1/completions", {"model": "llmcycle", "prompt": "import os", "max_tokens": 3})
    rid = r.json()["id"]
    app.state.request_log.flush()
    rows = [json.loads(ln) for f in sorted((registry.root / "data" / "inference").glob("requests-*.jsonl"))
            for ln in f.read_text().splitlines()]
    mine = [row for row in rows if row["id"] == rid]
    assert len(mine) == 1
    rec = mine[0]
    assert rec["prompt"] == "import os" and rec["version"] == "1" and rec["completion_tokens"] <= 3
    assert rec["key_id"].startswith("k-") and KEY not in json.dumps(rows)
    assert rec["latency_s"] > 0 and (rec["mean_logprob"] is None or rec["mean_logprob"] <= 0)


def test_feedback_is_stored(server, registry):
    base, app = server
    assert post(base, "/v1/feedback", {"completion_id": "cmpl-1", "rating": "up"}).status_code == 200
    assert post(base, "/v1/feedback", {"prompt": "p", "chosen": "a", "rejected": "b"}).status_code == 200
    r = post(base, "/v1/feedback", {"rating": "sideways"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "rating"


WEIRD = [None, 0, -1, 1.5, 10 ** 12, "x", "", [], {}, [1], [""], True, {"a": 1}]


@pytest.mark.parametrize("route,base_body", [
    ("/v1/completions", {"model": "llmcycle", "prompt": "a", "max_tokens": 1}),
    ("/v1/chat/completions", {"model": "llmcycle", "messages": [{"role": "user", "content": "a"}], "max_tokens": 1}),
])
def test_no_field_value_gives_a_500(server, route, base_body):
    base, _ = server
    fields = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n",
              "stop", "seed", "stream", "stream_options", "echo", "user"]
    with httpx.Client(timeout=60, headers=auth()) as c:
        for f in fields:
            for v in WEIRD:
                body = {**base_body, f: v}
                if f == "stream" and v is True:
                    continue                       # a valid stream: covered elsewhere
                r = c.post(f"{base}{route}", json=body)
                assert r.status_code < 500, (f, v, r.status_code, r.text)
                if r.status_code >= 400:
                    assert r.json()["error"]["message"], (f, v)
