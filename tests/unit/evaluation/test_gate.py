"""Promotion gate: pure decisions over constructed scorecards (per-document bits and bytes), then alias
moves and tags against a real SQLite MLflow registry in the test's own project root.
"""
import numpy as np
import pytest

from components.config import EvaluateConfig, SuccessCriteria
from components.evaluation.bpb import DocScores
from components.evaluation.gate import (CHALLENGER, CHAMPION, PREVIOUS, GateError, Scorecard, apply_decision, decide,
                                        lower_is_better, rollback)

CRIT = SuccessCriteria(beat_baseline="kn3", min_syntax_valid_rate=0.2)
CFG = EvaluateConfig(tolerances={"test_bits_per_byte": 0.05, "syntax_valid_rate": 0.05}, bootstrap_samples=1000)
N = 60                                   # documents per evaluation set
BYTES = np.full(N, 100)                  # 100 bytes each


def docs(bpb: float, noise: float = 0.0, seed: int = 0) -> DocScores:
    """N documents of 100 bytes at about `bpb` bits per byte, each off by up to +-noise."""
    jitter = np.random.default_rng(seed).uniform(-noise, noise, N)
    return DocScores([f"d{i}" for i in range(N)], (bpb + jitter) * BYTES, BYTES.copy())


def outcomes(hits: int, n: int = N, first: int = 0) -> DocScores:
    """n prompts p0..p(n-1), of which hits (starting at prompt `first`) came out right."""
    return DocScores.outcomes([f"p{i}" for i in range(n)], [first <= i < first + hits for i in range(n)])


def card(sft: float, test: float = 2.0, rate: float = 0.5, kn3: float = 3.0, noise: float = 0.0,
         seed: int = 0, defines: float = 0.5) -> Scorecard:
    d = {"sft": docs(sft, noise, seed), "test": docs(test, noise, seed + 1),
         "sft.kn3": docs(kn3, noise, seed + 2), "test.kn3": docs(kn3, noise, seed + 3),
         "syntax_valid": outcomes(round(rate * N)), "defines_name": outcomes(round(defines * N))}
    return Scorecard({"sft_bits_per_byte": d["sft"].bits_per_byte, "test_bits_per_byte": d["test"].bits_per_byte,
                      "syntax_valid_rate": d["syntax_valid"].bits_per_byte,
                      "defines_name_rate": d["defines_name"].bits_per_byte}, d)


def with_rate(base: Scorecard, hits: int, n: int, first: int = 0) -> Scorecard:
    """base with its syntax-valid outcomes replaced by `hits` of `n` prompts."""
    base.docs["syntax_valid"] = outcomes(hits, n, first)
    base.metrics["syntax_valid_rate"] = hits / n
    return base


def test_direction_registry():
    assert lower_is_better("sft_bits_per_byte") and lower_is_better("test_perplexity")
    assert lower_is_better("val_loss") and lower_is_better("p50_latency_ms")
    assert not lower_is_better("syntax_valid_rate") and not lower_is_better("pass_at_1")


def test_first_champion_must_significantly_beat_the_trigram():
    assert decide(card(1.5), None, CRIT, CFG).promote
    # A first candidate worse than the KN trigram on its own task is not a champion (it was, before).
    worse = decide(card(3.2), None, CRIT, CFG)
    assert not worse.promote and "does not significantly beat the kn3 baseline" in worse.reason
    assert worse.compared["criteria.beats_kn3"]["delta"] == pytest.approx(0.2)
    broken = decide(card(1.5, rate=0.1), None, CRIT, CFG)
    assert not broken.promote and "syntax_valid_rate" in broken.reason
    assert decide(card(3.2), None, SuccessCriteria(beat_baseline="none", min_syntax_valid_rate=0.2), CFG).promote


def test_promote_on_a_significant_gain_with_secondaries_within_tolerance():
    # rate 0.46 >= 0.5 - 0.05 and test bpb 2.05 <= 2.0 * 1.05: tolerated; SFT 1.5 -> 1.2 is the gain.
    d = decide(card(1.2, test=2.05, rate=0.46, noise=0.1), card(1.5, noise=0.1, seed=9), CRIT, CFG)
    assert d.promote, d.reason
    primary = d.compared["sft_bits_per_byte"]
    assert primary["improved"] and primary["significant"] and primary["high"] < 0 < 0.5 + primary["low"]
    assert primary["delta"] == pytest.approx(-0.3, abs=0.05)
    assert d.compared["syntax_valid_rate"]["ok"] and d.compared["test_bits_per_byte"]["ok"]


