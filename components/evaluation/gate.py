"""Champion/challenger promotion gate: a pure decision over two scorecards, then registry alias moves.

`decide` is pure (tested with constructed scores): the primary metric is bits per byte, compared
by a paired bootstrap over documents scored for both models on the same text (significance.py);
every gated secondary metric is a one-sided paired test too: it blocks only a regression significantly
beyond its tolerance (per document for bits per byte, per prompt for the syntax-valid and defines-name rates). `apply_decision` and `rollback` are the only
parts that touch the MLflow registry. Aliases: `champion` (served), `challenger` (last gated
candidate), `previous` (the champion before the last promotion, the rollback target).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from components.config import EvaluateConfig, Settings, SuccessCriteria
from components.evaluation.bpb import DocScores
from components.evaluation.significance import paired_bootstrap

CHAMPION, CHALLENGER, PREVIOUS = "champion", "challenger", "previous"
BOOTSTRAP_SEED = 1337


class GateError(ValueError):
    """The gate cannot decide (a metric is missing, scores not comparable) or act (no rollback target). Exit 1."""

    exit_code = 1


@dataclass
class GateDecision:
    promote: bool
    reason: str
    compared: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class Scorecard:
    """What the gate knows of one model on the current evaluation data.

    metrics: sft_bits_per_byte, test_bits_per_byte, syntax_valid_rate (+ baselines);
    docs: per-document DocScores of "sft" and "test", of the count baselines as "sft.kn3", "test.unigram", ...,
    and the per-prompt outcomes "syntax_valid" and "defines_name" (DocScores.outcomes: the rate's paired data).
    """
    metrics: dict[str, float]
    docs: dict[str, DocScores] = field(default_factory=dict)


# The per-item scores behind each gated metric: documents for bits per byte, prompts for the rates.
PAIRED_DATA = {"sft_bits_per_byte": "sft", "test_bits_per_byte": "test",
               "syntax_valid_rate": "syntax_valid", "defines_name_rate": "defines_name"}


def paired_key(metric: str) -> str:
    """The scorecard docs behind a gated metric; sft_<domain>_bits_per_byte is the SFT test split's domain
    (a retrain's `drifted` slice, the `base` rows): docs "sft@<domain>"."""
    if metric in PAIRED_DATA:
        return PAIRED_DATA[metric]
    if metric.startswith("sft_") and metric.endswith("_bits_per_byte"):
        return "sft@" + metric[len("sft_"):-len("_bits_per_byte")]
    raise GateError(f"gate: no per-item scores are kept for {metric!r}, so it cannot be tested")


def lower_is_better(metric: str) -> bool:
    """Direction registry: bits, perplexity, loss and latency go down when a model improves; the rest go up."""
    m = metric.lower()
    return any(word in m for word in ("bits_per_byte", "perplexity", "loss", "latency"))


def _slack(champ: float, tol: float, metric: str) -> float:
    # Lower-better metrics scale (2.1 vs 1.4 bits per byte), so their slack is relative;
    # rates live in [0, 1], so an absolute slack reads directly as percentage points.
    return champ * tol if lower_is_better(metric) else tol


def _get(metrics: dict[str, float], metric: str, who: str) -> float:
    value = metrics.get(metric)
    if value is None or not math.isfinite(float(value)):
        raise GateError(f"gate: the {who} has no finite value for metric {metric!r} (got {value!r})")
    return float(value)


def _docs(card: Scorecard, key: str, who: str) -> DocScores:
    if key not in card.docs:
        raise GateError(f"gate: the {who} has no per-document scores for {key!r}")
    return card.docs[key]


def _paired(a: DocScores, b: DocScores, what: str, cfg: EvaluateConfig, one_sided: bool = False) -> Any:
    """Paired bootstrap of a against b; GateError unless both scored the very same documents (or prompts)."""
    if a.ids != b.ids or not np.array_equal(a.nbytes, b.nbytes):
        raise GateError(f"gate: {what}: the two sides were scored on different documents "
                        f"({len(a.ids)} vs {len(b.ids)}); scores are not comparable")
    return paired_bootstrap(a.bits, b.bits, a.nbytes, cfg.confidence, cfg.bootstrap_samples, BOOTSTRAP_SEED,
                            one_sided=one_sided)


def regression(candidate: Scorecard, champion: Scorecard, metric: str, tol: float,
               cfg: EvaluateConfig) -> tuple[bool, dict[str, Any]]:
    """(regressed, record): a one-sided paired test of the candidate against the champion on `metric`.

    delta = candidate - champion over the same documents (bits per byte) or prompts (rates), bootstrapped.
    Lower-better: regressed when even the optimistic bound (the (1 - confidence) percentile) exceeds
    +slack; higher-better: when the (confidence) percentile lies below -slack. So a drop inside the noise,
    or one within tolerance, never blocks; slack is relative for bits per byte, absolute for rates.
    """
    cand, champ = _get(candidate.metrics, metric, "candidate"), _get(champion.metrics, metric, "champion")
    key = paired_key(metric)
    iv = _paired(_docs(candidate, key, "candidate"), _docs(champion, key, "champion"), metric, cfg, one_sided=True)
    slack = _slack(champ, tol, metric)
    lower = lower_is_better(metric)
    regressed = iv.low > slack if lower else iv.high < -slack
    record = {"candidate": cand, "champion": champ, "tolerance": tol, "slack": slack,
              "direction": "lower" if lower else "higher", "delta": iv.delta, "low": iv.low, "high": iv.high,
              "confidence": iv.confidence, "one_sided": True, "n": iv.n_docs, "ok": not regressed}
    return regressed, record


def _interval_fields(iv: Any) -> dict[str, Any]:
    return {"delta": iv.delta, "low": iv.low, "high": iv.high, "confidence": iv.confidence, "docs": iv.n_docs,
            "significant": iv.a_better}


def criteria_failures(cand: Scorecard, criteria: SuccessCriteria, cfg: EvaluateConfig,
                      compared: dict[str, dict[str, Any]]) -> list[str]:
    """The success criteria every candidate must meet, the first one too (scoping.success.*)."""
    failures = []
    primary = cfg.primary_metric
    split = primary.split("_", 1)[0]                       # sft_bits_per_byte -> "sft"
    value = _get(cand.metrics, primary, "candidate")
    rate = _get(cand.metrics, "syntax_valid_rate", "candidate")
    compared["criteria.syntax_valid_rate"] = {"candidate": rate, "limit": criteria.min_syntax_valid_rate,
                                              "ok": rate >= criteria.min_syntax_valid_rate}
    if rate < criteria.min_syntax_valid_rate:
        failures.append(f"syntax_valid_rate {rate:.4g} < min {criteria.min_syntax_valid_rate:.4g}")
    if criteria.max_bits_per_byte is not None:
        ok = value <= criteria.max_bits_per_byte
        compared[f"criteria.{primary}"] = {"candidate": value, "limit": criteria.max_bits_per_byte, "ok": ok}
        if not ok:
            failures.append(f"{primary} {value:.4g} > max {criteria.max_bits_per_byte:.4g}")
    if criteria.beat_baseline != "none":
        # On the whole split the primary belongs to (a domain's primary, sft_drifted, is judged on all of sft).
        base, whole = criteria.beat_baseline, f"{split}_bits_per_byte"
        iv = _paired(_docs(cand, split, "candidate"), _docs(cand, f"{split}.{base}", "candidate"),
                     f"{whole} vs the {base} baseline", cfg)
        value = _get(cand.metrics, whole, "candidate")
        compared[f"criteria.beats_{base}"] = {"candidate": value, "baseline": value - iv.delta, **_interval_fields(iv)}
        if not iv.a_better:
            failures.append(f"{whole} does not significantly beat the {base} baseline: "
                            + iv.describe("candidate", base))
    return failures


def decide(candidate: Scorecard, champion: Scorecard | None, criteria: SuccessCriteria,
           cfg: EvaluateConfig) -> GateDecision:
    """Promote or reject a candidate against the success criteria and (when present) the champion.

    Both scorecards must come from the same evaluation data (the gate scores the champion anew).
    The candidate must meet the criteria; with a champion it must also stay within tolerance on every
    gated metric and be significantly better on the primary one (paired bootstrap over documents at
    evaluate.confidence). A gain inside the noise is a reject that says so.
    """
    compared: dict[str, dict[str, Any]] = {}
    failures = criteria_failures(candidate, criteria, cfg, compared)
    if champion is None:
        if failures:
            return GateDecision(False, "no champion; success criteria not met: " + "; ".join(failures), compared)
        return GateDecision(True, "no champion; success criteria met", compared)

    primary = cfg.primary_metric
    # Read every gated metric before judging, so a broken champion fails loudly, not as a reject.
    gated = list(dict.fromkeys([*cfg.tolerances, primary]))
    values = {m: (_get(candidate.metrics, m, "candidate"), _get(champion.metrics, m, "champion")) for m in gated}
    for metric in gated:
        regressed, compared[metric] = regression(candidate, champion, metric,
                                                 float(cfg.tolerances.get(metric, 0.0)), cfg)
        if regressed and metric != primary:   # the primary's own two-sided test below says "not better"
            r = compared[metric]
            kind = "relative" if r["direction"] == "lower" else "absolute"
            failures.append(f"{metric} regressed significantly: {r['candidate']:.4g} vs champion {r['champion']:.4g}, "
                            f"delta {r['delta']:+.4f}, one-sided {r['confidence']:.0%} bound "
                            f"{r['low'] if kind == 'relative' else r['high']:+.4f} beyond the tolerance "
                            f"{r['tolerance']:g} {kind} (slack {r['slack']:.4f}) over {r['n']} paired items")
    key = paired_key(primary)
    iv = _paired(_docs(candidate, key, "candidate"), _docs(champion, key, "champion"), primary, cfg)
    # The primary's own record is its two-sided improvement test (the one-sided regression check above stays
    # in the reason when it fired).
    compared[primary].update(_interval_fields(iv), one_sided=False, improved=iv.a_better)
    if not iv.a_better:
        verdict = "gain not significant" if iv.delta < 0 else "not better"
        failures.append(f"primary {primary} {verdict}: {iv.describe()}")

    if failures:
        return GateDecision(False, "; ".join(failures), compared)
    cand, champ = values[primary]
    return GateDecision(True, f"{primary} improved {champ:.4g} -> {cand:.4g} ({iv.describe()}); "
                              "no regression beyond tolerance", compared)


def decision_tags(decision: GateDecision) -> dict[str, str]:
    """Version tags: gate_decision, gate_reason and one `gate.<metric>.<field>` tag per compared number."""
    tags = {"gate_decision": "promote" if decision.promote else "reject",
            "gate_reason": decision.reason[:5000]}  # registry tag values are length-limited
    for metric, fields in decision.compared.items():
        for key, value in fields.items():
            tags[f"gate.{metric}.{key}"] = f"{value:.6g}" if isinstance(value, float) else str(value)
    return tags


def apply_decision(settings: Settings, name: str, version: str | int, decision: GateDecision,
                   expected_champion: str | None | bool = False) -> dict[str, Any]:
    """Tag the version with the decision; on promote move champion (old one -> previous).

    The candidate always becomes `challenger`, promoted or not, so the UI shows what was gated last.
    expected_champion (a version, or None for "no champion"): the champion the decision was made
    against; if another gate moved it meanwhile, GateError and no alias moves. False skips the check.
    Returns {decision, version, champion, previous, challenger} (versions as strings or None).
    """
    from components.tracking import configure, get_alias_version, set_alias
    configure(settings)
    import mlflow

    client = mlflow.MlflowClient()
    version = str(version)
    old = get_alias_version(settings, name, CHAMPION)
    if expected_champion is not False and (str(old.version) if old else None) != expected_champion:
        raise GateError(f"gate: the champion of {name} moved from v{expected_champion} to "
                        f"v{old.version if old else None} while v{version} was being judged; run the gate again")
    for key, value in decision_tags(decision).items():
        client.set_model_version_tag(name, version, key, value)

    previous = get_alias_version(settings, name, PREVIOUS)
    result = {"decision": "promote" if decision.promote else "reject", "version": version,
              "champion": old.version if old else None, "previous": previous.version if previous else None}
    if decision.promote:
        # previous first: a server watching `champion` can always find a rollback target.
        if old is not None and str(old.version) != version:
            set_alias(settings, name, PREVIOUS, str(old.version))
            result["previous"] = str(old.version)
        set_alias(settings, name, CHAMPION, version)
        result["champion"] = version
    set_alias(settings, name, CHALLENGER, version)
    result["challenger"] = version
    return result


def rollback(settings: Settings, name: str) -> str:
    """Move `champion` back to `previous`; returns the restored version.

    The demoted version is left with no alias (`challenger` is removed if it pointed at it, so a
    known-bad model is not mistaken for the pending candidate) and tagged rolled_back=true.
    `previous` is removed: it now equals the champion, and a second rollback should fail loudly
    rather than silently no-op. Raises GateError when there is no `previous`.
    """
    from components.tracking import configure, get_alias_version, set_alias
    configure(settings)
    import mlflow

    prev = get_alias_version(settings, name, PREVIOUS)
    if prev is None:
        raise GateError(f"rollback: registered model {name!r} has no {PREVIOUS!r} alias to roll back to")
    current = get_alias_version(settings, name, CHAMPION)
    client = mlflow.MlflowClient()
    set_alias(settings, name, CHAMPION, str(prev.version))
    client.delete_registered_model_alias(name, PREVIOUS)
    if current is not None and str(current.version) != str(prev.version):
        client.set_model_version_tag(name, current.version, "rolled_back", "true")
        challenger = get_alias_version(settings, name, CHALLENGER)
        if challenger is not None and str(challenger.version) == str(current.version):
            client.delete_registered_model_alias(name, CHALLENGER)
    return str(prev.version)
