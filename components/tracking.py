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
from components.errors import TrackingError
from components.tracking_http import bound_http_retries, check_credentials, check_reachable  # noqa: F401 - re-exported

EXPERIMENT = "llmcycle"
# The MLflow 3 UI opens an experiment on the view its kind names: training runs, not the GenAI overview that
# the evaluation's genai traces would otherwise pick.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
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
    """Point MLflow at the project's store and experiment; returns the experiment id.

    A remote store is probed first (check_reachable), so a wrong URI or a stopped server is one clear
    TrackingError within seconds, not minutes of client retries and a traceback.
    """
    quiet_env()
    import mlflow

    uri = tracking_uri(settings)
    if uri.startswith(("http://", "https://")):
        bound_http_retries(settings)
        check_reachable(uri, settings.registry.request_timeout_s)
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        settings.path("mlflow", "artifacts").mkdir(parents=True, exist_ok=True)
    global _LAST_SET_URI
    env = os.environ.get("MLFLOW_TRACKING_URI")
    named_by_env = env == uri and env != _LAST_SET_URI
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    # Only a URI we exported ourselves is ignored later; one the user's environment names stays in force.
    _LAST_SET_URI = None if named_by_env else uri
    client = mlflow.MlflowClient()
    try:
        exp = client.get_experiment_by_name(EXPERIMENT)
        if exp is None:
            location = artifact_location(settings) if uri.startswith("sqlite:") else None
            exp_id = client.create_experiment(EXPERIMENT, artifact_location=location, tags=dict([EXPERIMENT_KIND]))
        else:
            exp_id = exp.experiment_id
            if exp.tags.get(EXPERIMENT_KIND[0]) != EXPERIMENT_KIND[1]:
                client.set_experiment_tag(exp_id, *EXPERIMENT_KIND)
        mlflow.set_experiment(experiment_id=exp_id)
    except Exception as exc:  # noqa: BLE001 - a locked or broken store: one clear line, not a traceback
        raise store_error(f"opening experiment {EXPERIMENT!r} at {uri}", exc) from None
    return exp_id


def store_error(what: str, exc: Exception) -> TrackingError:
    """A one-line TrackingError for a failed store call (the first line of MLflow's message)."""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
    return TrackingError(f"{what}: the MLflow store failed ({type(exc).__name__}: {first})")


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
    with parent_run(settings, "lifecycle") as run:
        yield run


@contextlib.contextmanager
def parent_run(settings: Settings, stage: str, tags: dict[str, str] | None = None) -> Iterator[Any]:
    """A run the stage runs started inside it nest under (lifecycle, retrain), in-process and across
    processes (LLMCYCLE_PARENT_RUN_ID). Nested itself when a run is already active."""
    configure(settings)
    import mlflow

    with mlflow.start_run(run_name=stage, nested=mlflow.active_run() is not None,
                          tags={**lineage_tags(settings, stage), **(tags or {})}) as run:
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


def newest_run(settings: Settings, stage: str, where: str = "") -> Any | None:
    """The newest FINISHED run of a stage (tag stage=<stage>), with an extra MLflow filter ("metrics.x = 1")."""
    import mlflow
    configure(settings)
    query = f"tags.stage = '{stage}' and attributes.status = 'FINISHED'" + (f" and {where}" if where else "")
    try:
        runs = mlflow.search_runs(experiment_names=[EXPERIMENT], filter_string=query, order_by=["start_time DESC"],
                                  max_results=1, output_format="list")
    except Exception as exc:  # noqa: BLE001
        raise store_error(f"searching {stage} runs", exc) from None
    return runs[0] if runs else None


def get_run(settings: Settings, run_id: str) -> Any | None:
    """The run with this id, None when the store has no such run (TrackingError when it cannot be read)."""
    import mlflow
    from mlflow.exceptions import MlflowException
    configure(settings)
    try:
        return mlflow.MlflowClient().get_run(run_id)
    except MlflowException as exc:
        if getattr(exc, "error_code", "") == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise store_error(f"reading run {run_id}", exc) from None


def child_runs(settings: Settings, parent_run_id: str) -> list[Any]:
    """Runs nested under a parent run (for tests, reports and the CLI)."""
    import mlflow
    configure(settings)
    return mlflow.search_runs(
        experiment_names=[EXPERIMENT], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
        output_format="list")


