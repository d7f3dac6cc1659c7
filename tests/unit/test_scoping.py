"""Scoping: hand-computed Chinchilla and budget-to-steps arithmetic, the plan key (device, precision),
the probe at a tiny shape, the sizing loop with a fake probe, and the refusal of a too-small budget."""
from __future__ import annotations

import json
import math

import pytest

from components import config as cfg
from components import scoping
from components.errors import ConfigError


@pytest.fixture(autouse=True)
def _short_probes(monkeypatch):
    """Scoping's probes time >= 2 s of steps on a shared machine; in tests the minimum steps suffice."""
    from components import scoping_probe

    monkeypatch.setattr(scoping_probe, "PROBE_SECONDS", 0.0)


def test_param_count_by_hand():
    # d=32, ff=96, L=2, V=100: per layer 4*32*32 + 3*32*96 + 2*32 = 4096 + 9216 + 64 = 13376
    # total = 2*13376 + 100*32 + 32 = 26752 + 3200 + 32 = 29984
    assert scoping.param_count(2, 32, 100, 96) == 29984


def test_param_count_matches_the_model_we_build():
    from components.model.build import build_model, count_parameters

    shape = dict(n_layer=2, n_head=2, n_embd=32, block_size=64, intermediate_size=96, vocab_size=100)
    assert count_parameters(build_model(shape)) == scoping.param_count(2, 32, 100, 96)


def test_chinchilla_compute_limited_by_hand():
    # C = 1.2e12, r = 20: N = sqrt(1.2e12 / 120) = 1e5, D = 2e6, 6ND = 1.2e12
    plan = scoping.chinchilla_plan(1.2e12, available_tokens=1e7, tokens_per_param=20, max_epochs=1)
    assert plan.n_params == pytest.approx(1e5)
    assert plan.n_tokens == pytest.approx(2e6)
    assert plan.flops == pytest.approx(1.2e12)
    assert not plan.data_limited and plan.epochs == pytest.approx(0.2)


def test_chinchilla_data_limited_by_hand():
    # C = 1.2e14 wants N = 1e6, D = 2e7; only 1e6 tokens x 4 epochs = 4e6 -> D = 4e6, N = 2e5
    plan = scoping.chinchilla_plan(1.2e14, available_tokens=1e6, tokens_per_param=20, max_epochs=4)
    assert plan.data_limited
    assert plan.n_tokens == pytest.approx(4e6) and plan.n_params == pytest.approx(2e5)
    assert plan.flops == pytest.approx(6 * 2e5 * 4e6)


def test_shape_for_params_is_close_and_well_proportioned():
    shape = scoping.shape_for_params(2e6, vocab_size=4096, block_size=256)
    n = scoping.param_count(shape["n_layer"], shape["n_embd"], 4096, shape["intermediate_size"])
    assert abs(math.log(n / 2e6)) < 0.35
    assert shape["n_embd"] % shape["n_head"] == 0


def test_memory_estimate_by_hand():
    # 1000 params -> 16 kB of states; activations 2 * L*B*T*(34 d + 5 h T) = 2*1*1*4*(34*8 + 5*1*4) = 2336
    assert scoping.training_memory_bytes(1000, 1, 8, 1, 1, 4) == 16000 + 2336


def test_run_writes_plan_and_refuses_too_small_budget(tiny_settings):
    report = scoping.run(tiny_settings, measure_steps=1)
    out = tiny_settings.path("data", "scoping")
    assert json.loads((out / "model.json").read_text())["n_layer"] == report.model["n_layer"]
    assert json.loads((out / "report.json").read_text())["matmul_flops"] > 1e8
    assert report.serving_ms_per_token > 0 and report.train_memory_gb > 0
    s = cfg.load(tiny_settings.root / "params.yaml", ["scoping.budget_flops=1000", "scoping.min_params=100000"])
    with pytest.raises(ConfigError, match="min_params") as err:
        scoping.run(s, measure_steps=1)
    assert "FLOPs" in str(err.value)


# ----------------------------------------------------------------------------- budget -> steps
COSTS = scoping.StepCosts(step_s=0.5, val_batch_s=0.2, ckpt_s=0.1, fixed_s=10.0, warmup_s=0.0, loop_s=0.0, log_s=0.02)
CADENCE = scoping.Cadence(val_every=50, val_batches=8, ckpt_every=50)


def test_stage_seconds_by_hand():
    # 300 steps: fixed 10 + 300 * 0.5 = 150
    #   validations ceil(300/50) = 6, each 8 * 0.2 + 0.02 (its logged point) = 1.62 -> 9.72
    #   checkpoints 300 // 50 = 6, two files each at 0.1 -> 1.2
    #   logged points: every max(1, 300 // 100) = 3 steps -> 100 points * 0.02 = 2.0
    # total 10 + 150 + 9.72 + 1.2 + 2.0 = 172.92
    assert scoping.stage_seconds(300, COSTS, CADENCE) == pytest.approx(172.92)
    # 301 steps: one more step (0.5) and one more (final) validation (1.62): 175.04
    assert scoping.stage_seconds(301, COSTS, CADENCE) == pytest.approx(175.04)
    # warm-up extra and Lightning's per-step cost: + 2 + 300 * 0.01 = 5
    slower = scoping.StepCosts(**{**COSTS.__dict__, "warmup_s": 2.0, "loop_s": 0.01})
    assert scoping.stage_seconds(300, slower, CADENCE) == pytest.approx(177.92)


