"""Kneser-Ney trigram and add-one unigram baselines: hand-computed probabilities, normalisation, ranking.

The tiny cases are worked out by hand in the comments so the formulas can be checked line by line.
"""
import math
import time

import numpy as np
import pytest

from components.evaluation.ngram import KneserNeyTrigram, unigram_perplexity

D = 0.75


def test_hand_computed_trigram_case():
    # Sequence 0 1 0 1 2, V=3.
    # Trigrams (each once): (0,1,0) (1,0,1) (0,1,2).   Bigram types: (0,1) (1,0) (1,2).
    # Unigram continuation N1+(.w): w=0 <- {1}, w=1 <- {0}, w=2 <- {1}: all 1; N1+(..)=3, 3 seen.
    #   P1(w) = (1-D)/3 + D*3/3 * 1/3 = 1/12 + 1/4 = 1/3 for every w.
    # Bigram continuation N1+(.vw) from trigram tails: (1,0)<-{0}, (0,1)<-{1}, (1,2)<-{0}.
    #   v=1: N1+(.1.)=2, 2 followers.  P2(0|1) = (1-D)/2 + D*2/2*1/3 = 0.125 + 0.25 = 0.375
    #                                  P2(2|1) = 0.375, P2(1|1) = 0 + 0.25 = 0.25
    #   v=0: N1+(.0.)=1, 1 follower.   P2(1|0) = (1-D)/1 + D*1/1*1/3 = 0.5; P2(0|0)=P2(2|0)=0.25
    # Trigram context (0,1): c=2, 2 followers, lambda = D*2/2 = 0.75
    #   P3(0|0,1) = (1-D)/2 + 0.75*P2(0|1) = 0.125 + 0.28125 = 0.40625; P3(2|0,1) the same
    #   P3(1|0,1) = 0 + 0.75*P2(1|1) = 0.1875
    # Trigram context (1,0): c=1, lambda = 0.75
    #   P3(1|1,0) = 0.25 + 0.75*0.5 = 0.625; P3(0|1,0) = P3(2|1,0) = 0.75*0.25 = 0.1875
    # Unseen context (2,2) backs off to P2(.|2) which (v=2 never a context) is P1 = 1/3.
    m = KneserNeyTrigram(3, discount=D).fit(np.array([0, 1, 0, 1, 2]))
    assert math.exp(m.logprob((0, 1), 0)) == pytest.approx(0.40625)
    assert math.exp(m.logprob((0, 1), 1)) == pytest.approx(0.1875)
    assert math.exp(m.logprob((0, 1), 2)) == pytest.approx(0.40625)
    assert math.exp(m.logprob((1, 0), 1)) == pytest.approx(0.625)
    assert math.exp(m.logprob((1, 0), 2)) == pytest.approx(0.1875)
    assert math.exp(m.logprob((1,), 0)) == pytest.approx(0.375)
    assert math.exp(m.logprob((0,), 1)) == pytest.approx(0.5)
    assert math.exp(m.logprob((2, 2), 1)) == pytest.approx(1 / 3)
    # perplexity scores ids[1] with the bigram order and the rest with the trigram order.
    seq = np.array([0, 1, 0, 1, 2])
    # P(1|0)=0.5, P(0|0,1)=0.40625, P(1|1,0)=0.625, P(2|0,1)=0.40625
    expected = math.exp(-np.mean(np.log([0.5, 0.40625, 0.625, 0.40625])))
    assert m.perplexity(seq) == pytest.approx(expected)


def test_hand_computed_unigram_continuation_with_unseen_token():
    # Sequence 0 1 0 2 0, V=4 (token 3 never seen).
    # Bigram types (0,1) (1,0) (0,2) (2,0): N1+(.0)=2, N1+(.1)=1, N1+(.2)=1, N1+(.3)=0; total 4; 3 seen.
    #   uniform share D*3/4 * 1/4 = 0.140625
    #   P1(0) = 1.25/4 + 0.140625 = 0.453125; P1(1) = P1(2) = 0.25/4 + 0.140625 = 0.203125; P1(3) = 0.140625
    m = KneserNeyTrigram(4, discount=D).fit(np.array([0, 1, 0, 2, 0]))
    assert m.prob((), np.arange(4)) == pytest.approx([0.453125, 0.203125, 0.203125, 0.140625])
    assert m.logprob((3, 3), 3) > -math.inf  # unseen context and token still get mass


@pytest.mark.parametrize("context", [(), (5,), (1, 2), (2, 3), (7, 7), (0, 9)])
def test_distribution_sums_to_one(context):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 10, size=2000)
    ids[::7] = 3  # some structure so every order has non-trivial counts
    m = KneserNeyTrigram(12).fit(ids)  # V > max id: two tokens never seen at all
    p = m.prob(context, np.arange(12))
    assert p.sum() == pytest.approx(1.0, abs=1e-12)
    assert (p > 0).all()


def _repetitive(n: int, seed: int) -> np.ndarray:
    # A few fixed "phrases" concatenated at random with 5% noise tokens: strong local structure.
    rng = np.random.default_rng(seed)
    phrases = [np.array(p) for p in ([1, 2, 3, 4], [5, 6, 2, 7], [8, 9, 10], [11, 3, 12, 13, 14])]
    out = np.concatenate([phrases[i] for i in rng.integers(0, len(phrases), size=n // 3)])[:n]
    noise = rng.random(out.size) < 0.05
    out[noise] = rng.integers(0, 50, size=int(noise.sum()))
    return out


def test_kn_beats_unigram_on_held_out_repetitive_text():
    train, test = _repetitive(20_000, seed=1), _repetitive(4_000, seed=2)
    kn = KneserNeyTrigram(50).fit(train).perplexity(test)
    uni = unigram_perplexity(train, test, 50)
    assert 1.0 < kn < uni / 2, (kn, uni)


def test_unigram_add_one_hand_value():
    # counts over V=3: [2, 1, 0], N=3 -> P = [3/6, 2/6, 1/6]; test [0, 2]: ppl = exp(-(ln .5 + ln 1/6)/2)
    assert unigram_perplexity(np.array([0, 0, 1]), np.array([0, 2]), 3) == pytest.approx(math.sqrt(12))


def test_validation_errors():
    with pytest.raises(ValueError, match="token ids"):
        KneserNeyTrigram(3).fit(np.array([0, 1, 3]))
    with pytest.raises(RuntimeError, match="fit"):
        KneserNeyTrigram(3).perplexity(np.array([0, 1]))
    with pytest.raises(ValueError, match="at least 3"):
        KneserNeyTrigram(3).fit(np.array([0, 1]))


def test_fit_is_fast_on_a_million_tokens():
    # The spec budget is ~3M tokens in < 30 s on 2 cores; 1M here keeps the suite quick.
    ids = (np.random.default_rng(0).zipf(1.3, 1_000_000) % 4096).astype(np.uint16)
    t0 = time.perf_counter()
    m = KneserNeyTrigram(4096).fit(ids)
    ppl = m.perplexity(ids[:100_000])
    assert time.perf_counter() - t0 < 10
    assert math.isfinite(ppl) and ppl > 1
