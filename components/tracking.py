"""The one place that talks to MLflow: tracking URI, experiment, stage runs, lineage tags, registry.

Embedded default: sqlite:///<project>/mlflow/mlflow.db with artifacts in <project>/mlflow/artifacts
(never ./mlruns). MLFLOW_TRACKING_URI points the same code at a shared server. Stage runs nest under
the `lifecycle` run: in-process through MLflow's active run, across processes through the
LLMCYCLE_PARENT_RUN_ID environment variable. mlflow is imported inside functions (CLI start-up time).
"""
from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path
from typing import Any, Iterator

import yaml

from components.config import Settings

EXPERIMENT = "llmcycle"
PARENT_ENV = "LLMCYCLE_PARENT_RUN_ID"


def quiet_env() -> None:
    """Telemetry off and offline everywhere (set before heavy imports)."""
    for key, value in {
        "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "GX_ANALYTICS_ENABLED": "false",
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_DISABLE_TELEMETRY": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    }.items():
        os.environ.setdefault(key, value)


# mlflow.set_tracking_uri() exports MLFLOW_TRACKING_URI into the process environment; remember what we
# set so a later project in the same process (tests, notebooks) is not sent to the first one's store.
_LAST_SET_URI: str | None = None


def tracking_uri(settings: Settings) -> str:
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env and env != _LAST_SET_URI:
        return env
    return f"sqlite:///{settings.path('mlflow', 'mlflow.db').resolve()}"


def artifact_location(settings: Settings) -> str:
    return settings.path("mlflow", "artifacts").resolve().as_uri()


def configure(settings: Settings) -> str:
    """Point MLflow at the project's store and experiment; returns the experiment id."""
    quiet_env()
    import mlflow

    uri = tracking_uri(settings)
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        settings.path("mlflow", "artifacts").mkdir(parents=True, exist_ok=True)
    global _LAST_SET_URI
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    _LAST_SET_URI = uri
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(EXPERIMENT)
    if exp is None:
        location = artifact_location(settings) if uri.startswith("sqlite:") else None
        exp_id = client.create_experiment(EXPERIMENT, artifact_location=location)
    else:
        exp_id = exp.experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


# ----------------------------------------------------------------------------- lineage
def git_state(root: Path) -> dict[str, str]:
    """Commit and dirty flag of the project checkout ('unknown' outside git)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD") or "unknown"
        dirty = "true" if git("status", "--porcelain", "--untracked-files=no") else "false"
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "unknown", "unknown"
    return {"git_commit": commit, "git_dirty": dirty}


def dvc_lock_hashes(root: Path) -> dict[str, str]:
    """Output hashes recorded in dvc.lock, keyed by output path (empty before the first repro)."""
    lock = root / "dvc.lock"
    if not lock.exists():
        return {}
    doc = yaml.safe_load(lock.read_text()) or {}
    hashes: dict[str, str] = {}
    for stage in (doc.get("stages") or {}).values():
        for out in stage.get("outs") or []:
            hashes[out["path"]] = out.get("md5") or out.get("etag") or ""
    return hashes


def data_hash(root: Path) -> str:
    """One short hash over all dvc.lock outputs: the data version a run read."""
    import hashlib
    hashes = dvc_lock_hashes(root)
    if not hashes:
        return "none"
    blob = "\n".join(f"{k}={v}" for k, v in sorted(hashes.items()))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def lineage_tags(settings: Settings, stage: str | None = None) -> dict[str, str]:
    tags = {**git_state(settings.root), "params_hash": settings.params_hash(), "data_hash": data_hash(settings.root)}
    for path, h in dvc_lock_hashes(settings.root).items():
        tags[f"dvc.{path}"] = h
    if stage:
        tags["stage"] = stage
    return tags


# ----------------------------------------------------------------------------- runs
@contextlib.contextmanager
def stage_run(settings: Settings, stage: str, params: dict[str, Any] | None = None,
              tags: dict[str, str] | None = None) -> Iterator[Any]:
    """An MLflow run named after its stage, nested under the active or env-given lifecycle run.

    A run that raises is marked FAILED (MLflow's context manager does this), and the error re-raised.
    """
    configure(settings)
    import mlflow

    parent = mlflow.active_run()
    parent_id = parent.info.run_id if parent else os.environ.get(PARENT_ENV)
    all_tags = {**lineage_tags(settings, stage), **(tags or {})}
    if parent_id:
        all_tags["mlflow.parentRunId"] = parent_id
    # nested=True lets an in-process parent stay active; the parentRunId tag covers the cross-process case.
    with mlflow.start_run(run_name=stage, nested=parent is not None, tags=all_tags) as run:
        if params:
            mlflow.log_params(_flatten(params))
        yield run


@contextlib.contextmanager
def lifecycle_run(settings: Settings) -> Iterator[Any]:
    """The parent `lifecycle` run; exported to child processes through LLMCYCLE_PARENT_RUN_ID."""
    configure(settings)
    import mlflow

    with mlflow.start_run(run_name="lifecycle", tags=lineage_tags(settings, "lifecycle")) as run:
        mlflow.log_params(_flatten(settings.model_dump(mode="json")))
        previous = os.environ.get(PARENT_ENV)
        os.environ[PARENT_ENV] = run.info.run_id
        try:
            yield run
        finally:
            if previous is None:
                os.environ.pop(PARENT_ENV, None)
            else:
                os.environ[PARENT_ENV] = previous


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, f"{key}."))
        else:
            out[key] = str(v)[:500]
    return out


def child_runs(settings: Settings, parent_run_id: str) -> list[Any]:
    """Runs nested under a parent run (for tests, reports and the CLI)."""
    import mlflow
    configure(settings)
    return mlflow.search_runs(
        experiment_names=[EXPERIMENT], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
        output_format="list")


# ----------------------------------------------------------------------------- registry
def register_model(settings: Settings, model_uri: str, name: str, stage: str,
                   parent_version: str | None = None, description: str = "") -> Any:
    """Register a logged model and tag the version with its lineage. Returns the ModelVersion."""
    configure(settings)
    import mlflow

    mv = mlflow.register_model(model_uri, name)
    client = mlflow.MlflowClient()
    tags = lineage_tags(settings, stage)
    tags["parent_version"] = parent_version or "none"
    for key in ("git_commit", "git_dirty", "params_hash", "data_hash", "stage", "parent_version"):
        client.set_model_version_tag(name, mv.version, key, tags[key])
    trained_on = (f"Trained on data.source={settings.data.source} (data_hash {tags['data_hash']} from dvc.lock), "
                  f"params_hash {tags['params_hash']}, git {tags['git_commit'][:12]}"
                  f"{' (dirty)' if tags['git_dirty'] == 'true' else ''}; stage {stage}.")
    client.update_model_version(name, mv.version, description=f"{description}\n\n{trained_on}".strip())
    return mv


def set_alias(settings: Settings, name: str, alias: str, version: str) -> None:
    configure(settings)
    import mlflow
    mlflow.MlflowClient().set_registered_model_alias(name, alias, str(version))


def get_alias_version(settings: Settings, name: str, alias: str) -> Any | None:
    """The ModelVersion behind an alias, or None when the model or alias does not exist."""
    configure(settings)
    import mlflow
    from mlflow.exceptions import MlflowException
    try:
        return mlflow.MlflowClient().get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


# ----------------------------------------------------------------------------- artifacts
# Explicit requirements: computing defaults fails offline (TRAPS.md), and they document the model.
MODEL_PIP_REQUIREMENTS = ["torch==2.13.0", "transformers==5.24.0", "tokenizers==0.23.3", "safetensors"]


def log_hf_model(model: Any, tokenizer: Any, task: str = "text-generation", name: str = "model",
                 parent_uri: str | None = None) -> str:
    """Log a HF model + tokenizer with the transformers flavor (safetensors) to the active run.

    Returns the `runs:/<id>/<name>` URI. parent_uri becomes the `parent_model_uri` lineage tag.
    """
    import mlflow

    run = mlflow.active_run()
    if run is None:
        raise RuntimeError("log_hf_model needs an active MLflow run (use tracking.stage_run)")
    if parent_uri:
        mlflow.set_tag("parent_model_uri", parent_uri)
    mlflow.transformers.log_model(
        transformers_model={"model": model, "tokenizer": tokenizer}, name=name, task=task,
        pip_requirements=MODEL_PIP_REQUIREMENTS, save_pretrained=True,
    )
    return f"runs:/{run.info.run_id}/{name}"


def download_model_dir(settings: Settings, model_uri: str, dst: Path | None = None) -> Path:
    """Download a logged transformers model and return the folder holding config.json (for from_pretrained)."""
    configure(settings)
    import mlflow

    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dst) if dst else None))
    for candidate in (local / "model", local):
        if (candidate / "config.json").exists():
            return candidate
    hits = list(local.rglob("config.json"))
    if not hits:
        raise FileNotFoundError(f"{model_uri}: no config.json in the logged model at {local}")
    return hits[0].parent
