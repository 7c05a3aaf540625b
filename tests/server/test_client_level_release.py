"""Client-level DP at the server: noise seeded only in simulation, secret in deployment; every
noised sum accounted before it is used."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedtune.common.client_dp import client_level_delta, client_level_plan
from fedtune.common.config import RunConfig
from fedtune.common.privacy import epsilon_spent
from fedtune.server.client_level_release import ReleaseLog, ServerSideNoise

SETTINGS = {"privacy.dp": True, "privacy.level": "client", "federation.num_clients": 10,
            "seed": 3}
MEAN = {"lora_A": np.zeros((4, 8), dtype=np.float32), "head": np.zeros(5, dtype=np.float32)}


def noise(source: ServerSideNoise, server_round: int = 1) -> np.ndarray:
    noised = source.privatise(MEAN, clients=5, server_round=server_round)
    return np.concatenate([noised[k].ravel() for k in sorted(noised)])


def server_noise(tmp_path: Path, *, seeded: bool) -> ServerSideNoise:
    config = RunConfig.from_mapping({**SETTINGS, "output.dir": str(tmp_path)})
    return ServerSideNoise(config, seeded=seeded)


def test_a_simulation_repeats_its_noise_for_a_resumed_run(tmp_path):
    assert np.array_equal(noise(server_noise(tmp_path, seeded=True)),
                          noise(server_noise(tmp_path, seeded=True)))


def test_a_deployed_servers_noise_cannot_be_regenerated_from_the_run_configuration(tmp_path):
    deployed = noise(server_noise(tmp_path, seeded=False))
    assert np.std(deployed) > 0
    assert not np.array_equal(deployed, noise(server_noise(tmp_path, seeded=False)))
    # what every client could compute from the seed it receives: the simulation's stream
    for server_round in (1, 2):
        regenerated = noise(server_noise(tmp_path, seeded=True), server_round)
        assert np.abs(deployed - regenerated).max() > 1e-3


def test_every_noised_average_is_accounted_before_it_is_returned(tmp_path, monkeypatch):
    source = server_noise(tmp_path, seeded=False)
    noise(source, server_round=1)
    assert source.epsilon() == pytest.approx(epsilon_spent([source.event], source.delta,
                                                           source.accountant))
    # a crash right after the average left (sent for evaluation, before any checkpoint): the
    # restarted server finds the release in its run directory and runs the round again
    restarted = server_noise(tmp_path, seeded=False)
    noise(restarted, server_round=1)
    assert ReleaseLog(tmp_path).rounds() == [1, 1]
    assert restarted.epsilon() == pytest.approx(epsilon_spent([source.event] * 2, source.delta,
                                                              source.accountant))
    # the account is written before the noised average is handed back
    monkeypatch.setattr(ReleaseLog, "record", lambda *_: (_ for _ in ()).throw(OSError("full")))
    with pytest.raises(OSError, match="full"):
        noise(restarted, server_round=2)


def test_a_checkpoint_from_before_the_log_keeps_its_count(tmp_path):
    log = ReleaseLog(tmp_path)
    log.at_least(3)
    log.at_least(2)
    assert len(log.rounds()) == 3


def test_client_level_delta_is_small_by_default():
    assert client_level_delta(5) == 1e-5  # not 1 / (10 x 5) = 0.02
    assert client_level_delta(10**6) == pytest.approx(10**-6.6)  # 1 / N^1.1
    config = RunConfig.from_mapping(SETTINGS)
    assert client_level_plan(config)[1] == 1e-5
