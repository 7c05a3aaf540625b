"""Client-level DP at the server: Gaussian noise on the average of clipped client updates, and
the account of every noised sum the server has held.

Flower's `DifferentialPrivacyClientSideFixedClipping` does the same for a plain FedAvg, but it
divides the noise by a fixed number of sampled clients and cannot sit behind our budget refusals
or secure aggregation; this keeps the noise matched to the updates actually averaged.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fedtune.common.atomic_file import write_atomic
from fedtune.common.client_dp import (
    State,
    client_level_plan,
    mean_noise_std,
    with_gaussian_noise,
)
from fedtune.common.config import RunConfig
from fedtune.common.privacy import epsilon_spent
from fedtune.common.run_dir import RELEASES_FILE


class ReleaseLog:
    """The rounds whose noised sum the server has held, one entry per sum (a round run again
    after a crash counts twice). An entry is written, durably, before the sum is used: before
    the shares that unmask it are asked for under secure aggregation, before the noised
    average is returned otherwise. So a sum the round then abandons, or one a crash leaves out
    of the checkpoint after it was sent for evaluation, is still accounted."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / RELEASES_FILE

    def rounds(self) -> list[int]:
        if not self.path.exists():
            return []
        return [int(r) for r in json.loads(self.path.read_text())["rounds"]]

    def record(self, server_round: int) -> int:
        """Account one more release (in round `server_round`); returns the total."""
        rounds = [*self.rounds(), server_round]
        write_atomic(self.path, json.dumps({"rounds": rounds}).encode())
        return len(rounds)

    def at_least(self, releases: int) -> None:
        """A run checkpointed before this log existed counted its releases in the checkpoint."""
        for _ in range(releases - len(self.rounds())):
            self.record(0)


class ServerSideNoise:
    """Adds N(0, (z C / m)^2) to the mean of m clipped updates; the account of the releases
    (`ReleaseLog`, also written by the secure exchange, whose clients add the noise)."""

    def __init__(self, config: RunConfig, *, seeded: bool) -> None:
        self.event, self.delta = client_level_plan(config)
        self.clip_norm = config.privacy.clip_norm
        self.accountant = config.privacy.accountant_or_default
        self.seed = config.seed if seeded else None
        self.log = ReleaseLog(config.output.dir)

    def privatise(self, mean_state: State, clients: int, server_round: int) -> State:
        """The noised average, accounted before it is returned. Seeded (simulation only) the
        noise repeats per (seed, round), so a resumed simulation matches; deployed, it comes
        from the operating system's entropy: every client knows the run's seed and could
        otherwise regenerate and remove it."""
        rng = (np.random.default_rng() if self.seed is None
               else np.random.default_rng([self.seed, 3, server_round]))
        noised = with_gaussian_noise(
            mean_state, mean_noise_std(self.event, self.clip_norm, clients), rng)
        self.log.record(server_round)
        return noised

    def epsilon(self) -> float:
        """Client-level epsilon after every release accounted so far."""
        return epsilon_spent([self.event] * len(self.log.rounds()), self.delta, self.accountant)
