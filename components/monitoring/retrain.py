"""Retraining plumbing: the single-flight lock, the monitor run a retrain answers, old-vs-new scoring.

The lock is data/retrain/retrain.lock (components/single_flight.py): one retrain at a time per project,
and a lock left by a killed retrain is taken over by the next one.
"""
from __future__ import annotations

from typing import Any

from components import tracking
from components.config import Settings
from components.errors import ConfigError
from components.single_flight import SingleFlightLock as RetrainLock


def lock_for(settings: Settings) -> RetrainLock:
    return RetrainLock(settings.path("data", "retrain", "retrain.lock"))


# ----------------------------------------------------------------------------- the monitor run
def monitor_run(settings: Settings, run_id: str | None) -> Any | None:
    """The monitor run a retrain answers: the one named (ConfigError when the store has no such run),
    else the newest finished one that detected drift (None when there is none)."""
    if run_id:
        run = tracking.get_run(settings, run_id)
        if run is None:
            raise ConfigError(f"--monitor-run {run_id}: no such run in {tracking.tracking_uri(settings)}")
        if run.data.tags.get("stage") != "monitor" and run.info.run_name != "monitor":
            raise ConfigError(f"--monitor-run {run_id}: run {run.info.run_name!r} is not a monitor run")
        return run
    return tracking.newest_run(settings, "monitor", "metrics.drift_detected = 1")


def window_info(run: Any) -> dict[str, Any]:
    tags, metrics = run.data.tags, run.data.metrics
    return {"monitor_run_id": run.info.run_id, "start": tags.get("window_start"), "end": tags.get("window_end"),
            "n": tags.get("window_n"), "drift_detected": metrics.get("drift_detected"),
            "drift_share": metrics.get("drift_share")}


# ----------------------------------------------------------------------------- old vs new
def bits_per_byte(settings: Settings, models: dict[str, str], sets: dict[str, list[dict]]) -> dict[str, float]:
    """{<model>_<set>_bits_per_byte}: response bits per byte given the prompt (the gate's SFT measure) of
    each model URI on each set of SFT rows; an empty set is left out."""
    import torch

    from components.evaluation.bpb import doc_scores, model_bits, sft_items
    from components.model.build import load_causal_lm

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out: dict[str, float] = {}
    for label, uri in models.items():
        model, tokenizer = load_causal_lm(settings, uri)
        model.to(device).eval()
        block = int(model.config.max_position_embeddings)
        for name, rows in sets.items():
            if rows:
                items = sft_items(tokenizer, rows)
                out[f"{label}_{name}_bits_per_byte"] = doc_scores(items, model_bits(model, items, block, device)
                                                                  ).bits_per_byte
        del model
    return out


def gate_figures(settings: Settings, versions: dict[str, str]) -> dict[str, float]:
    """{<label>_test_bits_per_byte, <label>_sft_bits_per_byte} of registered versions on today's data: the
    scorecards the gate used (cached per version and data hash, so nothing is scored twice)."""
    import mlflow

    from components.evaluation import scorecard

    tracking.configure(settings)
    client = mlflow.MlflowClient()
    out: dict[str, float] = {}
    for label, version in versions.items():
        card, _ = scorecard.for_version(settings, client.get_model_version(settings.registry.model_name, version))
        for key in ("test_bits_per_byte", "sft_bits_per_byte"):
            if key in card.metrics:
                out[f"{label}_{key}"] = float(card.metrics[key])
    return out
