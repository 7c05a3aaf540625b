"""Names of the simulation's virtual nodes without a message per node.

The server samples clients by name (`server/roster.py`); a deployed node says its name when asked,
one `identify` query per node. A simulated node's name follows from its partition id
(`common.partition.client_name`), and Flower's engine assigns partition ids as it registers the
nodes, in this process: recording that assignment names 50,000 virtual nodes at no cost per node,
so a round's time follows the sample, not the population.

Flower 1.41 and 1.42 keep the assignment (node id -> partition id) inside `start_vce`; the only
place it leaves is the return value of `vce_api._register_nodes` (the same in both), which is
wrapped here while a simulation runs. `tests/simulations/test_engine.py` fails if Flower renames
or changes that function; any node the record does not name is still asked (`Roster`), so a miss
costs time, not names.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from flwr.server.superlink.fleet.vce import vce_api

from fedtune.common.partition import client_name


class NodeNames:
    """node id -> the client name its partition gives it; None for a node not recorded."""

    def __init__(self, wait: float = 600.0) -> None:
        self._partition_of: dict[int, int] = {}
        self._recorded = threading.Event()
        self._wait = wait

    def record(self, partition_of: dict[int, int]) -> None:
        self._partition_of = {**self._partition_of, **partition_of}  # one swap: read by a thread
        self._recorded.set()

    def __call__(self, node_id: int) -> str | None:
        # The ServerApp's thread starts before the engine registers its nodes and sees them one
        # by one: it waits for the record rather than ask each node seen early.
        self._recorded.wait(self._wait)
        partition_id = self._partition_of.get(node_id)
        return None if partition_id is None else client_name(partition_id)

    def __len__(self) -> int:
        return len(self._partition_of)


@contextmanager
def recorded_node_names() -> Iterator[NodeNames]:
    """While the block runs, every node the simulation engine registers is named in the result."""
    names = NodeNames()
    register = vce_api._register_nodes

    def recording(*args: Any, **kwargs: Any) -> dict[int, int]:
        partition_of = register(*args, **kwargs)
        names.record(partition_of)
        return partition_of

    vce_api._register_nodes = recording
    try:
        yield names
    finally:
        vce_api._register_nodes = register
