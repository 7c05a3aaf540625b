"""A round's summation: what clients encode, and the noise shares under client-level DP."""

from __future__ import annotations

import numpy as np
import pytest

from fedtune.common.config import RunConfig
from fedtune.common.secagg.plan import honest_minimum, summation_for, survivors_needed
from fedtune.common.secagg.summation import NOISE_TAIL
from fedtune.server.secagg import SecAggAbort, SecAggServer

CLIENT_LEVEL = {"privacy.dp": True, "privacy.level": "client", "privacy.clip_norm": 0.5,
                "privacy.noise_multiplier": 1.2, "federation.num_clients": 20}


def test_plain_summation_weights_by_examples_within_the_bound():
    summation = summation_for(RunConfig(), 10)
    assert summation.weighted and summation.noise_std == 0 and summation.bound == 1.0
    change = {"a": np.array([0.5, -3.0]), "b": np.array([[2.0]])}
    vector = summation.to_vector(change, examples=50_000, loss=0.7)
    w = 50_000 / summation.max_examples
    np.testing.assert_allclose(vector, [w * 0.5, -w * 1.0, w * 1.0, w, w, w * 0.7 / 20])
    assert np.abs(vector).max() <= summation.encoding.bound


def test_the_noise_shares_of_the_fewest_honest_survivors_add_up_to_the_full_noise():
    config = RunConfig.from_mapping(CLIENT_LEVEL)
    summation = summation_for(config, 10)
    r = survivors_needed(config, 10)
    honest = honest_minimum(config, 10)  # 8 survivors, 3 of them perhaps colluders
    assert (r, honest) == (8, 5) and summation.survivors == r and not summation.weighted
    assert summation.noise_std == pytest.approx(1.2 * 0.5 / np.sqrt(honest))
    assert summation.bound == pytest.approx(0.5 + NOISE_TAIL * summation.noise_std)
    rng = np.random.default_rng(0)
    sums = rng.normal(0.0, summation.noise_std, size=(honest, 200_000)).sum(axis=0)
    assert sums.std() == pytest.approx(1.2 * 0.5, rel=0.01)  # z C, as the accountant assumes


def test_under_any_dp_every_update_weighs_the_same_and_sends_no_count():
    for settings in ({"privacy.dp": True}, CLIENT_LEVEL):
        summation = summation_for(RunConfig.from_mapping(settings), 10)
        vector = summation.to_vector({"a": np.array([0.25])}, examples=50_000, loss=0.7)
        assert not summation.weighted
        np.testing.assert_allclose(vector[-3:], [1.0, 0.0, 0.0])


def test_an_honest_change_is_clipped_to_the_norm_then_the_bound():
    summation = summation_for(RunConfig.from_mapping({"federation.max_update_norm": 1.0}), 10)
    vector = summation.to_vector({"a": np.array([3.0, 4.0])}, examples=100_000, loss=0.0)
    np.testing.assert_allclose(vector[:2], [0.6, 0.8])


def test_the_server_reveals_nothing_for_fewer_survivors_than_the_noise_needs():
    from fedtune.client.secagg import SecAggClient

    server = SecAggServer(server_round=1)
    clients = {f"c{i}": SecAggClient(f"c{i}", server.session, 1) for i in range(7)}
    server.make_cohort({n: c.signed_keys() for n, c in clients.items()})
    masked = {n: np.zeros(3, np.uint32) for n in list(clients)[:5]}  # 5 of 7 masked
    assert server.survivors(masked) == sorted(masked)  # the threshold (5 of 7) allows it
    with pytest.raises(SecAggAbort, match="6 are needed"):
        server.survivors(masked, at_least=6)


def test_dropout_tolerance_is_validated():
    from fedtune.common.config import ConfigError

    with pytest.raises(ConfigError, match=r"secagg\.dropout_tolerance"):
        RunConfig.from_mapping({"secagg.dropout_tolerance": 1.0})
    with pytest.raises(ConfigError, match=r"secagg\.bound"):
        RunConfig.from_mapping({"secagg.bound": 0})
