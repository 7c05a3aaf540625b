"""The one-run bound (Steinke, Nasr, Jagielski 2023) against hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import binom

from fedtune.common.one_run_audit import (
    best_guess,
    coin_bias,
    count_right,
    detectable_ceiling,
    epsilon_lower_bound,
    guess_sizes,
    p_value,
    tpr_at_fpr,
)

# A fixed guess vector: 20 canaries, scores falling with the index; members marked 1.
SCORES = [20 - i for i in range(20)]
INCLUDED = [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 1, 0, 0, 1, 0, 0, 1, 0, 0, 0]


def test_right_guesses_are_counted_from_the_top_and_bottom_scores():
    assert count_right(SCORES, INCLUDED, 10, 0) == 9  # the top ten hold one non-member
    assert count_right(SCORES, INCLUDED, 5, 5) == 5 + 4  # the bottom five hold one member
    with pytest.raises(ValueError):
        count_right(SCORES, INCLUDED, 15, 6)


def test_all_right_with_delta_zero_has_a_closed_form():
    # r guesses all right: p(eps) = q^r, so the bound is the eps with q = beta^(1/r).
    q = 0.05 ** (1 / 10)
    assert epsilon_lower_bound(20, 10, 10, 0.0, 0.95) == pytest.approx(
        math.log(q / (1 - q)), abs=1e-9)


def test_delta_zero_is_the_binomial_tail():
    m, r, v = 20, 10, 9  # the fixed guess vector's top ten
    assert count_right(SCORES, INCLUDED, r, 0) == v
    bound = epsilon_lower_bound(m, r, v, 0.0, 0.95)
    tail = sum(math.comb(r, k) * coin_bias(bound) ** k * (1 - coin_bias(bound)) ** (r - k)
               for k in range(v, r + 1))
    assert tail == pytest.approx(0.05, abs=1e-9)  # the largest eps still rejected at 5%
    assert binom.sf(v - 1, r, coin_bias(bound + 1e-6)) > 0.05
    assert 0 < bound < epsilon_lower_bound(m, r, r, 0.0, 0.95)


def test_the_delta_term_matches_a_hand_computation():
    m, r, v, eps, delta = 20, 10, 9, 1.0, 1e-3
    q = math.e / (1 + math.e)

    def pmf(k: int) -> float:
        return math.comb(r, k) * q ** k * (1 - q) ** (r - k)

    tail = pmf(9) + pmf(10)
    # max over i of P[v - i <= Bin < v] / i, written out for i = 1..9
    worst = max(sum(pmf(v - j) for j in range(1, i + 1)) / i for i in range(1, v + 1))
    assert worst == pytest.approx(pmf(8))  # here i = 1 is the largest
    assert p_value(m, r, v, eps, delta) == pytest.approx(tail + 2 * m * delta * worst,
                                                         rel=1e-12)


def test_delta_only_lowers_the_bound_and_a_large_delta_removes_it():
    no_delta = epsilon_lower_bound(1000, 100, 90, 0.0, 0.95)
    assert epsilon_lower_bound(1000, 100, 90, 1e-5, 0.95) < no_delta
    assert epsilon_lower_bound(1000, 100, 90, 0.1, 0.95) == 0.0
    assert epsilon_lower_bound(1000, 100, 50, 0.0, 0.95) == 0.0  # coin flips prove nothing


def test_several_guesses_are_corrected_for_trying_them():
    scores = list(range(100, 0, -1))
    included = [True] * 40 + [False, True] * 30
    tried = best_guess(scores, included, 0.0, 0.95)
    assert [(g.positives, g.negatives) for g in tried] == [
        (2, 0), (2, 2), (5, 0), (5, 5), (10, 0), (10, 10), (20, 0), (20, 20), (50, 0), (50, 50)]
    assert (tried[6].right, tried[7].right) == (20, 20 + 10)  # half the bottom 20 are not in
    # each is tested at 1 - 0.05 / 10, below what the same guess gets alone
    assert tried[7].epsilon == pytest.approx(epsilon_lower_bound(100, 40, 30, 0.0, 0.995))
    assert tried[7].epsilon < epsilon_lower_bound(100, 40, 30, 0.0, 0.95)


def test_the_best_of_top_only_and_both_ends_keeps_the_power_of_either():
    m = 400
    uniform = [i < 200 for i in range(m)]  # every member above every non-member
    sparse = [i < 20 or (i >= 200 and i % 2 == 0) for i in range(m)]  # 20 memorised, rest noise
    scores = [float(m - i) for i in range(m)]
    for included in (uniform, sparse):
        tried = best_guess(scores, included, 1e-5, 0.95)
        best = max(tried, key=lambda g: g.epsilon)
        assert best.epsilon > 1.0
    assert max(best_guess(scores, uniform, 1e-5, 0.95), key=lambda g: g.epsilon).negatives > 0
    assert max(best_guess(scores, sparse, 1e-5, 0.95), key=lambda g: g.epsilon).negatives == 0
    assert guess_sizes(3) == [1, 1, 1, 1, 1] and guess_sizes(10, (0.5,)) == [5]


def test_an_epsilon_dp_mechanism_is_bounded_above_its_epsilon_at_most_5pct_of_the_time():
    """Randomised response on each canary is exactly epsilon-DP: the worst case for the test."""
    rng, epsilon, trials, over = np.random.default_rng(1), 1.0, 400, 0
    for _ in range(trials):
        included = rng.random(200) < 0.5
        truthful = rng.random(200) < coin_bias(epsilon)
        scores = np.where(included == truthful, 1.0, -1.0) + rng.random(200) * 1e-3
        over += max(g.epsilon for g in best_guess(scores, included, 0.0, 0.95)) > epsilon
    assert over <= 0.05 * trials  # measured 4 of 400; without the correction 37


def test_tpr_at_low_fpr_counts_members_above_the_allowed_non_members():
    scores = [10, 9, 8, 7, 6, 5, 4, 3, 2, 1]
    included = [1, 1, 0, 1, 0, 0, 0, 0, 0, 0]
    assert tpr_at_fpr(scores, included, 0.0) == pytest.approx(2 / 3)
    assert tpr_at_fpr(scores, included, 0.15) == pytest.approx(1.0)  # one non-member allowed


def test_the_ceiling_is_the_bound_when_every_guess_is_right():
    m = 200
    included = [i < 100 for i in range(m)]  # the members score highest: every guess right
    scores = [float(m - i) for i in range(m)]
    best = max(g.epsilon for g in best_guess(scores, included, 2.5e-4, 0.95))
    assert detectable_ceiling(m, 2.5e-4, 0.95) == pytest.approx(best)
    assert 2.5 < best < 3.0  # 2 m delta = 0.1 caps it, whatever the model leaks
    assert detectable_ceiling(m, 0.02, 0.95) == 0.0  # client level: 2 m delta = 8, no bound
