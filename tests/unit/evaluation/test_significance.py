"""Paired bootstrap over documents: hand-checked deltas, intervals that must (not) cover zero."""
import numpy as np
import pytest

from components.evaluation.significance import paired_bootstrap


def test_delta_is_the_pooled_bits_per_byte_difference():
    # a: (10 + 30) / (10 + 20) = 4/3; b: (20 + 20) / 30 = 4/3 -> delta 0 exactly.
    iv = paired_bootstrap(np.array([10.0, 30.0]), np.array([20.0, 20.0]), np.array([10, 20]), n_boot=200)
    assert iv.delta == pytest.approx(0.0)
    # a: 9 / 30 = 0.3, b: 15 / 30 = 0.5 -> -0.2
    iv = paired_bootstrap(np.array([3.0, 6.0]), np.array([5.0, 10.0]), np.array([10, 20]), n_boot=200)
    assert iv.delta == pytest.approx(-0.2)


def test_a_constant_per_document_gain_is_significant_and_exact():
    # Every document 0.1 bits/byte better: every resample gives exactly -0.1.
    nbytes = np.arange(1, 41) * 10
    iv = paired_bootstrap(1.0 * nbytes, 1.1 * nbytes, nbytes, confidence=0.95, n_boot=500)
    assert iv.low == pytest.approx(-0.1) and iv.high == pytest.approx(-0.1) and iv.a_better
    assert "-0.1000 bits/byte" in iv.describe()


def test_noise_around_no_difference_covers_zero():
    rng = np.random.default_rng(0)
    nbytes = np.full(50, 100.0)
    a = (1.5 + rng.normal(0, 0.5, 50)) * nbytes
    b = (1.5 + rng.normal(0, 0.5, 50)) * nbytes
    iv = paired_bootstrap(a, b, nbytes)
    assert iv.low < 0 < iv.high and not iv.a_better


def test_pairing_removes_shared_document_difficulty():
    # Documents differ wildly in difficulty (1..5 bits/byte), but a beats b by 0.05 on each one:
    # an unpaired comparison would drown this in the spread; the paired one sees it.
    nbytes = np.full(30, 100.0)
    hard = np.linspace(1, 5, 30)
    iv = paired_bootstrap((hard - 0.05) * nbytes, hard * nbytes, nbytes)
    assert iv.a_better and iv.high == pytest.approx(-0.05)


def test_bad_arguments():
    with pytest.raises(ValueError):
        paired_bootstrap(np.ones(3), np.ones(2), np.ones(3))
    with pytest.raises(ValueError):
        paired_bootstrap(np.ones(3), np.ones(3), np.ones(3), confidence=1.0)