def test_a_gain_inside_the_noise_is_rejected_as_not_significant():
    # Same mean, per-document noise of +-1 bit/byte: a 0.02 "improvement" the interval cannot tell from 0.
    cand = card(1.48, noise=1.0, seed=1)
    champ = card(1.5, noise=1.0, seed=2)
    assert cand.metrics["sft_bits_per_byte"] < champ.metrics["sft_bits_per_byte"]
    d = decide(cand, champ, CRIT, CFG)
    assert not d.promote and "gain not significant" in d.reason
    assert d.compared["sft_bits_per_byte"]["low"] < 0 < d.compared["sft_bits_per_byte"]["high"]


def test_reject_when_worse_or_on_a_regression_beyond_tolerance():
    assert "not better" in decide(card(1.6), card(1.5), CRIT, CFG).reason
    forgot = decide(card(1.2, test=2.2), card(1.5), CRIT, CFG)  # test bpb +10% > 5% relative slack
    assert not forgot.promote and "test_bits_per_byte regressed significantly" in forgot.reason
    worse_rate = decide(card(1.2, rate=0.25), card(1.5), CRIT, CFG)   # 15 vs 30 of 60 prompts
    assert not worse_rate.promote and "syntax_valid_rate regressed significantly" in worse_rate.reason
    r = worse_rate.compared["syntax_valid_rate"]
    assert r["delta"] == pytest.approx(-0.25) and r["one_sided"] and r["high"] < -0.05 and not r["ok"]


def test_a_rate_drop_inside_the_noise_does_not_block():
    # The README's rejected retrain: 1/16 syntax-valid vs the champion's 3/16 (the one hit among the three).
    cand = with_rate(card(1.2), 1, 16, first=2)
    champ = with_rate(card(1.5), 3, 16)
    d = decide(cand, champ, SuccessCriteria(beat_baseline="kn3", min_syntax_valid_rate=0.05), CFG)
    assert d.compared["syntax_valid_rate"]["ok"] and d.compared["syntax_valid_rate"]["high"] >= -0.05
    assert d.compared["syntax_valid_rate"]["delta"] == pytest.approx(-0.125)
    assert "syntax_valid_rate" not in d.reason and d.promote, d.reason


def test_a_large_paired_rate_drop_on_enough_prompts_blocks():
    cand = with_rate(card(1.2), 2, 128)
    champ = with_rate(card(1.5), 60, 128)
    d = decide(cand, champ, CRIT, CFG)
    assert not d.promote and "syntax_valid_rate regressed significantly" in d.reason
    assert d.compared["syntax_valid_rate"]["high"] < -0.05 and d.compared["syntax_valid_rate"]["n"] == 128


def test_a_test_split_rise_within_the_noise_does_not_block():
    # +4% on the raw test split, but +-1 bit of per-document noise: not significantly beyond the 5% slack.
    d = decide(card(1.2, test=2.08, noise=1.0, seed=3), card(1.5, noise=1.0, seed=4), CRIT, CFG)
    assert d.compared["test_bits_per_byte"]["ok"] and d.compared["test_bits_per_byte"]["low"] < 0.1


def test_rates_on_different_prompts_are_not_compared():
    champ = with_rate(card(1.5), 30, 60)
    champ.docs["syntax_valid"] = DocScores.outcomes([f"q{i}" for i in range(N)], [True] * N)
    with pytest.raises(GateError, match="different documents"):
        decide(card(1.2), champ, CRIT, CFG)


def test_scores_of_different_documents_are_not_compared():
    champ = card(1.5)
    champ.docs["sft"] = DocScores([f"x{i}" for i in range(N)], champ.docs["sft"].bits, BYTES.copy())
    with pytest.raises(GateError, match="different documents"):
        decide(card(1.2), champ, CRIT, CFG)


