"""Champion/challenger promotion gate: a pure decision over metric dicts, then registry alias moves.

`decide` is pure (tested with constructed numbers); `apply_decision` and `rollback` are the only
parts that touch the MLflow registry. Aliases: `champion` (served), `challenger` (last gated
candidate), `previous` (the champion before the last promotion, the rollback target).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from components.config import Settings, SuccessCriteria

CHAMPION, CHALLENGER, PREVIOUS = "champion", "challenger", "previous"
# The metrics the success criteria read from the candidate.
CRITERIA_METRICS = ("test_perplexity", "syntax_valid_rate")


class GateError(ValueError):
    """The gate cannot decide (a metric is missing) or cannot act (no rollback target). Exit code 1."""

    exit_code = 1


@dataclass
class GateDecision:
    promote: bool
    reason: str
    compared: dict[str, dict[str, Any]] = field(default_factory=dict)


def lower_is_better(metric: str) -> bool:
    """Direction registry: perplexity, loss and latency go down when a model improves; the rest go up."""
    m = metric.lower()
    return any(word in m for word in ("perplexity", "loss", "latency"))


def _within(cand: float, champ: float, tol: float, metric: str) -> bool:
    # Lower-better metrics scale (a perplexity of 50 vs 5), so their slack is relative;
    # rates live in [0, 1], so an absolute slack reads directly as percentage points.
    if lower_is_better(metric):
        return cand <= champ * (1.0 + tol)
    return cand >= champ - tol


def _better(cand: float, champ: float, metric: str) -> bool:
    return cand < champ if lower_is_better(metric) else cand > champ


def _get(metrics: dict[str, float], metric: str, who: str) -> float:
    value = metrics.get(metric)
    if value is None or not math.isfinite(float(value)):
        raise GateError(f"gate: the {who} has no finite value for metric {metric!r} (got {value!r})")
    return float(value)


def decide(candidate: dict[str, float], champion: dict[str, float] | None, criteria: SuccessCriteria,
           tolerances: dict[str, float], primary: str) -> GateDecision:
    """Promote or reject a candidate against the success criteria and (when present) the champion.

    Gated metrics are the tolerance keys plus the primary metric. The candidate must meet the
    criteria; with a champion it must also stay within tolerance on every gated metric and be
    strictly better on the primary one. A metric missing on either side raises GateError.
    """
    compared: dict[str, dict[str, Any]] = {}
    failures: list[str] = []

    ppl = _get(candidate, "test_perplexity", "candidate")
    rate = _get(candidate, "syntax_valid_rate", "candidate")
    compared["criteria.test_perplexity"] = {"candidate": ppl, "limit": criteria.max_val_perplexity,
                                            "ok": ppl <= criteria.max_val_perplexity}
    compared["criteria.syntax_valid_rate"] = {"candidate": rate, "limit": criteria.min_syntax_valid_rate,
                                              "ok": rate >= criteria.min_syntax_valid_rate}
    if ppl > criteria.max_val_perplexity:
        failures.append(f"test_perplexity {ppl:.4g} > max {criteria.max_val_perplexity:.4g}")
    if rate < criteria.min_syntax_valid_rate:
        failures.append(f"syntax_valid_rate {rate:.4g} < min {criteria.min_syntax_valid_rate:.4g}")

    if champion is None:
        if failures:
            return GateDecision(False, "no champion; success criteria not met: " + "; ".join(failures), compared)
        return GateDecision(True, "no champion; success criteria met", compared)

    # Read every gated metric before judging, so a broken champion fails loudly, not as a reject.
    gated = list(dict.fromkeys([*tolerances, primary]))
    values = {m: (_get(candidate, m, "candidate"), _get(champion, m, "champion")) for m in gated}
    for metric, (cand, champ) in values.items():
        tol = float(tolerances.get(metric, 0.0))
        ok = _within(cand, champ, tol, metric)
        compared[metric] = {"candidate": cand, "champion": champ, "tolerance": tol,
                            "direction": "lower" if lower_is_better(metric) else "higher", "ok": ok}
        if not ok:
            kind = "relative" if lower_is_better(metric) else "absolute"
            failures.append(f"{metric} regressed: {cand:.4g} vs champion {champ:.4g} (tolerance {tol:g} {kind})")
    cand, champ = values[primary]
    compared[primary]["improved"] = _better(cand, champ, primary)
    if not compared[primary]["improved"]:
        failures.append(f"primary {primary} not better: {cand:.4g} vs champion {champ:.4g}")

    if failures:
        return GateDecision(False, "; ".join(failures), compared)
    return GateDecision(True, f"{primary} improved {champ:.4g} -> {cand:.4g}; no regression beyond tolerance",
                        compared)


def decision_tags(decision: GateDecision) -> dict[str, str]:
    """Version tags: gate_decision, gate_reason and one `gate.<metric>.<field>` tag per compared number."""
    tags = {"gate_decision": "promote" if decision.promote else "reject",
            "gate_reason": decision.reason[:5000]}  # registry tag values are length-limited
    for metric, fields in decision.compared.items():
        for key, value in fields.items():
            tags[f"gate.{metric}.{key}"] = f"{value:.6g}" if isinstance(value, float) else str(value)
    return tags


def apply_decision(settings: Settings, name: str, version: str | int, decision: GateDecision) -> dict[str, Any]:
    """Tag the version with the decision; on promote move champion (old one -> previous).

    The candidate always becomes `challenger`, promoted or not, so the UI shows what was gated last.
    Returns {decision, version, champion, previous, challenger} (versions as strings or None).
    """
    from components.tracking import configure, get_alias_version, set_alias
    configure(settings)
    import mlflow

    client = mlflow.MlflowClient()
    version = str(version)
    for key, value in decision_tags(decision).items():
        client.set_model_version_tag(name, version, key, value)

    old = get_alias_version(settings, name, CHAMPION)
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
