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

    counter = create_accountant(mechanism=accountant)
    counter.history = history
    # PRV's numerical error can put a nearly free history slightly below zero (-2.6e-3 seen at
    # noise multiplier 1000); epsilon is never negative
    return max(0.0, float(counter.get_epsilon(delta=delta)))


SEARCH_TOLERANCE = 0.01  # how far under the target epsilon a calibrated noise may land
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
    from opacus.accountants.utils import get_noise_multiplier

    try:
        return float(get_noise_multiplier(target_epsilon=epsilon, target_delta=delta,
                                          sample_rate=sample_rate, steps=steps,
                                          accountant=accountant,
                                          epsilon_tolerance=SEARCH_TOLERANCE))
    except ValueError as error:
        raise PrivacyError(f"no noise multiplier reaches epsilon {epsilon} at delta {delta:g} "
                           f"over {steps} steps at sample rate {sample_rate:.4g}: "
                           f"{error}") from None


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
