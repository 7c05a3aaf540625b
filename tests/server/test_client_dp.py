"""Client-level DP noise at the server: seeded only in simulation, secret in deployment."""

from __future__ import annotations

import numpy as np

from common.config import RunConfig
from server.client_dp import ServerSideNoise

CONFIG = RunConfig.from_mapping({"privacy.dp": True, "privacy.level": "client",
                                 "federation.num_clients": 10, "seed": 3})
MEAN = {"lora_A": np.zeros((4, 8), dtype=np.float32), "head": np.zeros(5, dtype=np.float32)}


def noise(source: ServerSideNoise, server_round: int = 1) -> np.ndarray:
    noised = source.privatise(MEAN, clients=5, server_round=server_round)
    return np.concatenate([noised[k].ravel() for k in sorted(noised)])


def test_a_simulation_repeats_its_noise_for_a_resumed_run():
    assert np.array_equal(noise(ServerSideNoise(CONFIG, seeded=True)),
                          noise(ServerSideNoise(CONFIG, seeded=True)))


def test_a_deployed_servers_noise_cannot_be_regenerated_from_the_run_configuration():
    deployed = noise(ServerSideNoise(CONFIG, seeded=False))
    assert np.std(deployed) > 0
    assert not np.array_equal(deployed, noise(ServerSideNoise(CONFIG, seeded=False)))
    # what every client could compute from the seed it receives: the simulation's stream
    for server_round in (1, 2):
        regenerated = noise(ServerSideNoise(CONFIG, seeded=True), server_round)
        assert np.abs(deployed - regenerated).max() > 1e-3
