"""Traffic simulator: send a profile's prompts through the real API (/v1/chat/completions) with an API key.

Prompts go as one user turn, the form the model was fine-tuned on; the server logs each request to
data/inference/. With feedback on, completions are judged with the evaluation stage's own scorers
(parses, defines the asked name) and rated, some corrected with the real function, and a few sent as
explicit preferences (chosen = the real function, rejected = the completion). Compromise: threads over
one httpx client rather than asyncio, which is plenty for tens of concurrent requests.
"""
from __future__ import annotations

import os
import random
import re
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from components.config import Settings
from components.monitoring.prompts import Prompt, profile_prompts, stdlib_prompts  # noqa: F401 (re-exported)

RATE_SHARE = 0.6          # share of completions rated up/down
CORRECT_SHARE = 0.5       # share of the down-rated ones that also carry the real function as `corrected`
PREFER_SHARE = 0.1        # share of completions sent as an explicit preference (at least one when possible)
MAX_RETRY_WAIT_S = 60.0   # longest single wait on a Retry-After


class TrafficError(RuntimeError):
    """The server cannot be used: unreachable, not a llmcycle/OpenAI server, or it refuses the key. Exit 1."""

    exit_code = 1


@dataclass
class Summary:
    url: str
    profile: str
    sent: int = 0
    ok: int = 0
    errors: Counter = field(default_factory=Counter)       # status (or "connection") -> count
    retries: int = 0                                       # 429/503 answers waited out and retried
    prompt_tokens: int = 0
    completion_tokens: int = 0
    feedback: Counter = field(default_factory=Counter)     # up / down / corrected / preference / failed
    versions: Counter = field(default_factory=Counter)     # serving version -> completions
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"url": self.url, "profile": self.profile, "sent": self.sent, "ok": self.ok,
                "errors": dict(self.errors), "retries": self.retries, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "feedback": dict(self.feedback),
                "versions": dict(self.versions), "seconds": round(self.seconds, 3)}

    def lines(self) -> list[str]:
        errors = ", ".join(f"{k}: {v}" for k, v in sorted(self.errors.items(), key=str)) or "none"
        fb = ", ".join(f"{k} {v}" for k, v in sorted(self.feedback.items())) or "none"
        served = ", ".join(f"v{k} {v}" for k, v in sorted(self.versions.items(), key=str)) or "none"
        return [f"traffic {self.profile} -> {self.url}: sent {self.sent}, ok {self.ok}, errors {errors} "
                f"(after {self.retries} retries on 429/503)",
                f"tokens: prompt {self.prompt_tokens}, completion {self.completion_tokens}; served by {served}; "
                f"{self.seconds:.1f} s",
                f"feedback sent: {fb}"]


def default_key(settings: Settings) -> str | None:
    """The first of LLMCYCLE_API_KEYS, else the key `llmcycle serve --generate-key` made for this machine."""
    from components.serving.auth import KEYS_ENV, read_keys_file

    env = [k.strip() for k in os.environ.get(KEYS_ENV, "").split(",") if k.strip()]
    if env:
        return env[0]
    kept = settings.path("data", "serving", "api_keys")
    keys = read_keys_file(kept) if kept.is_file() else []
    return keys[0] if keys else None


def preflight(client: Any, url: str) -> None:
    """GET /v1/models with the key: one clear TrafficError for an unreachable server or a refused key."""
    import httpx

    try:
        r = client.get("/v1/models")
    except httpx.HTTPError as exc:
        raise TrafficError(f"cannot reach the server at {url} ({type(exc).__name__}: {exc}); start it with "
                           "`llmcycle serve --generate-key` or pass --url") from None
    if r.status_code == 401:
        raise TrafficError(f"the server at {url} refused the API key (401); pass --key or set LLMCYCLE_API_KEYS")
    if r.status_code != 200:
        raise TrafficError(f"the server at {url} answered GET /v1/models with {r.status_code}; is it a llmcycle "
                           "server? (--url is the base URL, e.g. http://127.0.0.1:8000)")


