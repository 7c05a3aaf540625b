"""Who masks with whom: every pair in small cohorts, a random k-regular graph in large ones.

SecAgg+ (Bell et al. 2020) replaces the complete graph by a random k-regular one so that each
client's work grows with log n rather than n. The graph is a circulant (Harary) graph over a
permutation drawn from a public seed: i is joined to the k/2 clients on either side of it.
"""

from __future__ import annotations

import math

import numpy as np


def default_neighbours(clients: int) -> int:
    """Everybody up to 32 clients; beyond, an even k of about 3 log2 n (Bell et al.'s regime)."""
    if clients <= 32:
        return clients - 1
    return min(clients - 1, 2 * math.ceil(1.5 * math.log2(clients)))


def neighbours(names: list[str], k: int, seed: int) -> dict[str, list[str]]:
    """Each name's neighbours (sorted); k >= n-1 gives the complete graph."""
    n = len(names)
    if k >= n - 1:
        return {a: sorted(b for b in names if b != a) for a in names}
    if k < 2 or k % 2:
        raise ValueError(f"secagg neighbours must be an even number >= 2, got {k}")
    order = [names[i] for i in np.random.default_rng(seed).permutation(n)]
    graph: dict[str, set[str]] = {a: set() for a in names}
    for position, name in enumerate(order):
        for step in range(1, k // 2 + 1):
            other = order[(position + step) % n]
            graph[name].add(other)
            graph[other].add(name)
    return {a: sorted(b) for a, b in graph.items()}