def test_steps_for_budget_by_hand():
    assert scoping.steps_for_budget(172.92 + 1e-9, COSTS, CADENCE) == 300
    assert scoping.steps_for_budget(175.0, COSTS, CADENCE) == 300      # 301 steps need 175.04
    assert scoping.steps_for_budget(175.05, COSTS, CADENCE) == 301
    # 1 step: 10 + 0.5 + one validation 1.62 + one point 0.02 = 12.14; below the fixed costs: still 1
    assert scoping.stage_seconds(1, COSTS, CADENCE) == pytest.approx(12.14)
    assert scoping.steps_for_budget(5.0, COSTS, CADENCE) == 1


# ----------------------------------------------------------------------------- plan key
def test_plan_key_includes_accelerator_and_precision(tiny_settings):
    key = scoping.plan_key(tiny_settings, "cpu", "cpu: X x2 threads", "32-true")
    assert key == scoping.plan_key(tiny_settings, "cpu", "cpu: X x2 threads", "32-true")
    others = {scoping.plan_key(tiny_settings, "cuda", "NVIDIA H200", "bf16-mixed"),
              scoping.plan_key(tiny_settings, "cuda", "NVIDIA H200", "16-mixed"),
              scoping.plan_key(tiny_settings, "cuda", "NVIDIA A100-SXM4-80GB", "bf16-mixed"),
              scoping.plan_key(tiny_settings, "cpu", "cpu: X x2 threads", "bf16-mixed"),
              scoping.plan_key(tiny_settings, "cpu", "cpu: X x16 threads", "32-true")}
    assert key not in others and len(others) == 5
    # The stage's costs depend on the validation cadence too.
    s = cfg.load(tiny_settings.root / "params.yaml", ["pretrain.val_every=7"])
    assert scoping.plan_key(s, "cpu", "cpu: X x2 threads", "32-true") != key


# ----------------------------------------------------------------------------- measuring
def test_training_target_on_cpu(tiny_settings):
    from components import scoping_probe

    t = scoping_probe.training_target(tiny_settings.pretrain.model_copy(update={"precision": "auto"}))
    assert (t.device, t.precision, t.world_size) == ("cpu", "32-true", 1)
    assert t.name.startswith("cpu: ") and "threads" in t.name


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_probe_runs_at_a_tiny_shape(tiny_settings, tmp_path, precision):
    from components import scoping_probe

    shape = dict(n_layer=1, n_head=1, n_embd=16, block_size=8, intermediate_size=32, vocab_size=50)
    cfg_ = tiny_settings.pretrain.model_copy(update={"batch_size": 2, "precision": precision})
    target = scoping_probe.Target(device="cpu", name="cpu", precision=precision, world_size=1)
    p = scoping_probe.probe(shape, cfg_, target, steps=2, scratch=tmp_path / "scratch")
    assert 0 < p.step_s < 5 and 0 < p.val_batch_s < 5 and 0 < p.ckpt_s < 5 and p.warmup_s > 0
    assert list((tmp_path / "scratch").iterdir()) == []  # the checkpoint file is removed


def test_run_sizes_with_the_measured_rate_and_keeps_the_budget(tiny_settings, monkeypatch):
    """A fake probe at a constant 100 GFLOP/s (6N per token), a corpus too big to limit: the loop must
    settle on a shape trained near tokens_per_param, and plan a stage that spends the budget (up to one
    step) without exceeding it."""
    from components import scoping_probe

    seen = []

    def fake_probe(shape, cfg_, target, steps, scratch=None):
        n = scoping.param_count(shape["n_layer"], shape["n_embd"], shape["vocab_size"], shape["intermediate_size"])
        seen.append(n)
        step = 6.0 * n * cfg_.batch_size * shape["block_size"] / 1e11
        return scoping_probe.Probe(step_s=step, val_batch_s=step / 3, ckpt_s=0.01, warmup_s=step)

    monkeypatch.setattr(scoping_probe, "probe", fake_probe)
    monkeypatch.setattr(scoping, "available_train_tokens", lambda settings: (1e10, "test"))
    s = cfg.load(tiny_settings.root / "params.yaml", [
        "scoping.budget_minutes=10", "scoping.stage_overhead_s=20", "scoping.min_params=1000",
        "tokenizer.vocab_size=4096", "pretrain.batch_size=16", "pretrain.val_every=50", "pretrain.ckpt_every=50"])
    report = scoping.run(s, measure_steps=1)
    assert report.budget_seconds == 600
    assert 600 - report.costs["step_s"] - 2 <= report.planned_pretrain_seconds <= 600
    assert 1 <= len(seen) <= s.scoping.probe_rounds
    ratio = report.tokens_to_train / report.n_params
    assert 20 / 2 < ratio < 20 * 2  # the shape grid is coarse: within 2x of Chinchilla's 20 tokens/param
    assert report.achieved_flops == pytest.approx(1e11)


