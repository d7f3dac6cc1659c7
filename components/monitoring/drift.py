"""Drift of a window of descriptor rows against the reference: one Evidently 0.7 report and a decision.

One ValueDrift per column (Evidently's defaults for numbers: K-S / chi-square / Wasserstein by size),
the prompt text through `abs_text_content_drift` (a domain classifier's ROC AUC, ~0.1 s; the default
bootstrap takes seconds a column, TRAPS.md), and EmbeddingsDrift (a classifier's ROC AUC against text_threshold) when enabled.
Decision: drift when the share of drifted columns reaches monitoring.drift_share_threshold, or when
any column named in monitoring.drift_columns drifted. Too few distinct prompts: insufficient_data.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from components.config import MonitoringConfig
from components.monitoring.descriptors import EMBEDDING, NUMERIC_COLUMNS, TEXT_COLUMN

DRIFT, NO_DRIFT, INSUFFICIENT = "drift", "no_drift", "insufficient_data"


@dataclass
class DriftResult:
    decision: str
    n_current: int
    n_reference: int
    drift_share: float | None = None
    drifted_columns: list[str] = field(default_factory=list)
    scores: dict[str, dict[str, Any]] = field(default_factory=dict)   # column -> score, method, threshold, drifted
    skipped: dict[str, str] = field(default_factory=dict)             # column -> why it was not compared
    reason: str = ""
    snapshot: Any = None

    def save_html(self, path: Path) -> Path | None:
        if self.snapshot is None:
            return None
        path.parent.mkdir(parents=True, exist_ok=True)
        self.snapshot.save_html(str(path))
        return path

    def summary(self) -> dict[str, Any]:
        return {"decision": self.decision, "reason": self.reason, "n_current": self.n_current,
                "n_reference": self.n_reference, "drift_share": self.drift_share,
                "drifted_columns": self.drifted_columns, "scores": self.scores, "skipped": self.skipped}


def _usable(name: str, ref: list, cur: list) -> str | None:
    """Why a numeric column cannot be compared (too few finite values on a side), else None."""
    for side, vals in (("reference", ref), ("window", cur)):
        finite = [v for v in vals if v is not None and not (isinstance(v, float) and math.isnan(v))]
        if len(finite) < 2:
            return f"fewer than 2 values in the {side}"
    return None


def _frames(reference: list[dict], current: list[dict], columns: list[str], emb: bool):
    import pandas as pd

    def frame(rows: list[dict]) -> "pd.DataFrame":
        data = {c: [r.get(c) for r in rows] for c in columns}
        df = pd.DataFrame(data)
        for c in columns:
            if c != TEXT_COLUMN:
                df[c] = pd.to_numeric(df[c], errors="coerce").astype(float)
        if emb:
            vecs = [r[EMBEDDING] for r in rows]
            width = len(vecs[0])
            df = pd.concat([df, pd.DataFrame(vecs, columns=[f"emb_{i}" for i in range(width)])], axis=1)
        return df
    return frame(reference), frame(current)


def compare(reference: list[dict], current: list[dict], cfg: MonitoringConfig) -> DriftResult:
    """Run the report on descriptor rows (window rows already made distinct by prompt)."""
    if len(current) < cfg.min_window:
        return DriftResult(INSUFFICIENT, len(current), len(reference),
                           reason=f"{len(current)} distinct prompts in the window, below monitoring.min_window "
                                  f"({cfg.min_window}): too few to judge")
    with warnings.catch_warnings():        # evidently's imports warn about numpy.core and litestar (noise)
        warnings.simplefilter("ignore", DeprecationWarning)
        from evidently import DataDefinition, Dataset, Report
        from evidently.metrics import EmbeddingsDrift, ValueDrift

    emb = cfg.embeddings and all(EMBEDDING in r for r in reference + current)
    skipped = {} if emb or not cfg.embeddings else {EMBEDDING: "no embeddings in the reference or window rows"}
    numeric = []
    for c in NUMERIC_COLUMNS:
        why = _usable(c, [r.get(c) for r in reference], [r.get(c) for r in current])
        if why:
            skipped[c] = why
        else:
            numeric.append(c)
    ref_df, cur_df = _frames(reference, current, [TEXT_COLUMN, *numeric], emb)
    emb_cols = [c for c in ref_df.columns if c.startswith("emb_")]
    definition = DataDefinition(numerical_columns=numeric + emb_cols, text_columns=[TEXT_COLUMN],
                                embeddings={EMBEDDING: emb_cols} if emb else None)
    metrics: list[Any] = [ValueDrift(column=TEXT_COLUMN, method="abs_text_content_drift", threshold=cfg.text_threshold)]
    metrics += [ValueDrift(column=c) for c in numeric]
    if emb:
        from evidently.legacy.metrics.data_drift.embedding_drift_methods import model
        # No bootstrap: Evidently 0.7 exposes only the ROC AUC (no test), so the threshold must be ours.
        metrics.append(EmbeddingsDrift(embeddings_name=EMBEDDING, drift_method=model(threshold=cfg.text_threshold)))
    with warnings.catch_warnings():
        # The text classifier's SGD stops at its max_iter on small windows: sklearn warns each report (noise).
        warnings.filterwarnings("ignore", message="Maximum number of iteration reached")
        snapshot = Report(metrics, include_tests=True).run(Dataset.from_pandas(cur_df, data_definition=definition),
                                                           Dataset.from_pandas(ref_df, data_definition=definition))
    scores = read_scores(snapshot.dict())
    return decide(scores, cfg, len(current), len(reference), skipped, snapshot)


def read_scores(snap: dict) -> dict[str, dict[str, Any]]:
    """column -> {score, method, threshold, drifted} from a snapshot's metrics and their tests."""
    failed = {t["metric_config"]["metric_id"]: t["status"] for t in snap.get("tests", [])}
    out: dict[str, dict[str, Any]] = {}
    for m in snap["metrics"]:
        conf = m["config"]
        name = conf.get("column") or conf.get("embeddings_name")
        value = m["value"]
        score = value if isinstance(value, (int, float)) else (value or {}).get("value") if isinstance(value, dict) else None
        method = conf.get("drift_method") or {}
        threshold = conf.get("threshold", method.get("threshold"))
        drifted = failed.get(m["id"]) == "FAIL"
        if m["id"] not in failed and score is not None and threshold is not None:   # EmbeddingsDrift has no test
            drifted = float(score) >= float(threshold)
        out[name] = {"score": None if score is None else float(score), "method": str(conf.get("method") or
                     method.get("type", "")), "threshold": threshold, "drifted": drifted}
    return out


def decide(scores: dict[str, dict[str, Any]], cfg: MonitoringConfig, n_current: int, n_reference: int,
           skipped: dict[str, str] | None = None, snapshot: Any = None) -> DriftResult:
    drifted = [c for c, s in scores.items() if s["drifted"]]
    share = len(drifted) / len(scores) if scores else 0.0
    named = [c for c in drifted if c in cfg.drift_columns]
    if share >= cfg.drift_share_threshold:
        decision, reason = DRIFT, f"{len(drifted)} of {len(scores)} columns drifted (share {share:.2f} >= " \
                                  f"{cfg.drift_share_threshold})"
    elif named:
        decision, reason = DRIFT, f"named column(s) {', '.join(named)} drifted (monitoring.drift_columns)"
    else:
        named_note = f"; no column of {cfg.drift_columns} drifted" if cfg.drift_columns else ""
        decision, reason = NO_DRIFT, f"{len(drifted)} of {len(scores)} columns drifted (share {share:.2f} < " \
                                     f"{cfg.drift_share_threshold}){named_note}"
    return DriftResult(decision, n_current, n_reference, share, drifted, scores, skipped or {}, reason, snapshot)
