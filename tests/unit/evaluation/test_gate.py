"""Promotion gate: pure decisions over constructed metrics, then alias moves and tags against a real
SQLite MLflow registry in the test's own project root.
"""
import pytest

from components.config import SuccessCriteria
from components.evaluation.gate import (CHALLENGER, CHAMPION, PREVIOUS, GateError, apply_decision, decide,
                                        lower_is_better, rollback)

CRIT = SuccessCriteria(max_val_perplexity=50.0, min_syntax_valid_rate=0.2)
TOL = {"test_perplexity": 0.05, "syntax_valid_rate": 0.05}
PRIMARY = "test_perplexity"
CHAMP = {"test_perplexity": 20.0, "syntax_valid_rate": 0.5}


def test_direction_registry():
    assert lower_is_better("test_perplexity") and lower_is_better("val_loss") and lower_is_better("p50_latency_ms")
    assert not lower_is_better("syntax_valid_rate") and not lower_is_better("pass_at_1")


def test_first_champion_decided_by_criteria_alone():
    assert decide({"test_perplexity": 49.0, "syntax_valid_rate": 0.2}, None, CRIT, TOL, PRIMARY).promote
    too_perplexed = decide({"test_perplexity": 51.0, "syntax_valid_rate": 0.9}, None, CRIT, TOL, PRIMARY)
    assert not too_perplexed.promote and "test_perplexity" in too_perplexed.reason
    too_broken = decide({"test_perplexity": 10.0, "syntax_valid_rate": 0.1}, None, CRIT, TOL, PRIMARY)
    assert not too_broken.promote and "syntax_valid_rate" in too_broken.reason


def test_promote_when_primary_better_and_rate_within_absolute_tolerance():
    # rate 0.46 >= 0.5 - 0.05: a small drop is tolerated; perplexity 19 < 20 is the improvement.
    d = decide({"test_perplexity": 19.0, "syntax_valid_rate": 0.46}, CHAMP, CRIT, TOL, PRIMARY)
    assert d.promote, d.reason
    assert d.compared["syntax_valid_rate"] == {"candidate": 0.46, "champion": 0.5, "tolerance": 0.05,
                                               "direction": "higher", "ok": True}
    assert d.compared[PRIMARY]["improved"] is True


def test_reject_on_regression_beyond_tolerance():
    # rate 0.44 < 0.5 - 0.05 blocks the promotion even though perplexity improved.
    d = decide({"test_perplexity": 15.0, "syntax_valid_rate": 0.44}, CHAMP, CRIT, TOL, PRIMARY)
    assert not d.promote
    assert "syntax_valid_rate regressed" in d.reason and not d.compared["syntax_valid_rate"]["ok"]


def test_relative_tolerance_on_lower_better_secondary_metric():
    # Primary is the rate; perplexity may rise up to 5% (20 -> 21) but not to 21.2.
    tol = {**TOL, "test_perplexity": 0.05}
    better_rate = {"syntax_valid_rate": 0.6}
    assert decide({**better_rate, "test_perplexity": 21.0}, CHAMP, CRIT, tol, "syntax_valid_rate").promote
    assert not decide({**better_rate, "test_perplexity": 21.2}, CHAMP, CRIT, tol, "syntax_valid_rate").promote


def test_reject_when_primary_not_strictly_better():
    d = decide({"test_perplexity": 20.0, "syntax_valid_rate": 0.9}, CHAMP, CRIT, TOL, PRIMARY)
    assert not d.promote and "primary test_perplexity not better" in d.reason
    # Within the 5% tolerance is not "better" either.
    assert not decide({"test_perplexity": 20.5, "syntax_valid_rate": 0.9}, CHAMP, CRIT, TOL, PRIMARY).promote


def test_missing_champion_metric_raises():
    with pytest.raises(GateError, match="syntax_valid_rate"):
        decide({"test_perplexity": 10.0, "syntax_valid_rate": 0.9}, {"test_perplexity": 20.0}, CRIT, TOL, PRIMARY)
    assert issubclass(GateError, ValueError)
    with pytest.raises(GateError, match="pass_at_1"):
        decide({"test_perplexity": 10.0, "syntax_valid_rate": 0.9, "pass_at_1": 0.3}, CHAMP, CRIT,
               {**TOL, "pass_at_1": 0.0}, PRIMARY)


