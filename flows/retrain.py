"""The retrain flow: drifted window + feedback -> new DVC data version -> challenger from the champion -> gate.

One `retrain` MLflow run tagged monitor_run_id; the data, sft, dpo (or reward, ppo), evaluate and deploy
runs nest under it. The gate is the deploy flow's (flows/deploy.py), so a promotion moves the aliases
and tells the running server to swap. Single flight: a second retrain while one runs returns
already_running (components/monitoring/retrain.py); too little new feedback returns not_enough_data.
"""
from __future__ import annotations

from prefect import flow, task

from components import config as cfg
from components import tracking
from flows import artifacts, run_names


@task(name="build-feedback-data")
def build_data_task(config: str, overrides: list[str], monitor_run_id: str) -> dict:
    """Window + feedback -> data/retrain/ files; the merge report (usable, dropped, holdout ...)."""
    from components.monitoring import feedback
    from components.monitoring.retrain import monitor_run, window_info

    settings = cfg.load(config, overrides)
    run = monitor_run(settings, monitor_run_id)
    dropped: list = []
    window = [rec for _, rec in feedback.read_lenient(tracking.download_window(settings, run.info.run_id), dropped)]
    pairs = feedback.build_pairs(window, feedback.feedback_files(settings), feedback.request_logs(settings))
    files, report = feedback.merge(settings, pairs, {**window_info(run), "records": len(window)})
    folder = feedback.write_version(settings, files, report)
    return {**report, "folder": str(folder), "dropped_rows": [f"{d.where}: {d.reason}" for d in pairs.dropped[:100]]}


@task(name="finetune-from-champion")
def finetune_task(config: str, overrides: list[str], champion_uri: str) -> dict:
    from components.training.stages import finetune

    result = finetune(cfg.load(config, overrides), init_from=champion_uri)
    return {"model_uri": result["model_uri"], "run_id": result["run_id"],
            "stages": {k: v.get("run_id") for k, v in result["stages"].items()}}


@task(name="old-vs-new")
def compare_task(config: str, overrides: list[str], champion: str, challenger: str) -> dict[str, float]:
    """Both versions on the held-out drifted slice and the SFT test split from before this data version,
    plus the gate's own figures (raw test split, today's SFT test split)."""
    from components.data import io
    from components.monitoring.feedback import retrain_dir
    from components.monitoring.retrain import bits_per_byte, gate_figures

    settings = cfg.load(config, overrides)
    name = settings.registry.model_name
    sets = {label: [row for _, row in io.read_jsonl(retrain_dir(settings) / f"{file}.jsonl")]
            for label, file in (("drifted", "holdout"), ("original_sft", "original_test"))}
    versions = {"champion": champion, "challenger": challenger}
    figures = bits_per_byte(settings, {k: f"models:/{name}/{v}" for k, v in versions.items()}, sets)
    return {**figures, **gate_figures(settings, versions)}


def training_overrides(settings: cfg.Settings, champion_uri: str, drifted_rows: int) -> list[str]:
    """Few steps at a smaller learning rate, from the champion, on data/retrain (retrain.* params).

    With a held-out drifted slice in the new test split, the gate's primary is that slice
    (sft_drifted_bits_per_byte: the retrain must significantly improve the domain it was asked for), and
    the base rows of the SFT test split join the guards at the forgetting tolerance of the raw test split.
    """
    from components.monitoring.feedback import DRIFTED, data_overrides
    from components.training.stages import finetune_stages

    r = settings.retrain
    out = [*data_overrides(settings), f"model.init_from={champion_uri}", f"sft.max_steps={r.sft_max_steps}",
           f"sft.lr={settings.sft.lr * r.lr_scale:g}"]
    if drifted_rows:
        guard = settings.evaluate.tolerances.get("test_bits_per_byte", 0.02)
        out += [f"evaluate.primary_metric=sft_{DRIFTED}_bits_per_byte",
                f"evaluate.tolerances.sft_base_bits_per_byte={guard:g}"]
    for stage in finetune_stages(settings.finetune.method)[1:]:
        out += [f"{stage}.max_steps={r.align_max_steps}", f"{stage}.lr={getattr(settings, stage).lr * r.lr_scale:g}"]
    return out


