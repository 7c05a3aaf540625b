"""The decoded sum is checked against what honest inputs allow; honest ones always pass."""

from __future__ import annotations

import numpy as np
import pytest

from fedtune.common.config import RunConfig
from fedtune.common.secagg.plan import summation_for
from fedtune.common.secagg.summation import ImpossibleSum, Summation

LIKE = {"a": np.zeros((4, 8)), "b": np.zeros(5)}
CLIENT_LEVEL = {"privacy.dp": True, "privacy.level": "client", "privacy.clip_norm": 0.5,
                "privacy.noise_multiplier": 1.0, "federation.num_clients": 10}


def honest_sum(summation: Summation, clients: int, rng: np.random.Generator, *,
               scale: float = 0.3) -> np.ndarray:
    """The exact sum of `clients` honest inputs (what the ring decodes, up to rounding), with
    a noise share each where the summation carries one."""
    total = 0.0
    for _ in range(clients):
        change = {k: rng.normal(scale=scale, size=v.shape) for k, v in LIKE.items()}
        if summation.noise_std:
            norm = np.sqrt(sum(float(np.sum(v**2)) for v in change.values()))
            change = {k: v * min(1.0, summation.norm / norm) + rng.normal(
                0.0, summation.noise_std, size=v.shape) for k, v in change.items()}
        total = total + summation.to_vector(change, int(rng.integers(1, 10**6)),
                                            float(rng.uniform(0, 30)))
    return total


@pytest.mark.parametrize("settings", [{}, {"privacy.dp": True}, CLIENT_LEVEL],
                         ids=["weighted", "dp-sgd", "client-level"])
def test_honest_inputs_always_pass_and_average_within_the_bounds(settings):
    summation = summation_for(RunConfig.from_mapping(settings), 10)
    rng = np.random.default_rng(0)
    for clients in (8, 10):
        change, sums = summation.average(honest_sum(summation, clients, rng), LIKE, clients)
        values = np.concatenate([v.ravel() for v in change.values()])
        assert np.abs(values).max() <= summation.bound
        assert change["a"].shape == (4, 8)
        if summation.weighted:
            assert 0 < sums["examples"] <= clients * summation.max_examples
        else:  # under DP no count or loss is summed
            assert sums == {"examples": 0.0, "loss-sum": 0.0}


def test_unweighted_the_divisor_is_the_survivor_count_and_the_weight_must_match_it():
    summation = Summation(5, bound=1.0, max_examples=100, weighted=False)
    like = {"a": np.zeros(2)}
    change, _ = summation.average(np.array([0.5, 0.5, 5.0, 0.0, 0.0]), like, summed=5)
    np.testing.assert_allclose(change["a"], [0.1, 0.1])
    for weight in (1e-9, 4.0, 50.0):  # e.g. a client that sent -(n - 1) + tiny
        with pytest.raises(ImpossibleSum, match=r"not one per input"):
            summation.average(np.array([0.5, 0.5, weight, 0.0, 0.0]), like, summed=5)


@pytest.mark.parametrize(("total", "problem"), [
    ([0.01, 0.01, 0.0, 0.0, 0.0], r"weight 0 outside"),
    ([0.01, 0.01, 6.0, 6.0, 0.0], r"weight 6 outside \[5e-05, 5\]"),
    ([0.01, 0.01, 1.0, 0.5, 0.0], r"example share 0.5 differs from the weight"),
    ([0.01, 0.01, 1.0, 1.0, 2.0], r"loss share 2 outside"),
    ([0.01, 1.5, 1.0, 1.0, 0.0], r"a value 1.5 beyond 1 x the weight"),
    ([0.9, 0.9, 1.0, 1.0, 0.0], r"L2 norm 1.27\d* beyond"),
])
def test_a_weighted_sum_no_honest_inputs_give_is_refused(total, problem):
    summation = Summation(5, bound=1.0, max_examples=100_000, norm=1.0)
    with pytest.raises(ImpossibleSum, match=problem):
        summation.average(np.array(total), {"a": np.zeros(2)}, summed=5)


def test_a_noised_sum_may_be_as_large_as_its_noise_allows_and_no_larger():
    summation = summation_for(RunConfig.from_mapping(CLIENT_LEVEL), 10)
    length = 40
    allowance = summation.noise_allowance(10, length)
    inside = np.r_[np.full(length, 0.99 * (10 * summation.norm + allowance) / length**0.5),
                   10.0, 0.0, 0.0]
    assert np.abs(inside[:-3]).max() < 10 * summation.bound  # only the norm is tested here
    summation.average(inside, {"a": np.zeros(length)}, summed=10)
    outside = np.r_[inside[:-3] * 1.02, 10.0, 0.0, 0.0]
    with pytest.raises(ImpossibleSum, match="L2 norm"):
        summation.average(outside, {"a": np.zeros(length)}, summed=10)


def test_a_weight_cancelled_to_zero_is_refused_where_rounding_hides_the_least_honest_one():
    # many clients and a wide bound: the rounding slack exceeds the least honest weight, so
    # only "above zero" stops a client that cancels the others' weights (the average divides)
    summation = Summation(1000, bound=25.0, max_examples=100_000)
    assert summation.encoding.error_bound(1000) > 1000 / 100_000
    with pytest.raises(ImpossibleSum, match=r"weight 0 outside"):
        summation.average(np.array([0.0, 0.0, 0.0, 0.0, 0.0]), {"a": np.zeros(2)}, summed=1000)
