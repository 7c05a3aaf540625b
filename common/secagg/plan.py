"""A round's summation (`Summation`) from the run configuration and the cohort size.

Client and server each compute it from their own copy of the configuration and the cohort they
see, so nothing about the encoding travels in a message for the server to bend. Under any DP
every survivor weighs the same (the divisor is the survivor count, public). Under client-level
DP with secure aggregation the clients add the noise themselves: each adds N(0, (z C)^2 / h),
with h the fewest *honest* inputs in any revealed sum (the fewest survivors less the colluders
the protocol tolerates), so every revealed sum holds noise of variance at least (z C)^2, the
variance the accountant assumes, even if the colluders leave their shares out.
"""

from __future__ import annotations

import math

from fedtune.common.client_dp import client_level_plan, noise_share_std
from fedtune.common.config import RunConfig
from fedtune.common.secagg.summation import NOISE_TAIL, Summation


def survivors_needed(config: RunConfig, cohort: int) -> int:
    """The fewest masked inputs a client reveals shares for: all but the tolerated dropouts."""
    return max(1, math.ceil((1.0 - config.secagg.dropout_tolerance) * cohort))


def colluders_tolerated(cohort: int) -> int:
    """Clients that may collude with the server, counted against the noise: a third of the
    cohort (the protocol's guarantees hold for fewer)."""
    return cohort // 3


def honest_minimum(config: RunConfig, cohort: int) -> int:
    """The fewest honest noise shares in any sum a client reveals shares for."""
    return max(1, survivors_needed(config, cohort) - colluders_tolerated(cohort))


def summation_for(config: RunConfig, cohort: int) -> Summation:
    """How this round's updates are summed, for a cohort of `cohort` clients."""
    secagg, privacy = config.secagg, config.privacy
    if not privacy.client_level:  # every update weighs the same under DP-SGD (unit weight)
        return Summation(cohort, secagg.bound, secagg.max_examples, weighted=not privacy.dp,
                         norm=config.federation.max_update_norm)
    event, _ = client_level_plan(config)
    clip = privacy.clip_norm
    share = noise_share_std(event, clip, honest_minimum(config, cohort))
    return Summation(cohort, clip + NOISE_TAIL * share, secagg.max_examples, weighted=False,
                     noise_std=share, survivors=survivors_needed(config, cohort), norm=clip)