@flow(name="retrain", log_prints=True, flow_run_name=run_names.retrain_name)
def retrain_flow(config: str = "params.yaml", overrides: list[str] | None = None,
                 monitor_run_id: str | None = None) -> dict:
    """{status: promoted | rejected | already_running | not_enough_data, retrain_run_id, version, reason,
    monitor_run_id}. Failures (data validation, training, the store) raise."""
    from components.monitoring.retrain import lock_for, monitor_run

    overrides = list(overrides or [])
    settings = cfg.load(config, overrides)
    out = {"status": None, "retrain_run_id": None, "version": None, "reason": "", "monitor_run_id": monitor_run_id}
    lock = lock_for(settings)
    if not lock.acquire(monitor_run_id=monitor_run_id):
        h = lock.holder
        out.update(status="already_running", reason=f"a retrain is running (pid {h.get('pid')} on {h.get('host')} "
                                                    f"since {h.get('since')}, monitor run {h.get('monitor_run_id')})")
        print(f"retrain: {out['reason']}; not starting a second one")
        return out
    try:
        if lock.taken_over:
            print(f"retrain: took over a stale lock of pid {lock.taken_over.get('pid')} (it is not running)")
        run = monitor_run(settings, monitor_run_id)
        if run is None:
            out.update(status="not_enough_data", reason="no monitor run with drift_detected=1 to retrain on")
            print(f"retrain: {out['reason']}")
            return out
        out["monitor_run_id"] = run.info.run_id
        with tracking.parent_run(settings, "retrain", tags={"monitor_run_id": run.info.run_id}) as active:
            out["retrain_run_id"] = active.info.run_id
            committed = _read_lock(settings)
            try:
                out.update(_retrain(config, overrides, settings, run.info.run_id, active.info.run_id))
            except Exception as exc:
                # The run is marked FAILED by MLflow; the tags say why without opening the Prefect log.
                _record(active.info.run_id, {**out, "status": "failed", "reason": f"{type(exc).__name__}: {exc}"})
                raise
            finally:
                _keep_lock_and_restore(settings, active.info.run_id, committed)
            _record(active.info.run_id, out)
    finally:
        lock.release()
    print(f"retrain: {out['status']}{' v' + str(out['version']) if out['version'] else ''}: {out['reason']}")
    artifacts.publish(artifacts.RETRAIN, "Retrain", *artifacts.retrain_body(out))
    return out


