"""Promotion: register an evaluated candidate, gate it against the champion, move the aliases.

The gate never trusts numbers from another day: candidate and champion are both scored on the
current evaluation data (scorecard.for_version: cached per version, data hash and evaluate params).
The `metric.<name>` tags a version carries are a record of its own evaluation, not gate inputs.
Lineage tags come from the run that trained the weights (tracking.register_model). Re-runs are
idempotent: a version whose git_commit, data_hash and params_hash equal the current ones (with
git_dirty=false) is reused, and so is a gate decision it already carries and that took effect; a
version registered but never gated is gated. A dirty or non-git checkout always registers.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator

from components import tracking
from components.config import Settings
from components.errors import TrackingError
from components.evaluation import gate

METRIC_TAG = "metric."
DEDUP_TAGS = ("git_commit", "data_hash", "params_hash")


def version_metrics(mv: Any) -> dict[str, float]:
    """{name: value} from a ModelVersion's metric.<name> tags (unparsable values are left out)."""
    out = {}
    for key, value in (getattr(mv, "tags", None) or {}).items():
        if key.startswith(METRIC_TAG):
            try:
                out[key[len(METRIC_TAG):]] = float(value)
            except ValueError:
                continue
    return out


@contextlib.contextmanager
def deploy_run(settings: Settings) -> Iterator[Any]:
    """The active `deploy` run (the deploy flow opens one), else a new one nested as usual."""
    import mlflow

    active = mlflow.active_run()
    if active is not None and mlflow.MlflowClient().get_run(active.info.run_id).data.tags.get("stage") == "deploy":
        yield active
        return
    with tracking.stage_run(settings, "deploy") as run:
        yield run


def find_duplicate(settings: Settings) -> Any | None:
    """The newest version trained from the same clean commit, data and params, else None.

    Imported versions (no training run of this project behind them) never count: their lineage is the
    day they were imported, not what made their weights.
    """
    lineage = tracking.lineage_tags(settings)
    if lineage.get("git_dirty") != "false" or lineage.get("git_commit") in (None, "", "unknown"):
        return None
    tracking.configure(settings)
    name = settings.registry.model_name
    query = " and ".join([f"name = '{name}'", "tags.git_dirty = 'false'",
                          *(f"tags.{k} = '{lineage[k]}'" for k in DEDUP_TAGS)])
    found = [mv for mv in _client_call("searching versions", lambda c: c.search_model_versions(query))
             if (mv.tags or {}).get("stage") not in ("imported", "deploy")]
    return max(found, key=lambda mv: int(mv.version)) if found else None


def weights_run_id(settings: Settings, model_uri: str) -> str | None:
    """The id of the run that trained the weights behind model_uri, or None (an imported folder).

    runs:/<id>/...: that run; models:/<name>/<v> or @<alias>: the version's trained_run_id (else its source
    run); a stage's checkpoints/<stage>/hf: the run in run_id.txt beside it (as it is now).
    """
    from components.training.stages import parent_model_uri

    if model_uri.startswith("models:/"):
        name, _, ref = model_uri[len("models:/"):].partition("@")
        if ref:
            mv = tracking.get_alias_version(settings, name, ref)
        else:
            name, _, number = model_uri[len("models:/"):].rpartition("/")
            mv = _client_call(f"reading {model_uri}", lambda c: c.get_model_version(name, number))
        return None if mv is None else ((mv.tags or {}).get("trained_run_id") or mv.run_id or None)
    if model_uri.startswith("runs:/"):
        return tracking.run_id_of(model_uri)
    return tracking.run_id_of(parent_model_uri(settings, model_uri))


def _version_of_run(settings: Settings, run_id: str | None) -> Any | None:
    """A version already registered from the very training run run_id (one run, one version)."""
    if run_id is None:
        return None
    name = settings.registry.model_name
    query = f"name = '{name}' and tags.trained_run_id = '{run_id}'"
    found = _client_call("searching versions", lambda c: c.search_model_versions(query))
    return max(found, key=lambda mv: int(mv.version)) if found else None


