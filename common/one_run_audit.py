"""The one-run lower bound on epsilon of Steinke, Nasr and Jagielski (NeurIPS 2023, "Privacy
Auditing with One (1) Training Run"), from membership guesses on canaries.

m canaries are each included with probability 1/2 from a secret draw; from the trained model the
auditor guesses "in" for some canaries and "out" for others (r guesses), of which v are right. If
the training is (epsilon, delta)-DP, v is at most what r flips of a coin with bias
e^eps / (1 + e^eps) give, up to a delta term (their Corollary 5.4):

    P[V >= v] <= P[Bin(r, q) >= v] + 2 m delta max_{1<=i<=v} P[v-i <= Bin(r, q) < v] / i.

The bound is the largest epsilon this inequality rejects at the asked confidence.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import binom

# Guesses fixed before any score is seen, for each share of m (k = share x m): the top k scores
# guessed "in"; and the top k "in" with the bottom k "out". The best of the 2 x 5 is reported
# with a Bonferroni correction (each tested at (1 - confidence)/10). Both ends double what a
# uniformly memorised set proves (banking77, sst2: docs/audit.md); the top alone keeps the power
# where only a few canaries are memorised and the bottom is noise.
GUESS_SHARES = (0.02, 0.05, 0.1, 0.2, 0.5)
SEARCH_STEPS = 40  # bisection steps: epsilon to ~1e-11 of its bracket


def coin_bias(epsilon: float) -> float:
    """e^eps / (1 + e^eps): the accuracy of eps-DP randomised response, the best a guess can do."""
    return 1.0 / (1.0 + math.exp(-epsilon))


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """Probability of >= v right out of r guesses on m canaries if training is (eps, delta)-DP."""
    _check_counts(m, r, v)
    q = coin_bias(epsilon)
    tail = float(binom.sf(v - 1, r, q))  # P[Bin(r, q) >= v]
    if delta == 0 or v == 0:
        return min(tail, 1.0)
    below = binom.pmf(np.arange(v - 1, -1, -1), r, q)  # P[Bin = v-1], P[Bin = v-2], ...
    worst = float(np.max(np.cumsum(below) / np.arange(1, v + 1)))
    return min(tail + 2 * m * delta * worst, 1.0)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, confidence: float) -> float:
    """The largest epsilon rejected at `confidence` by v right of r guesses (0 if none is)."""
    _check_counts(m, r, v)
    beta = 1.0 - confidence
    if p_value(m, r, v, 0.0, delta) >= beta:
        return 0.0
    low, high = 0.0, 1.0
    while p_value(m, r, v, high, delta) < beta:
        low, high = high, 2 * high
        if high > 1e4:  # every guess right and delta 0: the bound grows with r, never infinite
            return low
    for _ in range(SEARCH_STEPS):
        middle = (low + high) / 2
        if p_value(m, r, v, middle, delta) < beta:
            low = middle
        else:
            high = middle
    return low


@dataclass(frozen=True)
class Guess:
    """One way of guessing: the top `positives` scores "in", the bottom `negatives` "out"."""

    positives: int
    negatives: int
    right: int
    epsilon: float  # the bound this guess alone gives at the corrected confidence

    @property
    def guesses(self) -> int:
        return self.positives + self.negatives


def count_right(scores: Sequence[float], included: Sequence[bool], positives: int,
                negatives: int) -> int:
    """Right guesses when the `positives` highest scores are called members and the `negatives`
    lowest non-members (ties broken by canary index, never by membership)."""
    if positives + negatives > len(scores):
        raise ValueError(f"{positives}+{negatives} guesses on {len(scores)} canaries")
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    member = np.asarray(included, dtype=bool)[order]
    return int(member[:positives].sum() + (~member[len(member) - negatives:]).sum())


def guess_sizes(m: int, shares: Sequence[float] = GUESS_SHARES) -> list[int]:
    """k for each share: at least 1, and 2k at most m (k "in" and k "out" guesses fit)."""
    return [min(max(1, round(share * m)), m // 2) for share in shares]


def guess_plan(m: int, shares: Sequence[float] = GUESS_SHARES) -> list[tuple[int, int]]:
    """Every pre-declared (positives, negatives): (k, 0) and (k, k) for each share."""
    return [(k, out) for k in guess_sizes(m, shares) for out in (0, k)]


def best_guess(scores: Sequence[float], included: Sequence[bool], delta: float,
               confidence: float, shares: Sequence[float] = GUESS_SHARES) -> tuple[Guess, ...]:
    """Every pre-declared guess, each bounded at confidence 1 - (1 - confidence)/K; the largest
    of their bounds holds at `confidence` (union bound over the K tries)."""
    m, plan = len(scores), guess_plan(len(scores), shares)
    corrected = 1.0 - (1.0 - confidence) / len(plan)
    tried = []
    for positives, negatives in plan:
        right = count_right(scores, included, positives, negatives)
        bound = epsilon_lower_bound(m, positives + negatives, right, delta, corrected)
        tried.append(Guess(positives, negatives, right, bound))
    return tuple(tried)


def detectable_ceiling(m: int, delta: float, confidence: float,
                       shares: Sequence[float] = GUESS_SHARES) -> float:
    """The largest bound `best_guess` can give on m canaries, with every guess right: an audit
    cannot tell apart two runs whose epsilons both lie above it (2 m delta caps what any
    number of right guesses proves)."""
    plan = guess_plan(m, shares)
    corrected = 1.0 - (1.0 - confidence) / len(plan)
    return max(epsilon_lower_bound(m, p + n, p + n, delta, corrected) for p, n in set(plan))


def tpr_at_fpr(scores: Sequence[float], included: Sequence[bool], fpr: float) -> float:
    """True-positive rate at the threshold that lets at most `fpr` of non-members through."""
    values = np.asarray(scores, dtype=np.float64)
    member = np.asarray(included, dtype=bool)
    outside = np.sort(values[~member])[::-1]
    if not member.any():
        return 0.0
    allowed = math.floor(fpr * len(outside))
    threshold = outside[allowed] if allowed < len(outside) else -np.inf
    return float((values[member] > threshold).mean())


def _check_counts(m: int, r: int, v: int) -> None:
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= right ({v}) <= guesses ({r}) <= canaries ({m})")
