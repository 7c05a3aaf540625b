"""Client-level DP at the server: Gaussian noise on the average of clipped client updates.

Flower's `DifferentialPrivacyClientSideFixedClipping` does the same for a plain FedAvg, but it
divides the noise by a fixed number of sampled clients and cannot sit behind our budget refusals
or secure aggregation; this keeps the noise matched to the updates actually averaged.
"""

from __future__ import annotations

import numpy as np

from common.client_dp import State, client_level_plan
from common.config import RunConfig
from common.privacy import epsilon_spent


class ServerSideNoise:
    """Adds N(0, (z C / m)^2) to the mean of m clipped updates; accounts one release a round."""

    def __init__(self, config: RunConfig, *, seeded: bool) -> None:
        self.event, self.delta = client_level_plan(config)
        self.clip_norm = config.privacy.clip_norm
        self.accountant = config.privacy.accountant_or_default
        self.seed = config.seed if seeded else None

    def privatise(self, mean_state: State, clients: int, server_round: int) -> State:
        """The noised average. Seeded (simulation only) the noise repeats per (seed, round), so
        a resumed simulation matches; deployed, it comes from the operating system's entropy:
        every client knows the run's seed and could otherwise regenerate and remove it."""
        rng = (np.random.default_rng() if self.seed is None
               else np.random.default_rng([self.seed, 3, server_round]))
        std = self.event.noise_multiplier * self.clip_norm / clients
        return {k: (v + rng.normal(0.0, std, size=v.shape)).astype(v.dtype)
                for k, v in mean_state.items()}

    def epsilon(self, releases: int) -> float:
        """Client-level epsilon after `releases` noised rounds."""
        return epsilon_spent([self.event] * releases, self.delta, self.accountant)
