"""Privacy accounting shared by clients (their ledgers) and the server (client-level DP).

A run of DP-SGD or of the client-level Gaussian mechanism is a list of `GaussianEvent`s; an
Opacus accountant, named by every caller (a ledger's own, PRV for a new one), turns any such
history into epsilon at a delta.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Protocol

from fedtune.common.errors import InputError


class PrivacyError(InputError, ValueError):
    """A privacy setting cannot be met (e.g. a budget too small for any noise level)."""


@dataclass(frozen=True)
class GaussianEvent:
    """`steps` subsampled Gaussian mechanism steps at one noise multiplier and sample rate."""

    noise_multiplier: float
    sample_rate: float
    steps: int


def epsilon_spent(events: Sequence[GaussianEvent], delta: float, accountant: str) -> float:
    """Epsilon at `delta` of the composition of every event (0 for an empty history), by the
    named accountant (no default: a ledger's own, or `PrivacyConfig.accountant_or_default`)."""
    steps: dict[tuple[float, float], int] = {}
    for e in events:  # rounds at one noise and rate compose as one run of their summed steps
        if e.steps > 0:
            key = (e.noise_multiplier, e.sample_rate)
            steps[key] = steps.get(key, 0) + e.steps
    return _epsilon(tuple(sorted(steps.items())), delta, accountant)


@lru_cache(maxsize=1024)
def _epsilon(steps: tuple[tuple[tuple[float, float], int], ...], delta: float,
             accountant: str) -> float:
    """Epsilon of a merged history ((noise, rate), steps); cached, as admission asks often."""
    history = [(noise, rate, count) for (noise, rate), count in steps]
    if not history:
        return 0.0
    if any(noise <= 0 for noise, _, _ in history):
        return math.inf
    from opacus.accountants import create_accountant  # Opacus brings torch: only when counting

    if accountant == "prv" and prv_grid_points(history, delta) > MAX_PRV_POINTS:
        accountant = "rdp"  # a valid upper bound too, looser, in constant memory
    counter = create_accountant(mechanism=accountant)
    counter.history = history
    try:
        epsilon = float(counter.get_epsilon(delta=delta))
    except RuntimeError:  # PRV cannot bound a sample rate below delta ("Cannot compute epsilon")
        return _epsilon(steps, delta, "rdp") if accountant == "prv" else math.inf
    if math.isnan(epsilon):  # never recorded as free (max(0.0, nan) is 0.0)
        return math.inf
    # PRV's numerical error can put a nearly free history slightly below zero (-2.6e-3 seen at
    # noise multiplier 1000); epsilon is never negative
    return max(0.0, epsilon)


# PRV discretises the privacy loss on a grid whose size grows with the steps, with 1/delta and
# with the loss itself (small noise, large sample rates): about 70 bytes a point measured here
# (1.1 million points: 80 MB). A history needing more is counted by RDP instead: every value a
# server can choose (noise at the node's floor, a sample rate of 1, a long horizon) then costs
# a node constant memory, never gigabytes.
MAX_PRV_POINTS = 5_000_000
PRV_EPS_ERROR = 0.01  # Opacus' default precision of get_epsilon, as every call here uses it


def prv_grid_points(history: Sequence[tuple[float, float, int]], delta: float) -> float:
    """Points of the grids Opacus' PRV accountant builds for `history` ((noise, rate, steps)
    each) at `delta`: its domain 2 L over its mesh, once for each distinct event. Computed as
    Gopi et al. size the domain, with RDP bounds only (milliseconds)."""
    from opacus.accountants.analysis.prv import (
        PoissonSubsampledGaussianPRV,
        compute_safe_domain_size,
    )

    delta_error = delta / 1000  # Opacus' default for get_epsilon
    steps = [count for _, _, count in history]
    mesh = PRV_EPS_ERROR / math.sqrt(sum(steps) * math.log(12 / delta_error) / 2)
    quick = len(history) * 2 * _domain_bound(history, delta_error) / mesh
    if quick <= MAX_PRV_POINTS:  # an upper bound already under the limit: no need for Opacus'
        return quick
    half_width = compute_safe_domain_size(
        [PoissonSubsampledGaussianPRV(rate, noise) for noise, rate, _ in history], steps,
        PRV_EPS_ERROR, delta_error)
    return len(history) * 2 * half_width / mesh


def _domain_bound(history: Sequence[tuple[float, float, int]], delta_error: float) -> float:
    """A quick upper bound (microseconds; Opacus' own takes a tenth of a second) of the
    half-width its RDP bounds give PRV's domain: each event's RDP at order a is at most the
    unsampled Gaussian's, a steps / (2 noise^2), and Opacus' conversion to epsilon adds at most
    log(1/delta) / (a - 1), at every order it tries."""
    import numpy as np
    from opacus.accountants import RDPAccountant

    orders = np.array(RDPAccountant.DEFAULT_ALPHAS, dtype=float)
    total = sum(steps for _, _, steps in history)
    rdp = sum(orders * steps / (2 * noise**2) for noise, _, steps in history)
    whole = np.min(rdp + math.log(4 / delta_error) / (orders - 1))
    one = max(np.min(orders / (2 * noise**2) + math.log(8 * total / delta_error) / (orders - 1))
              for noise, _, _ in history)
    return float(max(whole, one, PRV_EPS_ERROR)) + 3


SEARCH_TOLERANCE = 0.01  # how far under the target epsilon a calibrated noise may land
MAX_SEARCHED_NOISE = 2.0**20  # a target no noise up to this reaches is refused
MIN_REMEMBERED = 0.1  # a remembered noise below this is searched again (see _lands_at)


class NoiseMemo(Protocol):
    """Where a caller keeps calibrated noise multipliers between processes (a deployed node, which
    starts a process per message, on its own disk). A hint only: each value is checked again."""

    def recall_noise(self, question: str) -> float | None: ...

    def keep_noise(self, question: str, noise: float) -> None: ...


def noise_for_target(epsilon: float, delta: float, sample_rate: float, steps: int,
                     accountant: str, memo: NoiseMemo | None = None) -> float:
    """The smallest noise multiplier (to 0.01 in epsilon) whose `steps` stay within epsilon.

    With `memo`, a multiplier found before for the same question is used again once the
    accountant confirms it lands where a search would (within 0.01 under epsilon): one
    evaluation instead of a search of a dozen or more (a PRV search takes seconds)."""
    if memo is None:
        return _searched_noise(epsilon, delta, sample_rate, steps, accountant)
    question = json.dumps([accountant, epsilon, delta, sample_rate, steps])
    known = memo.recall_noise(question)
    if known is not None and _lands_at(known, epsilon, delta, sample_rate, steps, accountant):
        return known
    noise = _searched_noise(epsilon, delta, sample_rate, steps, accountant)
    memo.keep_noise(question, noise)
    return noise


def _lands_at(noise: object, epsilon: float, delta: float, sample_rate: float, steps: int,
              accountant: str) -> bool:
    """Whether a remembered `noise` is one the search could have returned. Below
    MIN_REMEMBERED it is searched again unchecked: the accountant's memory grows without bound
    as the noise shrinks (PRV wants 845 MiB at 0.05)."""
    if not isinstance(noise, float) or not math.isfinite(noise) or noise < MIN_REMEMBERED:
        return False
    try:
        spent = epsilon_spent([GaussianEvent(noise, sample_rate, steps)], delta, accountant)
    except Exception:  # a value no accountant takes is no hint
        return False
    return epsilon - SEARCH_TOLERANCE <= spent <= epsilon


@lru_cache(maxsize=64)
def _searched_noise(epsilon: float, delta: float, sample_rate: float, steps: int,
                    accountant: str) -> float:
    """Bisection for the smallest noise within SEARCH_TOLERANCE under `epsilon` (epsilon falls
    as the noise grows). Every probe goes through `_epsilon`, so none builds a PRV grid past
    MAX_PRV_POINTS; the probes never go below half the answer, and `high` always spends at
    most `epsilon`."""
    def spent(noise: float) -> float:
        return _epsilon((((noise, sample_rate), steps),), delta, accountant)

    low, high = 0.0, 1.0
    while spent(high) > epsilon:
        low, high = high, 2 * high
        if high > MAX_SEARCHED_NOISE:
            raise PrivacyError(f"no noise multiplier reaches epsilon {epsilon} at delta "
                               f"{delta:g} over {steps} steps at sample rate {sample_rate:.4g}: "
                               f"not even {MAX_SEARCHED_NOISE:g}")
    for _ in range(100):  # halves the interval each time: far past float precision
        # the second test ends a target that falls in the step where PRV takes over from RDP
        # (a grid at the limit): no noise lands within the tolerance there
        if epsilon - spent(high) <= SEARCH_TOLERANCE or high - low <= 1e-4 * high:
            break
        middle = (low + high) / 2
        if spent(middle) <= epsilon:
            high = middle
        else:
            low = middle
    return high


def default_delta(records: int) -> float:
    """1/(10 n): comfortably below 1/n, the point where 'delta' would allow releasing a record."""
    return 1.0 / (10 * max(records, 1))


def dp_sgd_schedule(records: int, batch_size: int, local_epochs: int,
                    local_steps: int) -> tuple[float, int]:
    """(Poisson sample rate, steps per round) of DP-SGD on `records` rows.

    Opacus' Poisson loader draws each row with rate 1/len(loader) = 1/ceil(n/B) per step, so
    an epoch is ceil(n/B) steps in expectation.
    """
    batches = math.ceil(records / batch_size)
    steps = local_steps if local_steps > 0 else local_epochs * batches
    return 1.0 / batches, steps