def _retrain(config: str, overrides: list[str], settings: cfg.Settings, monitor_run_id: str, run_id: str) -> dict:
    """The steps inside the retrain run; returns status, version, reason and the figures logged."""
    import mlflow

    from flows.data import data_flow
    from flows.deploy import deploy_flow
    from flows.evaluate import evaluate_flow

    client = mlflow.MlflowClient()
    data = build_data_task(config, overrides, monitor_run_id)
    client.log_dict(run_id, data, "retrain/feedback_report.json")
    client.log_artifact(run_id, str(settings.path(data["folder"], "dropped.jsonl")), "retrain")
    for key in ("usable", "new_sft", "new_preference", "holdout", "dropped"):
        client.log_metric(run_id, f"feedback_{key}", float(data[key]))
    for line in data["dropped_rows"][:20]:
        print(f"retrain: dropped feedback row {line}")
    need = settings.retrain.min_new_documents
    if data["usable"] < need:
        return {"status": "not_enough_data",
                "reason": f"{data['usable']} new usable pairs from feedback, retrain.min_new_documents is {need}"}

    name = settings.registry.model_name
    champ = tracking.get_alias_version(settings, name, "champion")
    if champ is None:
        from components.errors import ConfigError
        raise ConfigError(f"retrain: {name} has no champion to fine-tune from; run `llmcycle run` first")
    # Pinned, not @champion: the alias may move while this retrain runs.
    champion_uri = f"models:/{name}/{champ.version}"
    client.set_tag(run_id, "champion_version", str(champ.version))
    ov = [*overrides, *training_overrides(settings, champion_uri, data["holdout"])]
    data_run = data_flow(config, ov)
    client.set_tag(run_id, "data_hash", data_run["data_hash"])
    trained = finetune_task(config, ov, champion_uri)
    ev = evaluate_flow(config, ov, model_uri=trained["model_uri"], label="retrain")
    gate = deploy_flow(config, ov, ev["model_uri"], ev["metrics"], eval_run_id=ev["run_id"])
    figures = compare_task(config, ov, str(champ.version), str(gate["version"]))
    for key, value in figures.items():
        client.log_metric(run_id, key, float(value))
    status = "promoted" if gate["decision"] == "promote" else "rejected"
    return {"status": status, "version": gate["version"], "reason": gate["reason"], "figures": figures,
            "model_name": name,
            "champion_before": str(champ.version), "data_hash": data_run["data_hash"],
            "runs": {"data": data_run["run_id"], **trained["stages"], "evaluate": ev["run_id"],
                     "deploy": gate["deploy_run_id"]}}


def _read_lock(settings: cfg.Settings) -> bytes | None:
    path = settings.path("dvc.lock")
    return path.read_bytes() if path.is_file() else None


def _keep_lock_and_restore(settings: cfg.Settings, run_id: str, committed: bytes | None) -> None:
    """The retrain's data version goes on record (dvc.lock as the retrain run's artifact retrain/dvc.lock; its
    data sits in the DVC cache; the version carries its data_hash), and the working tree's dvc.lock goes back to
    what it was: a scheduled retrain (or `make run`) must not leave a tracked file changed. The next
    `llmcycle run` rebuilds data/processed from the committed pipeline (DVC checks it out from the cache)."""
    import mlflow

    path = settings.path("dvc.lock")
    if committed is None or not path.is_file() or path.read_bytes() == committed:
        return
    mlflow.MlflowClient().log_artifact(run_id, str(path), "retrain")
    tmp = path.with_suffix(".lock.tmp")
    tmp.write_bytes(committed)
    tmp.replace(path)


def _record(run_id: str, out: dict) -> None:
    """Decision tags and a short markdown description on the retrain run (the MLflow UI shows it)."""
    import mlflow

    client = mlflow.MlflowClient()
    tags = {"retrain_status": out["status"], "retrain_reason": str(out["reason"])[:5000]}
    if out.get("version"):
        tags["challenger_version"] = str(out["version"])
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    # Links in the UI's own routes, so the chain monitor -> retrain -> version can be followed by clicking.
    exp, name = client.get_run(run_id).info.experiment_id, out.get("model_name", "llmcycle")
    run_link = lambda label, rid: f"[{label}](#/experiments/{exp}/runs/{rid})"  # noqa: E731
    model = lambda v: f"[{name} v{v}](#/models/{name}/versions/{v})"  # noqa: E731
    lines = [f"**Retrain: {out['status']}**. {out['reason']}", "",
             f"- caused by {run_link('monitor run ' + str(out['monitor_run_id']), out['monitor_run_id'])}"]
    if out.get("version"):
        lines.append(f"- challenger {model(out['version'])}, fine-tuned from champion {model(out['champion_before'])}"
                     f" on data_hash {out.get('data_hash')}")
    for stage, rid in (out.get("runs") or {}).items():
        lines.append(f"- {run_link(stage + ' run', rid)}")
    for key, value in sorted((out.get("figures") or {}).items()):
        lines.append(f"- {key}: {value:.4f}")
    client.set_tag(run_id, "mlflow.note.content", "\n".join(lines))
