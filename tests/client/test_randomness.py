"""Sampling and noise must be independent streams: which rows a DP-SGD step draws may not
predict the noise added to it (amplification by subsampling assumes exactly that)."""

from __future__ import annotations

import numpy as np
import torch
from opacus.optimizers.optimizer import _generate_noise
from opacus.utils.uniform_sampler import UniformWithReplacementSampler

from fedtune.client.randomness import round_seeds

ROWS, RATE, TRIALS = 512, 0.1, 200


def mask_and_noise(sampling_seed: int, noise_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """One Poisson draw by Opacus' sampler and one noise vector by Opacus' noise function, from
    generators seeded as a round on a node seeds its data loader and its noise."""
    sampler = UniformWithReplacementSampler(
        num_samples=ROWS, sample_rate=RATE,
        generator=torch.Generator().manual_seed(sampling_seed))
    mask = np.zeros(ROWS, dtype=bool)
    mask[next(iter(sampler))] = True
    noise = _generate_noise(std=1.0, reference=torch.zeros(ROWS),
                            generator=torch.Generator().manual_seed(noise_seed))
    return mask, noise.numpy().astype(np.float64)


def dependence_z(seed_pairs: list[tuple[int, int]]) -> float:
    """z statistic of E[noise^2 | drawn] - E[noise^2 | not drawn], 0 under independence
    (noise^2 is chi-square with one degree of freedom: variance 2)."""
    drawn, left = [], []
    for sampling_seed, noise_seed in seed_pairs:
        mask, noise = mask_and_noise(sampling_seed, noise_seed)
        drawn.append(noise[mask] ** 2)
        left.append(noise[~mask] ** 2)
    a, b = np.concatenate(drawn), np.concatenate(left)
    return float((a.mean() - b.mean()) / np.sqrt(2 / len(a) + 2 / len(b)))


def test_the_test_has_power_one_seed_for_both_streams_is_caught():
    # what nodes did before: the loader's and the noise generator seeded with one value
    assert abs(dependence_z([(seed, seed) for seed in range(TRIALS)])) > 10


def test_a_simulated_nodes_sampling_and_noise_are_independent():
    seeds = [round_seeds(run_seed, 1, "client-0") for run_seed in range(TRIALS)]
    assert abs(dependence_z([(s.sampling, s.noise) for s in seeds])) < 4.5


def test_a_deployed_node_draws_its_seeds_from_the_operating_system():
    first, second = round_seeds(None, 1, "hospital-a"), round_seeds(None, 1, "hospital-a")
    assert first != second  # nothing in the run configuration can regenerate them
    assert len({first.sampling, first.noise, first.dropout}) == 3
    assert abs(dependence_z([(s.sampling, s.noise) for s in
                             (round_seeds(None, 1, "hospital-a") for _ in range(TRIALS))])) < 4.5


def test_simulated_seeds_repeat_for_the_same_run_round_and_client():
    assert round_seeds(0, 1, "client-0") == round_seeds(0, 1, "client-0")
    assert round_seeds(0, 1, "client-0") != round_seeds(0, 2, "client-0")
    assert round_seeds(0, 1, "client-0") != round_seeds(0, 1, "client-1")
