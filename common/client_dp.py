"""Client-level DP (DP-FedAvg, McMahan et al. 2018): bound each client's whole update, then
Gaussian noise on the sum. Clients clip; the server (or, with secure aggregation, the clients
themselves) adds the noise; the accountant sees one release per round. The clip, the plan, the
noise's size on either path and the draw itself are defined here, once.
"""

from __future__ import annotations

import math

import numpy as np

from fedtune.common.config import RunConfig
from fedtune.common.privacy import GaussianEvent, noise_for_target

State = dict[str, np.ndarray]


def update_norm(global_state: State, local_state: State) -> float:
    """L2 norm of (local - global) over every trainable tensor together."""
    squares = sum(float(np.sum((local_state[k].astype(np.float64) - global_state[k]) ** 2))
                  for k in global_state)
    return float(np.sqrt(squares))


def clip_update(global_state: State, local_state: State, clip_norm: float) -> State:
    """global + (local - global) scaled down so its L2 norm is at most `clip_norm`."""
    norm = update_norm(global_state, local_state)
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return {k: (global_state[k] + scale * (local_state[k] - global_state[k])).astype(
        local_state[k].dtype) for k in global_state}


CLIENT_DELTA = 1e-5  # client-level delta for populations up to 35,000 clients


def client_level_delta(clients: int) -> float:
    """The default client-level delta for a population of `clients`: 1e-5, or 1 / N^1.1 where
    that is smaller (beyond about 35,000 clients), so that delta stays well below 1 / N, the
    point where it would allow releasing one client's data outright."""
    return min(CLIENT_DELTA, max(clients, 1) ** -1.1)


def client_level_plan(config: RunConfig) -> tuple[GaussianEvent, float]:
    """(one round's release, delta). Sampling is the server's choice, so no amplification is
    claimed: sample rate 1, noise for `rounds` releases at the target epsilon. Neighbouring
    data sets differ by one client's whole data (added or removed: its clipped update present
    or zero), so one release is the Gaussian mechanism with sensitivity C."""
    privacy, clients = config.privacy, config.federation.num_clients
    delta = privacy.delta or client_level_delta(clients)
    noise = privacy.noise_multiplier or noise_for_target(
        privacy.epsilon, delta, 1.0, config.federation.rounds, privacy.accountant_or_default)
    return GaussianEvent(noise, 1.0, 1), delta


def mean_noise_std(event: GaussianEvent, clip_norm: float, clients: int) -> float:
    """Noise std on the average of `clients` clipped updates, added once by the server: the
    sum's z C, divided like the sum."""
    return event.noise_multiplier * clip_norm / clients


def noise_share_std(event: GaussianEvent, clip_norm: float, honest: int) -> float:
    """Noise std each client adds to its own update under secure aggregation, so that any sum
    of at least `honest` honest shares holds the variance (z C)^2 the accountant assumes."""
    return event.noise_multiplier * clip_norm / math.sqrt(honest)


def with_gaussian_noise(state: State, std: float, rng: np.random.Generator) -> State:
    """`state` plus independent N(0, std^2) on every value, in each tensor's own dtype."""
    return {k: (v + rng.normal(0.0, std, size=v.shape)).astype(v.dtype)
            for k, v in state.items()}
