"""Typed configuration: one pydantic model per stage, loaded from params.yaml plus dotted overrides.

params.yaml is THE configuration (DVC reads it as params deps too). Every model forbids unknown
keys, so a typo fails loudly with the key path and the file. Field descriptions double as help text.
Relative paths in the config resolve against the folder that holds params.yaml (the project root).
The running system's sections (serving, monitoring, retrain, schedule, loop) live in config_ops.py.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from components.config_base import Section
from components.config_ops import (  # noqa: F401 - re-exported: serving/monitoring/retrain/schedule/loop live there
    DRIFT_COLUMNS, UPSTREAM_PLACEHOLDERS, LoopConfig, MonitoringConfig, RateLimitConfig, RetrainConfig,
    ScheduleConfig, ServingConfig)
from components.errors import ConfigError


# ----------------------------------------------------------------------------- scoping
class SuccessCriteria(Section):
    beat_baseline: Literal["kn3", "unigram", "none"] = Field(
        "kn3", description="gate: the candidate's primary bits per byte must be significantly below this count "
                           "baseline's on the same text (kn3: interpolated Kneser-Ney trigram); none skips it")
    max_bits_per_byte: float | None = Field(None, gt=0, description="gate: the primary bits per byte must be at most this")
    min_syntax_valid_rate: float = Field(0.05, ge=0, le=1, description="gate: share of greedy completions that are "
                                                                         "function definitions that parse (ast)")


class ScopingConfig(Section):
    budget_minutes: float = Field(5.0, gt=0, description="wall minutes of the pretrain stage on the device it will "
                                                         "train on (validation, checkpoints and logging included)")
    budget_flops: float | None = Field(None, gt=0, description="budget in FLOPs; overrides budget_minutes when set: "
                                                           "the same model and steps on every machine, only the "
                                                           "predicted wall time moves")
    reference_tokens_per_sec: float | None = Field(None, gt=0, description="the training speed a budget_flops plan "
                                                                          "was sized for; the report sets the wall "
                                                                          "time it assumed beside the measured one")
    tokens_per_param: float = Field(20.0, gt=0, description="Chinchilla ratio D/N")
    max_epochs: float = Field(4.0, gt=0, description="most passes over the training tokens the plan may take")
    min_params: int = Field(200_000, gt=0, description="smallest sensible model (non-embedding + embedding parameters): "
                                                     "a smaller optimum is raised to it, one below a quarter of it is refused")
    measure_steps: int = Field(3, ge=1, description="training steps timed per probed model shape")
    probe_rounds: int = Field(3, ge=1, le=5, description="model shapes probed at most: the first guess, then the "
                                                        "optimum the measured throughput points to, until it settles")
    stage_overhead_s: float = Field(15.0, ge=0, description="seconds of the pretrain stage outside its steps (library "
                                                            "imports, MLflow run, sample generations, model logging), "
                                                            "counted against budget_minutes")
    apply: bool = Field(True, description="write the chosen model config for the training stages (data/scoping/model.json)")
    success: SuccessCriteria = Field(default_factory=SuccessCriteria)


# ----------------------------------------------------------------------------- data
class SplitConfig(Section):
    val: float = Field(0.05, ge=0, lt=0.5, description="share of documents in the validation split")
    test: float = Field(0.05, ge=0, lt=0.5, description="share of documents in the test split")


class DataConfig(Section):
    source: str = Field("stdlib", description="stdlib | dir:PATH | jsonl:PATH")
    glob: str = Field("**/*.py", description="file glob for dir: sources")
    exclude_dirs: list[str] = Field(
        default_factory=lambda: ["test", "tests", "idle_test", "site-packages", "__pycache__", "lib2to3"],
        description="directory names skipped by stdlib/dir sources (tests are the drifted domain)",
    )
    max_documents: int | None = Field(None, gt=0, description="cap on documents (quick runs)")
    min_chars: int = Field(32, ge=1, description="documents shorter than this are dropped")
    max_chars: int = Field(400_000, gt=0, description="documents longer than this are dropped")
    near_dup_threshold: float = Field(0.85, gt=0, le=1, description="MinHash Jaccard above which a document is a near duplicate")
    split: SplitConfig = Field(default_factory=SplitConfig)
    min_total_chars: int = Field(20_000, ge=1, description="validation: the corpus must hold at least this many characters")
    max_duplicate_share: float = Field(0.0, ge=0, le=1, description="validation: allowed share of duplicate ids/texts after dedup")
    max_non_printable_share: float = Field(0.01, ge=0, le=1, description="validation: allowed share of non-printable characters per document")
    sft_jsonl: str | None = Field(None, description="user SFT pairs (prompt/response JSONL); default: built from the corpus's functions")
    preference_jsonl: str | None = Field(None, description="user preference pairs (prompt/chosen/rejected JSONL)")
    max_sft_pairs: int | None = Field(None, gt=0, description="cap on SFT/preference pairs built from the corpus")
    remote: str = Field("../llmcycle-dvc-remote", description="DVC remote: a directory (relative to the project root) or "
                                                           "a URL such as s3://bucket/path (credentials and endpoint "
                                                           "from AWS_* / AWS_ENDPOINT_URL_S3)")
    seed: int = 1337

    @field_validator("source")
    @classmethod
    def _known_source(cls, v: str) -> str:
        if v == "stdlib" or v.startswith("dir:") or v.startswith("jsonl:"):
            return v
        raise ValueError(f"must be stdlib, dir:PATH or jsonl:PATH, got {v!r}")


class TokenizerConfig(Section):
    vocab_size: int = Field(4096, ge=300, le=65536, description="BPE vocabulary size (incl. special tokens)")
    min_frequency: int = Field(2, ge=1, description="BPE merge minimum pair frequency")
    max_train_chars: int | None = Field(None, gt=0, description="cap on characters fed to BPE training")


# ----------------------------------------------------------------------------- model
class ModelConfig(Section):
    preset: Literal["tiny", "small", "gpt2-124m", "scoped"] = Field(
        "scoped", description="tiny | small | gpt2-124m | scoped (what the scoping stage chose, else tiny)")
    n_layer: int | None = Field(None, ge=1, description="overrides the preset")
    n_head: int | None = Field(None, ge=1, description="overrides the preset")
    n_embd: int | None = Field(None, ge=8, description="overrides the preset")
    block_size: int | None = Field(None, ge=8, description="context length; overrides the preset")
    intermediate_size: int | None = Field(None, ge=8, description="SwiGLU hidden size; default 8/3 * n_embd rounded to 32")
    init_from: str = Field("scratch", description="scratch | <local HF checkpoint dir> | models:/<name>@<alias>")

    @model_validator(mode="after")
    def _heads_divide(self) -> "ModelConfig":
        if self.n_head and self.n_embd and self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        return self


# ----------------------------------------------------------------------------- training
class TrainConfig(Section):
    """Settings shared by every training stage (each stage has its own copy with its own defaults)."""
    max_steps: int = Field(200, ge=1, description="optimizer steps")
    batch_size: int = Field(8, ge=1)
    lr: float = Field(3e-4, gt=0, description="peak learning rate")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine floor as a share of lr")
    warmup_steps: int = Field(10, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    grad_clip: float = Field(1.0, ge=0, description="max grad norm; 0 disables")
    precision: str = Field("auto", description="Lightning precision: auto (bf16-mixed on a CUDA GPU with native bf16, "
                                               "16-mixed on older CUDA GPUs, 32-true on CPU) | 32-true | bf16-mixed | 16-mixed")
    fused_adamw: bool | None = Field(None, description="fused AdamW kernel; null = auto (fused when training on CUDA)")
    num_workers: int | None = Field(None, ge=0, description="DataLoader worker processes; null = auto (up to 4 on CUDA, "
                                                           "0 on CPU, where workers would compete with the step)")
    strategy: str = Field("auto", description="Lightning strategy: auto | ddp | fsdp | ...")
    devices: int | str = Field(1, description="devices per node (or 'auto')")
    num_nodes: int = Field(1, ge=1)
    accelerator: str = Field("auto", description="auto | cpu | gpu")
    val_every: int = Field(50, ge=1, description="validate every N steps")
    val_batches: int = Field(8, ge=1, description="batches per validation")
    ckpt_every: int = Field(50, ge=1, description="checkpoint every N steps")
    seed: int = 1337
    compile: bool | Literal["auto"] = Field(
        "auto", description="torch.compile the loss path (pretrain): auto = on CUDA, where it removes the eager "
                            "forward's host syncs; off on CPU, where it pays off only after ~40 s of compilation")


class PretrainConfig(TrainConfig):
    max_steps: int = 300
    lr: float = 2e-3
    batch_size: int = 16
    kernels: Literal["auto", "liger", "none"] = Field(
        "auto", description="fused training kernels for the Llama hot path: liger (liger-kernel's RMSNorm, SwiGLU and "
                            "fused linear cross-entropy; CUDA only, `pip install llmcycle[gpu]`) | none | auto (liger "
                            "when training on CUDA with liger-kernel installed, else none)")


class LoraConfig(Section):
    enabled: bool = False
    r: int = Field(8, ge=1)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)


class SftConfig(TrainConfig):
    max_steps: int = 1200
    lr: float = 5e-4
    lora: LoraConfig = Field(default_factory=LoraConfig)


class RewardConfig(TrainConfig):
    max_steps: int = 150
    lr: float = 5e-4


class DpoConfig(TrainConfig):
    max_steps: int = 100
    lr: float = 1e-4
    beta: float = Field(0.1, gt=0, description="DPO temperature")
    nll_weight: float = Field(0.0, ge=0, description="weight of the chosen responses' per-token NLL added to the "
                                                     "DPO loss (RPO): keeps the real code likely, so alignment does "
                                                     "not cost bits per byte; 0 is plain DPO")


class PpoConfig(TrainConfig):
    max_steps: int = 30
    lr: float = 5e-5
    rollout_batch: int = Field(8, ge=1, description="prompts per rollout")
    max_new_tokens: int = Field(48, ge=1)
    ppo_epochs: int = Field(2, ge=1)
    kl_coef: float = Field(0.05, ge=0)
    kl_target: float = Field(6.0, gt=0, description="mean KL (nats/sequence) the policy should stay under")
    clip_range: float = Field(0.2, gt=0)
    value_clip: float = Field(0.2, gt=0)
    vf_coef: float = Field(0.5, ge=0)
    ent_coef: float = Field(0.0, ge=0)
    gamma: float = Field(1.0, gt=0, le=1)
    lam: float = Field(0.95, gt=0, le=1)


class FinetuneConfig(Section):
    method: Literal["dpo", "ppo"] = Field("dpo", description="alignment after SFT: dpo, or ppo (trains the reward model first)")


# ----------------------------------------------------------------------------- evaluation, registry, serving, monitoring
class EvaluateConfig(Section):
    n_prompts: int = Field(128, ge=1, description="held-out prompts (the SFT test split, then val) whose greedy "
                                                   "completions are checked per model (syntax-valid, defines-name)")
    max_new_tokens: int = Field(96, ge=1)
    pass_k: list[int] = Field(default_factory=lambda: [1, 4])
    pass_k_prompts: int = Field(32, ge=1, description="the first N of those prompts sampled max(pass_k) times for "
                                                       "pass@k (reported, never gated: sampling is the costly part)")
    temperature: float = Field(0.8, gt=0)
    top_p: float = Field(0.95, gt=0, le=1)
    test_batches: int = Field(16, ge=1, description="test windows for the (per-token, tokenizer-bound) perplexity shown alongside")
    test_max_bytes: int | None = Field(None, gt=0, description="test-split bits per byte over the first documents up to "
                                                              "this many UTF-8 bytes; null: the whole split")
    primary_metric: Literal["sft_bits_per_byte", "test_bits_per_byte", "sft_drifted_bits_per_byte"] = Field(
        "sft_bits_per_byte", description="the metric a challenger must significantly improve: bits per byte of the "
                                         "held-out SFT responses given their prompts, of the raw test split, or of "
                                         "the test split's drifted domain (what a retrain sets)")
    confidence: float = Field(0.95, gt=0.5, lt=1, description="gate: confidence of the paired bootstrap interval")
    bootstrap_samples: int = Field(2000, ge=100, description="gate: bootstrap resamples of the held-out documents")
    tolerances: dict[str, float] = Field(
        default_factory=lambda: {"test_bits_per_byte": 0.02, "syntax_valid_rate": 0.05, "defines_name_rate": 0.05},
        description="relative (bits per byte, lower is better) or absolute (rates) slack: a regression blocks "
                    "promotion only when a one-sided paired test at `confidence` puts it beyond this slack")

    @field_validator("tolerances")
    @classmethod
    def _gated_metrics(cls, v: dict[str, float]) -> dict[str, float]:
        known = {"sft_bits_per_byte", "test_bits_per_byte", "syntax_valid_rate", "defines_name_rate",
                 "sft_base_bits_per_byte", "sft_drifted_bits_per_byte"}
        unknown = sorted(set(v) - known)
        if unknown:
            raise ValueError(f"unknown gated metric(s) {unknown}; the gate scores {sorted(known)}")
        return v


class RegistryConfig(Section):
    model_name: str = "llmcycle"
    reward_model_name: str = "llmcycle-reward"
    request_timeout_s: float = Field(10.0, gt=0, description="a remote MLflow server: seconds per HTTP request "
                                                             "(MLFLOW_HTTP_REQUEST_TIMEOUT wins when set)")
    request_max_retries: int = Field(2, ge=0, description="HTTP retries (MLFLOW_HTTP_REQUEST_MAX_RETRIES wins)")
    request_backoff_factor: float = Field(1.0, ge=0, description="HTTP retry backoff (MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR wins)")


class Settings(Section):
    scoping: ScopingConfig = Field(default_factory=ScopingConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    sft: SftConfig = Field(default_factory=SftConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    dpo: DpoConfig = Field(default_factory=DpoConfig)
    ppo: PpoConfig = Field(default_factory=PpoConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    serving: ServingConfig = Field(default_factory=ServingConfig)
    monitoring: MonitoringConfig = Field(default_factory=MonitoringConfig)
    retrain: RetrainConfig = Field(default_factory=RetrainConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    loop: LoopConfig = Field(default_factory=LoopConfig)

    # Not part of params.yaml: where the file was read from (the project root for relative paths).
    _root: Path = Path(".")
    _source: str = "<defaults>"

    @property
    def root(self) -> Path:
        return self._root

    @property
    def source_file(self) -> str:
        return self._source

    def path(self, *parts: str | Path) -> Path:
        """A path under the project root (absolute paths pass through)."""
        p = Path(*parts)
        return p if p.is_absolute() else (self._root / p)

    def params_hash(self) -> str:
        """sha256 of the effective params (after overrides), stable across key order."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# ----------------------------------------------------------------------------- model presets
