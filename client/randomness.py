"""Independent random streams for one round of local training on one node.

Poisson sampling (which rows each DP-SGD step draws), the DP-SGD noise (or a client-level noise
share), the dropout layers' masks and secure aggregation's rounding each get a stream of their
own. Two generators seeded with one value are one Mersenne-Twister stream twice: the noise would
then be a function of which rows were drawn, which amplification by subsampling assumes cannot
happen. In simulation the streams are child seeds spawned from (run seed, round, client), so runs
repeat; a deployed node draws them from the operating system's entropy, so no one, the server
included, can regenerate its batches or its noise.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

import numpy as np

STREAMS = 4  # sampling, noise, dropout, rounding


@dataclass(frozen=True)
class RoundSeeds:
    sampling: int  # which rows each step draws (the data loader's generator)
    noise: int  # DP-SGD's Gaussian noise (Opacus' noise generator)
    dropout: int  # the dropout layers' masks (torch's global generator)
    rounding: int  # secure aggregation's stochastic rounding


def round_seeds(run_seed: int | None, server_round: int, client: str) -> RoundSeeds:
    """Spawned child seeds of (run seed, round, client); OS entropy when `run_seed` is None."""
    if run_seed is None:
        return RoundSeeds(*(secrets.randbits(63) for _ in range(STREAMS)))
    name_code = int.from_bytes(hashlib.sha256(client.encode()).digest()[:8], "big")
    children = np.random.SeedSequence([run_seed, server_round, name_code]).spawn(STREAMS)
    return RoundSeeds(*(int(c.generate_state(1, dtype=np.uint64)[0] >> 1) for c in children))
