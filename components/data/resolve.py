"""The `resolve` stage, first in dvc.yaml: it fixes what the other DVC stages read, so `--set` reaches them.

`dvc repro` runs each stage as a subprocess that cannot see `llmcycle run --set ...`. The data flow
therefore hands its config path and overrides to DVC's environment (LLMCYCLE_CONFIG, LLMCYCLE_SET),
and this stage (always run, cheap) writes three DVC outputs:

    params.resolved.yaml       the data-shaping params after overrides: data (minus the remote),
                               tokenizer, and model.block_size resolved from the preset or scoping plan.
                               The other stages declare their params on it and read it via --config.
    data/source/corpus.json    content fingerprint of data.source (ingest depends on it)
    data/source/finetune.json  content fingerprint of data.sft_jsonl / preference_jsonl (datasets)

As outputs they land in dvc.lock, so the data hash built from it names the source content and the
params that really made the data. params.yaml in git is never touched, and a plain `dvc repro` (no
environment) resolves params.yaml as it is; `LLMCYCLE_SET='data.source=dir:/x' dvc repro` works too.
Not `dvc exp run --set-param`: it edits params.yaml in the workspace and needs a commit to start from,
so every override would dirty the checkout (and the lineage tag git_dirty with it). Not DVC deps on
the source path itself: dvc.yaml is static while data.source changes per run, and the stdlib folder
holds its tests (excluded here) and a machine-specific path that would then sit in dvc.lock.
Compromises: the fingerprints re-read the source on every repro (about the cost of ingest's own read);
the config must sit in the project root (components.config takes the root from the config's folder).
"""
from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

import yaml

from components.config import Settings, resolve_model_shape
from components.data import layout
from components.data.io import atomic_write_json, atomic_write_text
from components.data.sources import file_sha256, fingerprint, resolve_source
from components.errors import ConfigError, DataError

CONFIG_ENV = "LLMCYCLE_CONFIG"
SET_ENV = "LLMCYCLE_SET"
FINETUNE_KEYS = ("sft_jsonl", "preference_jsonl")
# Keys that do not shape the data: where it is pushed. Left out so moving the remote keeps the data hash.
NOT_DATA = {"remote"}

# Static on purpose: the file's hash is in dvc.lock and the data hash, so naming the run's overrides here
# (say --set pretrain.lr=...) would change the data hash of identical data.
HEADER = ("# Written by the `resolve` DVC stage (components/data/resolve.py) from the run's config and --set.\n"
          "# The data stages read this file, not params.yaml: do not edit; edit params.yaml or use --set.\n")


def stage_env(config: str | Path | None, overrides: list[str]) -> dict[str, str]:
    """The environment that carries a run's config and overrides into `dvc repro` (one override a line).

    Both keys are always set (empty when unused) so a value inherited from the caller's shell cannot leak in.
    """
    for item in overrides:
        if "\n" in item:
            raise ConfigError(f"--set {item!r}: a value with a line break cannot reach the DVC stages")
    return {CONFIG_ENV: str(Path(config).resolve()) if config else "", SET_ENV: "\n".join(overrides)}


def from_env(environ: Mapping[str, str]) -> tuple[str, list[str]]:
    """(config path, overrides) that stage_env put in the environment; params.yaml and none without it."""
    overrides = [ln for ln in environ.get(SET_ENV, "").splitlines() if ln.strip()]
    return environ.get(CONFIG_ENV) or "params.yaml", overrides


def resolved_params(settings: Settings) -> dict:
    """The params the data stages depend on, after overrides, with the block size the model will use."""
    return {
        "data": settings.data.model_dump(mode="json", exclude=NOT_DATA),
        "tokenizer": settings.tokenizer.model_dump(mode="json"),
        # Only the block size: datasets drops pairs longer than it. The rest of the shape is not data.
        "model": {"block_size": int(resolve_model_shape(settings)["block_size"])},
    }


def finetune_fingerprint(settings: Settings) -> dict:
    out: dict = {}
    for key in FINETUNE_KEYS:
        raw = getattr(settings.data, key)
        if raw is None:
            out[key] = None
            continue
        path = settings.path(Path(raw).expanduser())
        if not path.is_file():
            raise ConfigError(f"data.{key}: file does not exist: {path}")
        out[key] = file_sha256(path)
    return out


def run(settings: Settings) -> dict:
    """Write params.resolved.yaml and the source fingerprints; return them (the stage's report)."""
    params = resolved_params(settings)
    corpus = fingerprint(resolve_source(settings), settings)
    finetune = finetune_fingerprint(settings)
    atomic_write_text(layout.resolved_params_path(settings), HEADER + yaml.safe_dump(params, sort_keys=False))
    atomic_write_json(layout.fingerprint_path(settings, "corpus"), corpus)
    atomic_write_json(layout.fingerprint_path(settings, "finetune"), finetune)
    return {"params": params, "corpus": corpus, "finetune": finetune}


def check_used(settings: Settings) -> None:
    """After `dvc repro`: the params the stages read are this run's, else DataError naming the keys.

    Guards the data hash against a stage that read something else (another run's resolve in between).
    """
    path = layout.resolved_params_path(settings)
    if not path.exists():
        raise DataError(f"{path}: missing after dvc repro (the `resolve` stage did not run)")
    used = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    wanted = resolved_params(settings)
    diff = [f"{section}.{key}" for section, values in wanted.items() for key, value in values.items()
            if (used.get(section) or {}).get(key) != value]
    if diff:
        raise DataError(f"{path}: the DVC stages read other params than this run's ({', '.join(diff)}); "
                        f"was another `dvc repro` running in {settings.root}?")


def main() -> int:
    """`python -m components.data.resolve`, the stage's command: run in the project root by `dvc repro`."""
    from components import config as cfg
    from components.tracking import quiet_env

    quiet_env()
    config, overrides = from_env(os.environ)
    try:
        settings = cfg.load(config, overrides)
        if settings.root.resolve() != Path.cwd().resolve():
            raise ConfigError(f"{CONFIG_ENV}={config}: the config must sit in the DVC project root "
                              f"{Path.cwd()} (its folder is the root for every relative path)")
        report = run(settings)
    except (ConfigError, DataError) as exc:
        # The same `error: ` line as the llmcycle CLI, which components.data.dvc lifts into DataError.
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    c = report["corpus"]
    print(f"resolve: data.source={settings.data.source} ({c['files']} files, sha256 {c['sha256'][:12]}), "
          f"block_size {report['params']['model']['block_size']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
