"""What one round of DP-SGD on a node will spend, planned from public values before any row is
read: the sample rate, the steps and the noise (the training itself is `client/dp_sgd.py`).

Accounting only, no torch: a node admits or refuses a request before it loads a model.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedtune.common.config import RunConfig
from fedtune.common.privacy import (
    GaussianEvent,
    NoiseMemo,
    default_delta,
    dp_sgd_schedule,
    noise_for_target,
)


@dataclass(frozen=True)
class DPRoundPlan:
    """What one round of DP-SGD on this client will spend, fixed before it trains."""

    event: GaussianEvent
    delta: float
    max_grad_norm: float
    expected_batch: float  # sample rate x planning rows: the public divisor of each noisy sum
    head_clip_share: float = 0.0  # of max_grad_norm's square, the head's own bound; 0 = one norm


def round_schedule(config: RunConfig, planning_rows: int) -> tuple[float, int]:
    """(sample rate, steps) of one DP-SGD round of this run on `planning_rows` rows: what the
    plan calibrates and the horizon limit counts (public values only)."""
    train = config.training
    return dp_sgd_schedule(planning_rows, train.batch_size, train.local_epochs,
                           train.local_steps)


def plan_round(config: RunConfig, planning_rows: int, delta: float | None = None,
               accountant: str = "", memo: NoiseMemo | None = None) -> DPRoundPlan:
    """Noise for the whole planned horizon (every round x this round's steps), not per round.

    Every input is public: the request, and the node's `planning_rows` and `delta` (a deployed
    node's from its policy, never from its row count; None: the run's delta, else 1/(10 n) of
    the planning rows, as a simulation uses). `memo`: a deployed node's calibrations kept on its
    disk (`NodeState`). Raises PrivacyError when no noise reaches the target."""
    privacy = config.privacy
    accountant = accountant or privacy.accountant_or_default
    delta = delta or privacy.delta or default_delta(planning_rows)
    sample_rate, steps = round_schedule(config, planning_rows)
    noise = privacy.noise_multiplier or noise_for_target(
        privacy.epsilon, delta, sample_rate, steps * config.federation.rounds, accountant, memo)
    return DPRoundPlan(GaussianEvent(noise, sample_rate, steps), delta,
                       config.training.max_grad_norm,
                       expected_batch=sample_rate * planning_rows,
                       head_clip_share=config.training.head_clip_share)