def registrable_uri(settings: Settings, model_uri: str) -> str:
    """An URI mlflow.register_model accepts for model_uri.

    A stage's checkpoints/<stage>/hf maps back to the run that logged it (run_id.txt beside it);
    any other local folder is logged (transformers flavor) to the deploy run first.
    """
    if model_uri.startswith(("runs:/", "models:/")):
        return model_uri
    from components.errors import ConfigError
    from components.training.stages import parent_model_uri

    mapped = parent_model_uri(settings, model_uri)
    if mapped.startswith("runs:/"):
        return mapped
    path = settings.path(model_uri)
    if not (path / "config.json").is_file():
        raise ConfigError(f"promote: {model_uri!r} is neither an MLflow model URI nor a save_pretrained folder")
    from components.model.build import load_causal_lm

    model, tokenizer = load_causal_lm(settings, str(path))
    with deploy_run(settings):
        return tracking.log_hf_model(model, tokenizer, name="model", parent_uri=str(path))


def register_candidate(settings: Settings, model_uri: str, stage: str | None = None,
                       parent_version: str | None = None, description: str = "",
                       metrics: dict[str, float] | None = None, eval_run_id: str | None = None) -> str:
    """Register model_uri as a version of registry.model_name (or reuse a duplicate); returns the version.

    stage and parent_version default to the training run's (tracking.register_model). The version is
    tagged eval_run_id and metric.<name> for each finite metric at registration, in the same call.
    """
    import mlflow

    name = settings.registry.model_name
    client_tags = {f"{METRIC_TAG}{k}": repr(float(v)) for k, v in (metrics or {}).items()
                   if isinstance(v, (int, float)) and math.isfinite(float(v))}
    if eval_run_id:
        client_tags["eval_run_id"] = eval_run_id
    # Only the very same trained weights are a duplicate: a commit/data/params match could be another
    # stage's model (evaluate --model runs:/<sft run>), and an imported folder has no training run at all.
    tracking.configure(settings)
    dup = _version_of_run(settings, weights_run_id(settings, model_uri))
    if dup is None and model_uri.startswith(f"models:/{name}/"):
        dup = _client_call(f"reading {model_uri}", lambda c: c.get_model_version(name, model_uri.rsplit("/", 1)[1]))
    if dup is not None:
        version = str(dup.version)
        client_tags = {k: v for k, v in client_tags.items() if k not in (dup.tags or {})}  # fill gaps only
        client_tags["dedup_hits"] = str(int((dup.tags or {}).get("dedup_hits", "0")) + 1)
    else:
        mv = tracking.register_model(settings, registrable_uri(settings, model_uri), name, stage,
                                     parent_version,
                                     description or f"candidate from {model_uri}"
                                     + (f", evaluated in run {eval_run_id}" if eval_run_id else ""),
                                     extra_tags=client_tags)
        version = str(mv.version)
        client_tags = {}
    client = mlflow.MlflowClient()
    for key, value in client_tags.items():
        client.set_model_version_tag(name, version, key, value)
    return version


def promote(settings: Settings, version: str | int, reuse_decision: bool = True) -> dict[str, Any]:
    """Gate a registered version against the champion and move aliases (gate.apply_decision).

    Both are scored on today's evaluation data (scorecard.for_version). A version whose recorded
    gate_decision took effect returns that decision unless reuse_decision=False. A registry that
    cannot be read raises TrackingError before any alias moves.
    Returns {decision, reason, version, champion, previous, challenger, compared, reused, scored}.
    """
    from components.evaluation import scorecard

    tracking.configure(settings)
    name, version = settings.registry.model_name, str(version)
    mv = _client_call(f"reading {name} v{version}", lambda c: c.get_model_version(name, version))
    tags = mv.tags or {}
    aliases = _aliases(settings)
    # A recorded decision counts once it took effect: a reject, or a promote that moved champion
    # (the version is champion or previous, or was rolled back). A promote tag with no alias move
    # means an earlier gate died between tagging and moving aliases: decide again.
    settled = tags.get("gate_decision") == "reject" or tags.get("rolled_back") == "true" or \
        version in (aliases[gate.CHAMPION], aliases[gate.PREVIOUS])
    if reuse_decision and "gate_decision" in tags and settled:
        return {**aliases, "decision": tags["gate_decision"], "reason": tags.get("gate_reason", ""),
                "version": version, "compared": {}, "reused": True, "scored": {}}

    candidate, cand_src = scorecard.for_version(settings, mv, baselines=True)
    champ, champion, scored = None, None, {"candidate": cand_src}
    if aliases[gate.CHAMPION] is not None and aliases[gate.CHAMPION] != version:
        champ = _client_call("reading the champion", lambda c: c.get_model_version(name, aliases[gate.CHAMPION]))
        champion, scored["champion"] = scorecard.for_version(settings, champ)
    with deploy_run(settings):
        decision = gate.decide(candidate, champion, settings.scoping.success, settings.evaluate)
        _log_decision(name, version, champ, decision, scored)
        try:
            result = gate.apply_decision(settings, name, version, decision, expected_champion=aliases[gate.CHAMPION])
        except (gate.GateError, TrackingError):
            raise
        except Exception as exc:  # noqa: BLE001 - a store failure while moving aliases: one line, exit 1
            raise tracking.store_error(f"applying the gate decision to {name} v{version}", exc) from None
    # apply_decision can hand back int versions (ModelVersion.version); callers compare strings.
    result = {k: (str(v) if v is not None and k != "decision" else v) for k, v in result.items()}
    return {**result, "reason": decision.reason, "compared": decision.compared, "reused": False, "scored": scored}


