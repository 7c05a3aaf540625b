"""A round's summation (`Summation`) from the run configuration and the cohort size.

Client and server each compute it from their own copy of the configuration and the cohort they
see, so nothing about the encoding travels in a message for the server to bend. Under
client-level DP with secure aggregation the clients add the noise themselves: each adds
N(0, (z C)^2 / r), where r is the fewest survivors any sum is revealed for, so every revealed
sum of m >= r inputs holds noise of variance m (z C)^2 / r >= (z C)^2, the variance the
accountant assumes, and the server never sees an un-noised sum.
"""

from __future__ import annotations

import math

from common.client_dp import client_level_plan
from common.config import RunConfig
from common.secagg.protocol import Summation

NOISE_TAIL = 10.0  # the bound leaves room for 10 standard deviations of a noise share


def survivors_needed(config: RunConfig, cohort: int) -> int:
    """The fewest masked inputs a client reveals shares for: all but the tolerated dropouts."""
    return max(1, math.ceil((1.0 - config.secagg.dropout_tolerance) * cohort))


def summation_for(config: RunConfig, cohort: int) -> Summation:
    """How this round's updates are summed, for a cohort of `cohort` clients."""
    if not config.privacy.client_level:
        return Summation(cohort, config.secagg.bound, config.secagg.max_examples)
    survivors = survivors_needed(config, cohort)
    event, _ = client_level_plan(config)
    clip = config.privacy.clip_norm
    share = event.noise_multiplier * clip / math.sqrt(survivors)
    return Summation(cohort, clip + NOISE_TAIL * share, config.secagg.max_examples,
                     weighted=False, noise_std=share, survivors=survivors)