# ----------------------------------------------------------------------------- registry
def _register_versions(settings, name: str, n: int) -> list[str]:
    import mlflow
    from components.tracking import register_model, stage_run

    versions = []
    for i in range(n):
        with stage_run(settings, "evaluate") as run:
            # mlflow 3 registers runs:/ URIs only for a folder holding an MLmodel file (or a
            # LoggedModel): a bare runs:/id/file.txt fails, so a one-line MLmodel makes the dummy.
            mlflow.log_text(f"flavors: {{}}\nnote: dummy {i}\n", "model/MLmodel")
        mv = register_model(settings, f"runs:/{run.info.run_id}/model", name, stage="sft")
        versions.append(str(mv.version))
    return versions


def _aliases(settings, name: str) -> dict[str, str]:
    import mlflow
    return {alias: str(v) for alias, v in mlflow.MlflowClient().get_registered_model(name).aliases.items()}


def test_apply_decision_and_rollback_move_aliases(tiny_settings):
    import mlflow
    name = tiny_settings.registry.model_name
    v1, v2, v3 = _register_versions(tiny_settings, name, 3)

    first = decide({"test_perplexity": 30.0, "syntax_valid_rate": 0.3}, None, CRIT, TOL, PRIMARY)
    out = apply_decision(tiny_settings, name, v1, first)
    assert out["decision"] == "promote" and out["previous"] is None
    assert _aliases(tiny_settings, name) == {CHAMPION: v1, CHALLENGER: v1}

    better = decide({"test_perplexity": 25.0, "syntax_valid_rate": 0.3}, {"test_perplexity": 30.0,
                    "syntax_valid_rate": 0.3}, CRIT, TOL, PRIMARY)
    out = apply_decision(tiny_settings, name, v2, better)
    assert out == {"decision": "promote", "version": v2, "champion": v2, "previous": v1, "challenger": v2}
    assert _aliases(tiny_settings, name) == {CHAMPION: v2, PREVIOUS: v1, CHALLENGER: v2}

    worse = decide({"test_perplexity": 26.0, "syntax_valid_rate": 0.3}, {"test_perplexity": 25.0,
                   "syntax_valid_rate": 0.3}, CRIT, TOL, PRIMARY)
    apply_decision(tiny_settings, name, v3, worse)
    assert _aliases(tiny_settings, name) == {CHAMPION: v2, PREVIOUS: v1, CHALLENGER: v3}

    client = mlflow.MlflowClient()
    tags3 = client.get_model_version(name, v3).tags
    assert tags3["gate_decision"] == "reject" and "not better" in tags3["gate_reason"]
    assert tags3["gate.test_perplexity.candidate"] == "26" and tags3["gate.test_perplexity.champion"] == "25"
    assert client.get_model_version(name, v2).tags["gate_decision"] == "promote"
    assert client.get_model_version(name, v2).tags["stage"] == "sft"  # lineage tags untouched

    assert rollback(tiny_settings, name) == v1
    # The demoted v2 keeps no alias; the rejected v3 stays the challenger.
    assert _aliases(tiny_settings, name) == {CHAMPION: v1, CHALLENGER: v3}
    assert client.get_model_version(name, v2).tags["rolled_back"] == "true"
    with pytest.raises(GateError, match="previous"):
        rollback(tiny_settings, name)


def test_rollback_clears_challenger_pointing_at_demoted_version(tiny_settings):
    name = tiny_settings.registry.model_name
    v1, v2 = _register_versions(tiny_settings, name, 2)
    ok = decide({"test_perplexity": 30.0, "syntax_valid_rate": 0.3}, None, CRIT, TOL, PRIMARY)
    apply_decision(tiny_settings, name, v1, ok)
    apply_decision(tiny_settings, name, v2, ok)
    assert _aliases(tiny_settings, name) == {CHAMPION: v2, PREVIOUS: v1, CHALLENGER: v2}
    assert rollback(tiny_settings, name) == v1
    assert _aliases(tiny_settings, name) == {CHAMPION: v1}