def _complete(client: Any, p: Prompt, i: int, model: str, max_tokens: int, temperature: float,
              seed: int, max_retries: int) -> dict[str, Any]:
    import httpx

    body = {"model": model, "messages": [{"role": "user", "content": p.prompt}], "max_tokens": max_tokens,
            "temperature": temperature, "seed": seed + i}
    retries = 0
    while True:
        try:
            r = client.post("/v1/chat/completions", json=body)
        except httpx.HTTPError as exc:
            return {"status": "connection", "error": f"{type(exc).__name__}: {exc}", "retries": retries}
        # A well-behaved client waits out a rate limit (429) or a full queue (503) as Retry-After says.
        if r.status_code in (429, 503) and retries < max_retries:
            retries += 1
            time.sleep(min(MAX_RETRY_WAIT_S, _retry_after(r.headers.get("Retry-After"))))
            continue
        break
    if r.status_code != 200:
        return {"status": r.status_code, "retries": retries}
    out = r.json()
    return {"status": 200, "id": out["id"], "text": out["choices"][0]["message"]["content"] or "",
            "usage": out.get("usage") or {}, "version": r.headers.get("X-Model-Version"), "retries": retries}


def _retry_after(value: str | None) -> float:
    try:
        return max(0.1, float(value))
    except (TypeError, ValueError):
        return 1.0


def judge(p: Prompt, completion: str) -> bool:
    """Up when the completion parses as a function and, when the prompt names one, defines that name."""
    from components.evaluation.scorers import defines_name, extract_code, parses

    code = extract_code(completion)
    return parses(code) and (not p.name or defines_name(code, p.name))


def feedback_bodies(pairs: list[tuple[Prompt, dict]], seed: int) -> list[tuple[str, dict]]:
    """(kind, /v1/feedback body) for a seeded share of the completions: ratings (some with corrections)
    and a few explicit preferences. kind is up, down, corrected or preference."""
    rng = random.Random(f"feedback:{seed}")
    out: list[tuple[str, dict]] = []
    for p, res in pairs:
        if rng.random() < RATE_SHARE:
            up = judge(p, res["text"])
            body = {"completion_id": res["id"], "rating": "up" if up else "down"}
            kind = "up" if up else "down"
            if not up and p.reference and rng.random() < CORRECT_SHARE:
                body["corrected"], kind = p.reference, "corrected"
            out.append((kind, body))
    candidates = [(p, res) for p, res in pairs if p.reference and res["text"].strip() != p.reference.strip()]
    if candidates:
        for p, res in rng.sample(candidates, max(1, int(len(candidates) * PREFER_SHARE))):
            out.append(("preference", {"prompt": p.prompt, "chosen": p.reference, "rejected": res["text"]}))
    return out


def run_traffic(settings: Settings, url: str, profile: str, n: int, key: str | None = None, feedback: bool = False,
                concurrency: int = 4, seed: int = 0, max_tokens: int = 64, temperature: float = 0.0,
                model: str | None = None, timeout_s: float = 300.0, max_retries: int = 10) -> Summary:
    """Send n prompts of `profile` to the server at url; the Summary of what came back.

    ConfigError for a bad profile / n / concurrency (exit 2), DataError for a bad jsonl line,
    TrafficError when the server is unreachable or refuses the key (exit 1). 429/503 answers are retried
    after Retry-After, up to max_retries times per request; what still fails is counted by status.
    """
    import httpx

    from components.errors import ConfigError

    if concurrency < 1:
        raise ConfigError(f"--concurrency must be at least 1, got {concurrency}")
    if not re.match(r"^https?://[^/\s]+", url or ""):
        raise TrafficError(f"--url: expected a base URL like http://127.0.0.1:8000, got {url!r}")
    prompts = profile_prompts(settings, profile, n, seed)
    url = url.rstrip("/").removesuffix("/v1")
    key = key or default_key(settings)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    summary = Summary(url=url, profile=profile)
    t0 = time.perf_counter()
    with httpx.Client(base_url=url, headers=headers, timeout=timeout_s,
                      limits=httpx.Limits(max_connections=concurrency + 2)) as client:
        preflight(client, url)
        name = model or settings.registry.model_name
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            results = list(pool.map(lambda ip: _complete(client, ip[1], ip[0], name, max_tokens, temperature, seed,
                                                          max_retries), enumerate(prompts)))
        done: list[tuple[Prompt, dict]] = []
        for p, res in zip(prompts, results):
            summary.sent += 1
            summary.retries += res["retries"]
            if res["status"] != 200:
                summary.errors[res["status"]] += 1
                continue
            summary.ok += 1
            summary.prompt_tokens += int(res["usage"].get("prompt_tokens", 0))
            summary.completion_tokens += int(res["usage"].get("completion_tokens", 0))
            summary.versions[res["version"]] += 1
            done.append((p, res))
        if feedback:
            for kind, body in feedback_bodies(done, seed):
                try:
                    ok = client.post("/v1/feedback", json=body).status_code == 200
                except httpx.HTTPError:
                    ok = False
                summary.feedback[kind if ok else "failed"] += 1
    summary.seconds = time.perf_counter() - t0
    return summary
