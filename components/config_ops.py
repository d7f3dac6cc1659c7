"""Configuration sections of the running system: serving, monitoring, retraining, schedules, the closed loop.

Split from components/config.py (which re-exports every class here) to keep each file readable; the
same rules hold: unknown keys are errors, field descriptions are the help text.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from components.config_base import Section


class RateLimitConfig(Section):
    requests_per_minute: int = Field(120, ge=1)
    tokens_per_minute: int = Field(60_000, ge=1)
    storage: str | None = Field(None, description="limits storage URI (redis://host:6379); None = in memory")


# What serving.upstream_command may use (components/serving/upstream.py fills them in).
UPSTREAM_PLACEHOLDERS = ("model_dir", "tokenizer_dir", "port", "name", "python", "llmcycle", "version")


class ServingConfig(Section):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    quantize: Literal["none", "int8", "auto"] = Field(
        "none", description="CPU dynamic int8 of the linear layers: none | int8 (always) | auto (only where "
                            "int8 was measured faster: hidden size >= quantize.INT8_MIN_HIDDEN; the reason is logged)")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="where the builtin engine runs: auto (cuda when torch sees a GPU, else cpu) | cpu | cuda")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="weights and KV cache: auto = bfloat16 on a GPU that has it (float16 on one that does "
                            "not), float32 on cpu")
    compile: bool = Field(True, description="on cuda, the decode step runs under torch.compile(mode='reduce-overhead') "
                          "(CUDA graphs; the batch is padded to max_batch so one graph serves every step); ignored on "
                          "cpu, where a compiled step measured no faster (benchmarks/README.md)")
    max_new_tokens: int = Field(128, ge=1)
    rate_limit: RateLimitConfig = Field(default_factory=RateLimitConfig)
    max_batch: int = Field(16, ge=1, description="sequences decoded together by the engine")
    torch_threads: int = Field(0, ge=0, description="torch threads of the engine's decode loop (0: auto, one "
                               "fewer than the usable cores, at least 1: the HTTP event loop keeps a core; on 2 "
                               "cores 1 thread served 1.2-1.3x more tokens/s than 2, benchmarks/README.md)")
    max_queue: int = Field(64, ge=1, description="waiting requests before 503 + Retry-After")
    max_prompt_tokens: int = Field(2048, ge=1, description="longest prompt accepted (also bounded by the context)")
    max_n: int = Field(8, ge=1, description="most choices (n) per request")
    max_body_bytes: int = Field(1_000_000, ge=1024, description="largest request body")
    poll_interval_s: float = Field(30.0, ge=0, description="champion alias poll interval; 0 = never poll")
    keys_file: str | None = Field(None, description="file with one API key a line (beside LLMCYCLE_API_KEYS)")
    log_dir: str = Field("data/inference", description="request log folder (JSONL, rotated daily and by size)")
    log_max_bytes: int = Field(64_000_000, ge=1024, description="rotate a request log file past this size")
    start_on_promote: bool = Field(False, description="after a promotion with no server answering, the deploy "
                                   "flow starts `llmcycle serve --generate-key` in the background "
                                   "(data/serving/server.log, server.pid); `make run` turns it on")
    start_timeout_s: float = Field(300.0, gt=0, description="how long the deploy flow waits for a server it "
                                   "started to answer /readyz")
    engine: Literal["builtin", "vllm"] = Field(
        "builtin", description="what generates: builtin (the project's batching engine, CPU or GPU) | vllm (an "
                               "OpenAI-compatible upstream such as `vllm serve` on a GPU; this server stays in front "
                               "for keys, limits, request log, metrics and version swaps)")
    upstream_command: str = Field(
        "vllm serve {model_dir} --tokenizer {tokenizer_dir} --host 127.0.0.1 --port {port} --served-model-name {name}",
        description="engine=vllm: the command that starts one upstream per model version (run in the project root); "
                    "placeholders: " + ", ".join("{%s}" % p for p in UPSTREAM_PLACEHOLDERS))
    upstream_url: str | None = Field(None, description="engine=vllm: an externally managed upstream "
                                     "(http://host:port) instead of starting one; version swaps then only relabel")
    upstream_start_timeout_s: float = Field(900.0, gt=0, description="engine=vllm: how long a started upstream may "
                                            "take to answer a warm-up completion (vLLM loads and compiles first)")

    @field_validator("upstream_command")
    @classmethod
    def _upstream_placeholders(cls, v: str) -> str:
        import string
        try:
            names = {f for _, f, _, _ in string.Formatter().parse(v) if f is not None}
        except ValueError as exc:
            raise ValueError(f"not a valid command template: {exc}") from None
        unknown = names - set(UPSTREAM_PLACEHOLDERS)
        if unknown:
            raise ValueError(f"unknown placeholder(s) {sorted(unknown)}; known: {list(UPSTREAM_PLACEHOLDERS)}")
        missing = {"model_dir", "port"} - names
        if missing:
            raise ValueError(f"must contain {{model_dir}} and {{port}} (missing: {sorted(missing)})")
        return v

    @field_validator("upstream_url")
    @classmethod
    def _upstream_url(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError(f"must be an http(s):// URL, got {v!r}")
        return v.rstrip("/") if v else v


# Columns the drift report compares (components/monitoring/descriptors.py); "embedding" when enabled.
DRIFT_COLUMNS = ("prompt", "prompt_chars", "prompt_tokens", "prompt_rare_share", "prompt_byte_fallback_share",
                 "prompt_bits_per_byte", "completion_chars", "completion_tokens", "completion_mean_logprob",
                 "completion_parses", "embedding")


class MonitoringConfig(Section):
    window: int = Field(100, ge=10, description="requests per drift window (the newest N of the request log)")
    window_minutes: float | None = Field(None, gt=0, description="judge the requests of the last T minutes instead "
                                                                 "of the last `window` (null: count-based)")
    min_window: int = Field(30, ge=2, description="a window with fewer distinct prompts is insufficient_data, "
                                                  "never 'no drift'")
    drift_share_threshold: float = Field(0.5, gt=0, le=1, description="drift when at least this share of the "
                                                                      "compared columns drifted")
    drift_columns: list[str] = Field(default_factory=list, description="columns any one of which drifting is drift "
                                     "on its own (see DRIFT_COLUMNS); empty: the share alone decides")
    text_threshold: float = Field(0.6, gt=0.5, lt=1, description="ROC AUC of the prompt text's domain classifier "
                                                                 "(abs_text_content_drift) above which it drifted")
    embeddings: bool = Field(False, description="also compare mean last-hidden-state embeddings of the prompts")
    reference_splits: list[Literal["train", "val", "test"]] = Field(
        default_factory=lambda: ["val", "test"], description="held-out SFT splits whose prompts form the reference")
    reference_size: int = Field(300, ge=10, description="most reference prompts (a fixed-seed sample)")
    reference_temperature: float = Field(0.0, ge=0, description="sampling temperature of the champion's reference "
                                         "completions (0: greedy): match the traffic's, as `llmcycle traffic` does")
    reference_max_tokens: int | None = Field(64, ge=1, description="reference completion length (match the traffic's "
                                                                   "max_tokens); null: serving.max_new_tokens")
    rare_token_coverage: float = Field(0.95, gt=0, lt=1, description="a token is rare when it is not among the most "
                                       "frequent training tokens that together make up this share")
    webhook_url: str | None = Field(None, description="POST a JSON alert here on drift (null: no webhook)")
    webhook_timeout_s: float = Field(5.0, gt=0, description="seconds before a webhook POST is given up (logged)")

    @field_validator("webhook_url")
    @classmethod
    def _http_url(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError(f"expected an http:// or https:// URL, got {v!r}")
        return v

    @field_validator("drift_columns")
    @classmethod
    def _known_columns(cls, v: list[str]) -> list[str]:
        unknown = sorted(set(v) - set(DRIFT_COLUMNS))
        if unknown:
            raise ValueError(f"unknown drift column(s) {unknown}; known: {list(DRIFT_COLUMNS)}")
        return v

    @model_validator(mode="after")
    def _window_fits(self) -> "MonitoringConfig":
        if self.window < self.min_window:
            raise ValueError(f"window ({self.window}) is below min_window ({self.min_window}): every window "
                             "would be insufficient_data")
        return self


class RetrainConfig(Section):
    """`llmcycle retrain` / the retrain flow: feedback + the drifted window -> a challenger from the champion."""
    min_new_documents: int = Field(20, ge=1, description="fewest new usable pairs (SFT + preference, not already in "
                                                         "the data) a retrain needs; fewer ends it as not_enough_data")
    feedback_dir: str = Field("data/feedback", description="folder of the server's feedback-*.jsonl files")
    holdout_share: float = Field(0.3, ge=0, lt=1, description="share of the new SFT prompts held out of training "
                                                             "(beside those the data split puts in test): the drifted "
                                                             "domain of the new data version's test split, which the "
                                                             "retrain's gate must improve significantly")
    new_data_share: float = Field(0.3, gt=0, lt=1, description="share of the challenger's training draws that come "
                                                              "from the new pairs (they are ~1% of the rows): each new "
                                                              "row gets the sampling weight that makes it so")
    sft_max_steps: int = Field(100, ge=1, description="SFT steps of the challenger, started from the champion")
    align_max_steps: int = Field(30, ge=1, description="steps of the alignment stage(s) after SFT (dpo, or reward "
                                                       "and ppo per finetune.method)")
    lr_scale: float = Field(0.5, gt=0, le=1, description="the stages' learning rates times this (continued "
                                                         "training from a trained model takes smaller steps)")


_CRON_ALIASES = {"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"}


def _check_cron(value: str | None) -> str | None:
    """Five space-separated fields (minute hour day month weekday) or an @alias; Prefect parses the rest."""
    if value is None or value.strip() in _CRON_ALIASES or len(value.split()) == 5:
        return value
    raise ValueError(f"expected a 5-field cron expression like '*/30 * * * *' (or @hourly, @daily), got {value!r}")


class ScheduleConfig(Section):
    """`llmcycle schedule`: the Prefect deployments served from one process (flows/deployments.py)."""
    monitor_cron: str | None = Field("*/30 * * * *", description="cron of the `monitor` deployment (drift check of "
                                                                "the newest request window); null: on demand only")
    lifecycle_cron: str | None = Field(None, description="cron of the `lifecycle` deployment; null: on demand only")
    timezone: str = Field("UTC", description="time zone the cron expressions are read in (IANA name)")
    retrain_on_drift: bool = Field(True, description="the `retrain` deployment runs on each "
                                                     "llmcycle.drift.detected event (one at a time)")
    server_timeout_s: float = Field(120.0, gt=0, description="how long to wait for a local `prefect server start` "
                                                             "to answer (about 20 s on 2 cores)")

    @field_validator("monitor_cron", "lifecycle_cron")
    @classmethod
    def _cron(cls, v: str | None) -> str | None:
        return _check_cron(v)


class LoopConfig(Section):
    """The closed loop after the lifecycle (flows/loop.py): serve, traffic, monitor, drift-triggered retrain."""
    enabled: bool = Field(False, description="`llmcycle run` closes the loop after the lifecycle (`make run` and "
                                             "`llmcycle run --loop` turn it on)")
    baseline_requests: int | None = Field(None, ge=1, description="same-domain requests sent first (stdlib "
                                                                  "profile); null: monitoring.window")
    drift_requests: int | None = Field(None, ge=1, description="drifted requests sent next (tests profile); "
                                                               "null: monitoring.window")
    feedback: bool = Field(True, description="the traffic also sends ratings and corrections (retraining data)")
    retrain_timeout_s: float = Field(1800.0, gt=0, description="how long to wait for the event-triggered retrain run")
    swap_timeout_s: float = Field(120.0, gt=0, description="how long to wait for the server to serve the new champion")
