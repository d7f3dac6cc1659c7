"""Scoping arithmetic against hand-computed Chinchilla numbers, and the refusal of a too-small budget."""
from __future__ import annotations

import json
import math

import pytest

from components import config as cfg
from components import scoping
from components.errors import ConfigError


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