# ----------------------------------------------------------------------------- registry
LINEAGE_KEYS = ("git_commit", "git_dirty", "params_hash", "data_hash")


def run_id_of(model_uri: str) -> str | None:
    """<id> of runs:/<id>/<path>, else None."""
    if not model_uri.startswith("runs:/"):
        return None
    return model_uri[len("runs:/"):].split("/", 1)[0] or None


def training_lineage(settings: Settings, model_uri: str, max_hops: int = 16) -> dict[str, str] | None:
    """Lineage of the run that trained the weights at runs:/<id>/...: its git commit, dirty flag, params and
    data hashes and stage, and parent_version: the registered version the chain of parent_model_uri tags
    starts from (models:/<name>/<v>, or the version recorded when an alias was resolved), "none" from scratch.
    None for a model that no run trained (an imported folder).
    """
    import mlflow

    run_id = run_id_of(model_uri)
    if run_id is None:
        return None
    client = mlflow.MlflowClient()
    try:
        tags = client.get_run(run_id).data.tags
    except Exception as exc:  # noqa: BLE001 - a registry that cannot tell lineage must not invent it
        raise store_error(f"reading the training run {run_id}", exc) from None
    out = {k: tags[k] for k in LINEAGE_KEYS if k in tags}
    # A folder `llmcycle promote --model` logged itself (in its deploy run) was not trained here.
    out["stage"] = "imported" if tags.get("stage") == "deploy" else tags.get("stage", "unknown")
    out["trained_run_id"] = run_id
    out["parent_version"] = _parent_version(client, tags, max_hops)
    return out


def _parent_version(client: Any, tags: dict[str, str], max_hops: int) -> str:
    """Walk parent_model_uri tags (sft -> pretrain -> ...) to the registered version the chain started from.

    "none": the chain starts from scratch; "external": from a folder or URI that is no run or version of
    this store (its path stays in the parent_model_uri tag); "unknown": the chain is longer than max_hops.
    """
    for _ in range(max_hops):
        uri = tags.get("parent_model_uri", "")
        if tags.get("parent_model_version"):
            return tags["parent_model_version"]
        if not uri:
            return "none"
        if uri.startswith("models:/") and "@" not in uri:
            return uri.rsplit("/", 1)[1]
        hop = run_id_of(uri)
        if hop is None:
            return "external"
        try:
            tags = client.get_run(hop).data.tags
        except Exception as exc:  # noqa: BLE001
            raise store_error(f"reading the parent run {hop}", exc) from None
    return "unknown"


def register_model(settings: Settings, model_uri: str, name: str, stage: str | None = None,
                   parent_version: str | None = None, description: str = "",
                   extra_tags: dict[str, str] | None = None) -> Any:
    """Register a logged model, tagged in the same call with the lineage of the run that trained it.

    A model no run trained (an imported folder) gets today's lineage and stage "imported". stage and
    parent_version, when given, override what the run says. Returns the ModelVersion.
    """
    configure(settings)
    import mlflow

    trained = training_lineage(settings, model_uri)
    if trained is None:
        now = lineage_tags(settings)
        trained = {**{k: now[k] for k in LINEAGE_KEYS}, "stage": "imported", "parent_version": "none"}
    if stage:
        trained["stage"] = stage
    if parent_version:
        trained["parent_version"] = parent_version
    tags = {**trained, **(extra_tags or {})}
    summary = (f"Trained on data.source={settings.data.source} (data_hash {trained.get('data_hash', '?')} from "
               f"dvc.lock), params_hash {trained.get('params_hash', '?')}, git {trained.get('git_commit', '?')[:12]}"
               f"{' (dirty)' if trained.get('git_dirty') == 'true' else ''}; stage {trained['stage']}"
               f"{', run ' + trained['trained_run_id'] if 'trained_run_id' in trained else ''}.")
    try:
        mv = mlflow.register_model(model_uri, name, tags=tags)
        mlflow.MlflowClient().update_model_version(name, mv.version, description=f"{description}\n\n{summary}".strip())
    except Exception as exc:  # noqa: BLE001
        raise store_error(f"registering {model_uri} as {name}", exc) from None
    return mv


def set_alias(settings: Settings, name: str, alias: str, version: str) -> None:
    configure(settings)
    import mlflow
    mlflow.MlflowClient().set_registered_model_alias(name, alias, str(version))