def _client_call(what: str, fn: Any) -> Any:
    """fn(MlflowClient()) with any store failure turned into one TrackingError naming what was read."""
    import mlflow

    try:
        return fn(mlflow.MlflowClient())
    except Exception as exc:  # noqa: BLE001 - every store failure stops the gate the same way
        raise tracking.store_error(what, exc) from None


def _log_decision(name: str, version: str, champ: Any, decision: gate.GateDecision, scored: dict[str, str]) -> None:
    """The decision, its reason, where each scorecard came from and every compared number on the deploy run."""
    import mlflow

    mlflow.set_tags({**{f"scorecard.{who}": src[:250] for who, src in scored.items()},
                     "model_name": name, "candidate_version": version,
                     "champion_version": str(champ.version) if champ is not None else "none",
                     "gate_decision": "promote" if decision.promote else "reject",
                     "gate_reason": decision.reason[:5000]})
    numbers = {"gate_promote": float(decision.promote)}
    for metric, fields in decision.compared.items():
        for key, value in fields.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                numbers[f"gate.{metric}.{key}"] = float(value)
    mlflow.log_metrics(numbers)
    mlflow.log_dict({"decision": "promote" if decision.promote else "reject", "reason": decision.reason,
                     "candidate_version": version, "compared": decision.compared, "scored": scored},
                    "gate/decision.json")


def _aliases(settings: Settings) -> dict[str, str | None]:
    name = settings.registry.model_name
    out = {}
    for alias in (gate.CHAMPION, gate.PREVIOUS, gate.CHALLENGER):
        mv = tracking.get_alias_version(settings, name, alias)
        out[alias] = str(mv.version) if mv else None
    return out


def rollback(settings: Settings) -> dict[str, Any]:
    """Move champion back to previous (gate.rollback), recorded as a deploy run tagged action=rollback."""
    import mlflow

    name = settings.registry.model_name
    with deploy_run(settings):
        try:
            restored = gate.rollback(settings, name)
        except (gate.GateError, TrackingError):
            raise
        except Exception as exc:  # noqa: BLE001 - a store failure while moving aliases: one line, exit 1
            raise tracking.store_error(f"rolling back {name}", exc) from None
        mlflow.set_tags({"action": "rollback", "model_name": name, "champion_version": restored})
    return {"model": name, "champion": restored}


def latest_evaluation(settings: Settings, label: str | None = None, model_uri: str | None = None
                      ) -> dict[str, Any] | None:
    """{run_id, model_uri, metrics} of the newest finished evaluate run, of a label or model URI if given."""
    import mlflow

    tracking.configure(settings)
    query = "tags.stage = 'evaluate' and attributes.status = 'FINISHED'"
    for key, value in (("eval_label", label), ("model_uri", model_uri)):
        if value:
            query += f" and tags.{key} = '{value.replace(chr(39), '')}'"
    try:
        runs = mlflow.search_runs(experiment_names=[tracking.EXPERIMENT], filter_string=query,
                                  order_by=["start_time DESC"], max_results=1, output_format="list")
    except Exception as exc:  # noqa: BLE001
        raise tracking.store_error("searching evaluate runs", exc) from None
    if not runs:
        return None
    run = runs[0]
    return {"run_id": run.info.run_id, "model_uri": run.data.tags.get("model_uri"), "metrics": dict(run.data.metrics)}