def test_missing_metric_raises():
    champ = card(1.5)
    del champ.metrics["syntax_valid_rate"]
    with pytest.raises(GateError, match="syntax_valid_rate"):
        decide(card(1.2), champ, CRIT, CFG)
    assert issubclass(GateError, ValueError)
    no_docs = card(1.2)
    del no_docs.docs["sft.kn3"]
    with pytest.raises(GateError, match="sft.kn3"):
        decide(no_docs, None, CRIT, CFG)


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

    first = decide(card(1.5), None, CRIT, CFG)
    out = apply_decision(tiny_settings, name, v1, first)
    assert out["decision"] == "promote" and out["previous"] is None
    assert _aliases(tiny_settings, name) == {CHAMPION: v1, CHALLENGER: v1}

    better = decide(card(1.2), card(1.5), CRIT, CFG)
    out = apply_decision(tiny_settings, name, v2, better)
    assert out == {"decision": "promote", "version": v2, "champion": v2, "previous": v1, "challenger": v2}
    assert _aliases(tiny_settings, name) == {CHAMPION: v2, PREVIOUS: v1, CHALLENGER: v2}

    worse = decide(card(1.3), card(1.2), CRIT, CFG)
    apply_decision(tiny_settings, name, v3, worse)
    assert _aliases(tiny_settings, name) == {CHAMPION: v2, PREVIOUS: v1, CHALLENGER: v3}

    client = mlflow.MlflowClient()
    tags3 = client.get_model_version(name, v3).tags
    assert tags3["gate_decision"] == "reject" and "not better" in tags3["gate_reason"]
    assert tags3["gate.sft_bits_per_byte.candidate"] == "1.3" and tags3["gate.sft_bits_per_byte.champion"] == "1.2"
    assert float(tags3["gate.sft_bits_per_byte.low"]) > 0  # the interval is in the decision tags
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
    ok = decide(card(1.5), None, CRIT, CFG)
    apply_decision(tiny_settings, name, v1, ok)
    apply_decision(tiny_settings, name, v2, ok)
    assert _aliases(tiny_settings, name) == {CHAMPION: v2, PREVIOUS: v1, CHALLENGER: v2}
    assert rollback(tiny_settings, name) == v1
    assert _aliases(tiny_settings, name) == {CHAMPION: v1}


def test_a_champion_moved_by_another_gate_stops_this_one(tiny_settings):
    name = tiny_settings.registry.model_name
    v1, v2, v3 = _register_versions(tiny_settings, name, 3)
    apply_decision(tiny_settings, name, v1, decide(card(1.5), None, CRIT, CFG))
    # v3 was judged against v1, but meanwhile another gate made v2 champion: no alias may move.
    apply_decision(tiny_settings, name, v2, decide(card(1.2), card(1.5), CRIT, CFG), expected_champion=v1)
    with pytest.raises(GateError, match="moved from v1 to v2"):
        apply_decision(tiny_settings, name, v3, decide(card(1.0), card(1.5), CRIT, CFG), expected_champion=v1)
    assert _aliases(tiny_settings, name) == {CHAMPION: v2, PREVIOUS: v1, CHALLENGER: v2}


def test_a_retrain_gate_on_the_drifted_domain_with_the_base_rows_as_guard():
    """The retrain's gate: primary sft_drifted_bits_per_byte (its own slice), sft_base as a forgetting guard."""
    from components.evaluation.scorecard import add_domains

    rows = [{"domain": "drifted"} if i < 12 else {} for i in range(N)]

    def retrain_card(drifted: float, base: float, seed: int) -> Scorecard:
        c = card(base, noise=0.05, seed=seed)
        c.docs["sft"].bits[:12] = (drifted + np.random.default_rng(seed).uniform(-0.05, 0.05, 12)) * 100
        c.metrics["sft_bits_per_byte"] = c.docs["sft"].bits_per_byte
        add_domains(c, rows)
        return c

    retrain_cfg = EvaluateConfig(primary_metric="sft_drifted_bits_per_byte", bootstrap_samples=1000,
                                 tolerances={**CFG.tolerances, "sft_base_bits_per_byte": 0.02})
    champ = retrain_card(2.6, 1.8, seed=1)
    assert set(champ.docs) >= {"sft@drifted", "sft@base"} and champ.metrics["sft_drifted_bits_per_byte"] > 2.5
    won = decide(retrain_card(2.3, 1.8, seed=2), champ, CRIT, retrain_cfg)
    assert won.promote, won.reason
    assert won.compared["sft_drifted_bits_per_byte"]["docs"] == 12 and won.compared["sft_base_bits_per_byte"]["ok"]
    forgot = decide(retrain_card(2.3, 2.0, seed=2), champ, CRIT, retrain_cfg)    # base +11%: beyond 2%
    assert not forgot.promote and "sft_base_bits_per_byte regressed significantly" in forgot.reason
    same = decide(retrain_card(2.6, 1.8, seed=3), champ, CRIT, retrain_cfg)
    assert not same.promote and "primary sft_drifted_bits_per_byte" in same.reason