def alias_missing(exc: Exception) -> bool:
    """True only for MLflow's "no such model" / "no such alias" answers, never for a store failure."""
    code = getattr(exc, "error_code", "")
    text = str(exc)
    return code == "RESOURCE_DOES_NOT_EXIST" or (
        code == "INVALID_PARAMETER_VALUE" and "alias" in text and "not found" in text)


def get_alias_version(settings: Settings, name: str, alias: str) -> Any | None:
    """The ModelVersion behind an alias; None only when the model or the alias truly does not exist.

    Any other failure (a locked database, a server outage) raises TrackingError: the gate must stop,
    not mistake an unreadable registry for "no champion yet".
    """
    configure(settings)
    import mlflow
    from mlflow.exceptions import MlflowException
    try:
        return mlflow.MlflowClient().get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if alias_missing(exc):
            return None
        raise store_error(f"reading alias {name}@{alias}", exc) from None
    except Exception as exc:  # noqa: BLE001 - sqlalchemy / requests errors below MLflow's own type
        raise store_error(f"reading alias {name}@{alias}", exc) from None


# ----------------------------------------------------------------------------- artifacts
# Explicit requirements: computing defaults fails offline (TRAPS.md), and they document the model.
MODEL_PIP_REQUIREMENTS = ["torch==2.13.0", "transformers==5.24.0", "tokenizers==0.23.3", "safetensors"]


def log_hf_model(model: Any, tokenizer: Any, task: str = "text-generation", name: str = "model",
                 parent_uri: str | None = None) -> str:
    """Log a HF model + tokenizer with the transformers flavor (safetensors) to the active run.

    Returns the `runs:/<id>/<name>` URI. parent_uri becomes the `parent_model_uri` lineage tag.
    """
    import mlflow

    from components import quiet

    quiet.third_party()

    run = mlflow.active_run()
    if run is None:
        raise RuntimeError("log_hf_model needs an active MLflow run (use tracking.stage_run)")
    if parent_uri:
        mlflow.set_tag("parent_model_uri", parent_uri)
        if parent_uri.startswith("models:/") and "@" in parent_uri:
            # An alias moves: record the version it named when these weights started from it.
            name, alias = parent_uri[len("models:/"):].split("@", 1)
            client = mlflow.MlflowClient()
            mlflow.set_tag("parent_model_version", str(client.get_model_version_by_alias(name, alias).version))
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


# ----------------------------------------------------------------------------- run outputs (monitor, retrain)
WINDOW_ARTIFACT = "window/requests.jsonl"


def log_outputs(metrics: dict[str, float] | None = None, tags: dict[str, str] | None = None,
                files: dict[str, Path] | None = None, texts: dict[str, str] | None = None) -> None:
    """Metrics, tags, files (artifact folder -> local file) and texts (artifact file -> content) on the active run."""
    import math

    import mlflow

    if metrics:
        mlflow.log_metrics({k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))})
    if tags:
        mlflow.set_tags({k: str(v)[:5000] for k, v in tags.items()})
    for folder, path in (files or {}).items():
        mlflow.log_artifact(str(path), artifact_path=folder or None)
    for name, text in (texts or {}).items():
        mlflow.log_text(text, name)


def set_run_tags(settings: Settings, run_id: str, tags: dict[str, str]) -> None:
    """Tag a finished run (e.g. what the alert after a monitor run did)."""
    configure(settings)
    import mlflow

    client = mlflow.MlflowClient()
    for k, v in tags.items():
        client.set_tag(run_id, k, str(v)[:5000])


def download_window(settings: Settings, monitor_run_id: str, dst: Path | None = None) -> Path:
    """The exact request records a monitor run judged (its `window/requests.jsonl` artifact), downloaded.

    TrackingError when the run or the artifact does not exist (a run id from another store, a run that
    judged nothing).
    """
    configure(settings)
    import mlflow

    try:
        local = mlflow.artifacts.download_artifacts(run_id=monitor_run_id, artifact_path=WINDOW_ARTIFACT,
                                                    dst_path=str(dst) if dst else None)
    except Exception as exc:  # noqa: BLE001 - MlflowException or OSError: both mean "not there"
        raise store_error(f"downloading {WINDOW_ARTIFACT} of monitor run {monitor_run_id}", exc) from None
    return Path(local)
