"""DVC glue: the data pipeline definition, repo setup, `dvc repro` and `dvc push` as subprocesses.

DVC takes a repo lock, so repro runs one at a time and is retried on a lock error (TRAPS.md).
The pipeline (dvc.yaml) is generated from PIPELINE here so tests can build the same pipeline in
a temp project (without the code deps, which only exist in the checkout).
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from components.config import Settings
from components.data import layout
from components.errors import ConfigError, DataError

CODE = "components/data"
RESOLVED = layout.RESOLVED_PARAMS


def pipeline(code_deps: bool = True) -> dict:
    """dvc.yaml as a dict: resolve -> ingest -> validate -> tokenizer -> datasets.

    `resolve` (always run) writes the params after --set and the source fingerprints (see
    components/data/resolve.py); every other stage is a `llmcycle data` command that reads those params
    through --config and declares params deps on them, never on params.yaml itself.
    """
    def deps(*paths: str) -> list[str]:
        return list(paths) + ([CODE] if code_deps else [])

    def params(*keys: str) -> list[dict]:
        return [{RESOLVED: list(keys)}]

    def cmd(stage: str) -> str:
        return f"llmcycle data {stage} --config {RESOLVED}"

    def report(stage: str) -> list[dict]:
        return [{f"data/reports/{stage}.json": {"cache": False}}]

    def fingerprint(what: str) -> str:
        return f"data/source/{what}.json"

    # Small, regenerated every repro, meaningless without the source: not cached, not pushed.
    uncached = [{path: {"cache": False}} for path in (RESOLVED, fingerprint("corpus"), fingerprint("finetune"))]
    return {"stages": {
        "resolve": {"cmd": "python -m components.data.resolve", "always_changed": True,
                    **({"deps": [CODE]} if code_deps else {}), "outs": uncached},
        "ingest": {"cmd": cmd("ingest"), "deps": deps(fingerprint("corpus")), "params": params("data"),
                   "outs": ["data/raw"], "metrics": report("ingest")},
        "validate": {"cmd": cmd("validate"), "deps": deps("data/raw"), "params": params("data"),
                     "outs": ["data/validation/corpus"], "metrics": report("validate")},
        "tokenizer": {"cmd": cmd("tokenizer"), "deps": deps("data/raw", "data/validation/corpus"),
                      "params": params("tokenizer"), "outs": ["data/processed/tokenizer"],
                      "metrics": report("tokenizer")},
        "datasets": {"cmd": cmd("datasets"),
                     "deps": deps("data/raw", "data/processed/tokenizer", fingerprint("finetune")),
                     "params": params("data", "model.block_size"),
                     "outs": ["data/processed/tokens", "data/processed/sft", "data/processed/preference",
                              "data/validation/finetune"],
                     "metrics": report("datasets")},
    }}


def write_pipeline(root: Path, code_deps: bool = True) -> Path:
    path = root / "dvc.yaml"
    header = "# Generated from components/data/dvc.py:pipeline() -- edit there (a test keeps them in sync).\n"
    path.write_text(header + yaml.safe_dump(pipeline(code_deps), sort_keys=False))
    return path


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The subprocess finds `llmcycle` in the same environment as this interpreter."""
    env = {**os.environ, **(extra or {})}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("DVC_NO_ANALYTICS", "1")
    return env


def dvc(settings: Settings, *args: str, check: bool = True,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=settings.root, env=_env(env),
                          capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise DataError(f"dvc {' '.join(args)} failed in {settings.root}: {_last_lines(proc)}")
    return proc


def _last_lines(proc: subprocess.CompletedProcess, n: int = 6) -> str:
    lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
    return " | ".join(lines[-n:])


def remote_path(settings: Settings) -> Path | str:
    """data.remote: a URL (s3://bucket/path; DVC's S3 plugin reads AWS_* and AWS_ENDPOINT_URL_S3 from the
    environment) passes as is; anything else is a directory, relative to the project root."""
    if "://" in settings.data.remote:
        return settings.data.remote
    return settings.path(settings.data.remote).resolve()


def ensure_repo(settings: Settings) -> None:
    """`dvc init` when needed (inside git if there is one), analytics off, the local remote configured."""
    root = settings.root
    if not (root / ".dvc").exists():
        args = ["init", "-q"] + ([] if (root / ".git").exists() else ["--no-scm"])
        dvc(settings, *args)
    dvc(settings, "config", "core.analytics", "false")
    remote = remote_path(settings)
    if isinstance(remote, Path):
        remote.mkdir(parents=True, exist_ok=True)
    # --local: the remote's path is per machine, so it lives in .dvc/config.local (git-ignored).
    dvc(settings, "remote", "add", "--local", "-f", "-d", "llmcycle", str(remote))
    if not (root / "dvc.yaml").exists():
        write_pipeline(root)


def repro(settings: Settings, targets: tuple[str, ...] = (), attempts: int = 4,
          overrides: list[str] | None = None) -> str:
    """Run `dvc repro` with this run's config and overrides; retry only on a lock held by another DVC
    process. Returns DVC's output.

    The config and overrides travel in the environment to the `resolve` stage (components/data/resolve.py),
    which writes the params every other stage reads. A failing stage raises DataError carrying the
    stage's own error line (e.g. the failed expectation).
    """
    from components.data.resolve import stage_env

    # Path(...).resolve() as components.config.load did: a relative --config is relative to the cwd.
    config = None if settings.source_file == "<defaults>" else Path(settings.source_file).resolve()
    env = stage_env(config, overrides or [])
    for attempt in range(1, attempts + 1):
        proc = dvc(settings, "repro", *targets, check=False, env=env)
        if proc.returncode == 0:
            return proc.stdout
        text = proc.stderr + proc.stdout
        if "lock" in text.lower() and "unable to acquire" in text.lower() and attempt < attempts:
            time.sleep(2.0 * attempt)
            continue
        raise DataError(_stage_error(text) or f"dvc repro failed: {_last_lines(proc)}")
    raise DataError("dvc repro: the repository stayed locked by another DVC process")


def _stage_error(text: str) -> str | None:
    """The `error: ...` block our CLI printed inside the failing stage (first line + indented detail)."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("error: "):
            block = [line[len("error: "):]]
            block += [ln for ln in _takewhile_indented(lines[i + 1:])]
            return "\n".join(block)
    return None


def _takewhile_indented(lines: list[str]) -> list[str]:
    out = []
    for ln in lines:
        if not ln.startswith((" ", "\t")):
            break
        out.append(ln)
    return out


def push(settings: Settings) -> Path | str:
    if not (settings.root / ".dvc").exists():
        raise ConfigError(f"{settings.root}: not a DVC repository (run `make setup` or `llmcycle run` first)")
    ensure_repo(settings)
    dvc(settings, "push", "-r", "llmcycle")
    return remote_path(settings)


def status_clean(settings: Settings) -> bool:
    """True when `dvc status` reports nothing to rerun besides `resolve`, which is always changed by design."""
    proc = dvc(settings, "status", "--json", check=False)
    if proc.returncode != 0:
        return False
    import json

    changed = json.loads(proc.stdout or "{}")
    return all(name == "resolve" or name.endswith(":resolve") for name in changed)
