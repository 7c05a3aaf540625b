"""Seeded splits of the training rows among clients: IID, Dirichlet label skew, natural groups.

Every partitioner returns one index array per client; together they cover each row exactly once.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedtune.common.config import PartitionConfig
from fedtune.common.data import Examples
from fedtune.common.errors import InputError


class PartitionError(InputError, ValueError):
    """The requested partition cannot be built from these rows."""


def client_name(partition_id: int) -> str:
    """A simulated client's stable name: the node reports it, the server can also derive it."""
    return f"client-{partition_id}"


def iid(num_rows: int, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffle, then cut into near-equal shares."""
    _check_enough(num_rows, num_clients, 1)
    return [np.sort(part) for part in np.array_split(rng.permutation(num_rows), num_clients)]


def dirichlet(labels: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator,
              min_rows: int = 2, attempts: int = 100) -> list[np.ndarray]:
    """Per label, split its rows by p ~ Dir(alpha * 1_K) (Hsu et al. 2019, arXiv:1909.06335).

    Redraws until every client holds at least `min_rows` rows, since an empty client cannot train.
    """
    _check_enough(len(labels), num_clients, min_rows)
    for _ in range(attempts):
        shares: list[list[int]] = [[] for _ in range(num_clients)]
        for label in np.unique(labels):
            rows = rng.permutation(np.flatnonzero(labels == label))
            p = rng.dirichlet(np.full(num_clients, alpha))  # (K,)
            cuts = (np.cumsum(p)[:-1] * len(rows)).astype(int)
            for client, part in enumerate(np.split(rows, cuts)):
                shares[client].extend(part.tolist())
        if min(len(s) for s in shares) >= min_rows:
            return [np.sort(np.asarray(s, dtype=np.int64)) for s in shares]
    raise PartitionError(f"Dirichlet(alpha={alpha}) left a client with fewer than {min_rows} rows "
                         f"in {attempts} draws; raise partition.alpha or lower the client count")


def natural(values: list[Any], num_clients: int) -> list[np.ndarray]:
    """One group per distinct value; groups dealt to clients in sorted order, round-robin."""
    groups = sorted({str(v) for v in values})
    if num_clients > len(groups):
        raise PartitionError(f"natural partition has {len(groups)} groups but "
                             f"{num_clients} clients were asked for")
    client_of = {group: i % num_clients for i, group in enumerate(groups)}
    owners = np.asarray([client_of[str(v)] for v in values])
    return [np.flatnonzero(owners == client) for client in range(num_clients)]


def partition(examples: Examples, config: PartitionConfig, num_clients: int,
              seed: int) -> list[np.ndarray]:
    """Dispatch on `config.scheme`; the same seed gives the same split."""
    rng = np.random.default_rng([seed, 1])
    if config.scheme == "iid":
        return iid(len(examples), num_clients, rng)
    if config.scheme == "dirichlet":
        return dirichlet(examples.labels, num_clients, config.alpha, rng)
    if config.by not in examples.fields:
        available = ", ".join(sorted(examples.fields)) or "none"
        raise PartitionError(f"partition.by names field {config.by!r}, which the data does not "
                             f"have (fields besides text and label: {available})")
    return natural(examples.fields[config.by], num_clients)


def local_split(indices: np.ndarray, test_fraction: float,
                seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split one client's rows into (train, held-out); keeps at least one training row."""
    order = np.random.default_rng(seed).permutation(indices)
    held_out = min(round(len(order) * test_fraction), len(order) - 1)
    return np.sort(order[held_out:]), np.sort(order[:held_out])


def _check_enough(num_rows: int, num_clients: int, min_rows: int) -> None:
    if num_rows < num_clients * min_rows:
        raise PartitionError(f"{num_rows} training rows cannot give each of {num_clients} clients "
                             f"at least {min_rows}; use fewer clients or more data")