PRESETS: dict[str, dict[str, int]] = {
    # ~1-2M parameters with a 4k vocab: the CPU demo.
    "tiny": dict(n_layer=4, n_head=4, n_embd=128, block_size=256),
    # ~20M: a real single-GPU run.
    "small": dict(n_layer=6, n_head=8, n_embd=384, block_size=512),
    # GPT-2 small sized (~124M with a 50k vocab): for a GPU.
    "gpt2-124m": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024),
}


def _coerce(raw: str) -> Any:
    """`--set key=value`: parse the value as YAML so numbers, bools, null and lists work."""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def apply_overrides(data: dict, overrides: list[str] | None, source: str = "--set") -> dict:
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"{source}: expected dotted.key=value, got {item!r}")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"{source} {key}: {'.'.join(parts[:i + 1])} is not a section")
            node = child
        node[parts[-1]] = _coerce(raw)
    return data


def _format_error(err: ValidationError, source: str) -> str:
    msgs = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "<root>"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        msgs.append(f"{source}: {loc}: {msg}")
    return "; ".join(msgs)


def load(path: str | Path | None = "params.yaml", overrides: list[str] | None = None) -> Settings:
    """Read params.yaml (if it exists), apply `--set` overrides, validate. Raises ConfigError."""
    data: dict = {}
    root = Path.cwd()
    source = "<defaults>"
    if path is not None:
        p = Path(path).resolve()
        root = p.parent
        source = str(path)
        if p.exists():
            try:
                data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
            except yaml.YAMLError as exc:
                mark = getattr(exc, "problem_mark", None)
                where = f":{mark.line + 1}" if mark else ""
                raise ConfigError(f"{path}{where}: not valid YAML: {exc}") from None
            if not isinstance(data, dict):
                raise ConfigError(f"{path}: expected a mapping of stage sections at the top level")
        else:
            raise ConfigError(f"{path}: config file not found (--config)")
    data = apply_overrides(data, overrides)
    try:
        settings = Settings.model_validate(data)
    except ValidationError as err:
        src = source if not overrides else f"{source} (with --set {' '.join(overrides)})"
        raise ConfigError(_format_error(err, src)) from None
    settings._root = root
    settings._source = source
    return settings


def resolve_model_shape(settings: Settings, vocab_size: int | None = None) -> dict[str, int]:
    """The model shape the training stages build: preset (or scoping's choice) + explicit overrides."""
    m = settings.model
    if m.preset == "scoped":
        chosen = settings.path("data/scoping/model.json")
        base = json.loads(chosen.read_text()) if chosen.exists() else dict(PRESETS["tiny"])
    else:
        base = dict(PRESETS[m.preset])
    for key in ("n_layer", "n_head", "n_embd", "block_size", "intermediate_size"):
        value = getattr(m, key)
        if value is not None:
            base[key] = value
    if "intermediate_size" not in base or not base["intermediate_size"]:
        base["intermediate_size"] = max(32, int(round(base["n_embd"] * 8 / 3 / 32)) * 32)
    if base["n_embd"] % base["n_head"]:
        raise ConfigError(f"model: n_embd ({base['n_embd']}) must be divisible by n_head ({base['n_head']})")
    base["vocab_size"] = vocab_size or settings.tokenizer.vocab_size
    return base