def test_compiled_stage_counts_its_compilation(tiny_settings, monkeypatch):
    from components import scoping_probe

    monkeypatch.setattr(scoping_probe, "probe", lambda *a, **k: scoping_probe.Probe(0.01, 0.005, 0.001, 0.02))
    plain = scoping.run(tiny_settings, measure_steps=1)
    compiled = scoping.run(cfg.load(tiny_settings.root / "params.yaml", ["pretrain.compile=true"]), measure_steps=1)
    assert plain.costs["fixed_s"] == tiny_settings.scoping.stage_overhead_s
    assert compiled.costs["fixed_s"] == tiny_settings.scoping.stage_overhead_s + scoping.COMPILE_S
    assert compiled.plan_key != plain.plan_key


def test_reuse_only_on_the_same_device_and_precision(tiny_settings, monkeypatch):
    from components import scoping_probe

    first = scoping.run(tiny_settings, measure_steps=1)
    again = scoping.run(tiny_settings, measure_steps=1, reuse=True)
    assert again.reused and again.plan_key == first.plan_key and again.model == first.model
    gpu = scoping_probe.Target(device="cpu", name="NVIDIA H200", precision="bf16-mixed", world_size=1)
    monkeypatch.setattr(scoping_probe, "training_target", lambda cfg_: gpu)
    other = scoping.run(tiny_settings, measure_steps=1, reuse=True)
    assert not other.reused and other.plan_key != first.plan_key
    assert (other.device_name, other.precision) == ("NVIDIA H200", "bf16-mixed")


def test_shape_never_below_min_params_nor_one_head():
    # The default run's old optimum (~160k) with a 200k floor: the nearest shape must not lie below the floor.
    shape = scoping.shape_for_params(160_000, vocab_size=4096, block_size=256, min_params=200_000)
    n = scoping.param_count(shape["n_layer"], shape["n_embd"], 4096, shape["intermediate_size"])
    assert n >= 200_000 and shape["n_head"] >= 2 and shape["n_embd"] >= scoping.MIN_EMBD
    tiny = scoping.shape_for_params(10_000, vocab_size=4096, block_size=256)
    assert (tiny["n_embd"], tiny["n_head"]) == (64, 2)   # no 32-dim, 1-head model however small the target


def test_a_flop_budget_plans_the_same_model_and_steps_at_any_speed(tiny_settings, monkeypatch):
    """budget_flops: the model and the step count do not depend on the measured speed; the predicted wall time
    does, and the report keeps the speed the budget assumed beside it."""
    from components import scoping_probe

    def probe_at(flops_per_s):
        def fake_probe(shape, cfg_, target, steps, scratch=None):
            n = scoping.param_count(shape["n_layer"], shape["n_embd"], shape["vocab_size"], shape["intermediate_size"])
            step = 6.0 * n * cfg_.batch_size * shape["block_size"] / flops_per_s
            return scoping_probe.Probe(step_s=step, val_batch_s=step / 3, ckpt_s=0.01, warmup_s=step)
        return fake_probe

    monkeypatch.setattr(scoping, "available_train_tokens", lambda settings: (3.3e6, "test"))
    s = cfg.load(tiny_settings.root / "params.yaml", [
        "scoping.budget_flops=2.6e13", "scoping.tokens_per_param=2.5", "scoping.reference_tokens_per_sec=12000",
        "scoping.min_params=200000", "tokenizer.vocab_size=4096", "pretrain.batch_size=16", "model.block_size=256"])
    reports = []
    for speed in (0.5e11, 1e11, 2e11):
        monkeypatch.setattr(scoping_probe, "probe", probe_at(speed))
        reports.append(scoping.run(s, measure_steps=1))
    assert len({(r.n_params, r.pretrain_steps, tuple(sorted(r.model.items()))) for r in reports}) == 1
    r = reports[1]
    assert (r.model["n_layer"], r.model["n_embd"], r.model["n_head"]) == (4, 128, 4)
    step_flops = 6.0 * r.n_params * 16 * 256
    assert r.pretrain_steps * step_flops <= 2.6e13 < (r.pretrain_steps + 1) * step_flops
    assert reports[0].planned_pretrain_seconds > 1.9 * reports[1].planned_pretrain_seconds
    assert r.assumed_tokens_per_sec == 12000 and r.assumed_pretrain_seconds > 0
    assert any("same plan on every machine" in note for note in r.notes)
