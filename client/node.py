"""Who this client node is and which rows it trains on: a partition in simulation, its own
data directory in deployment (`flower-supernode --node-config 'data-path="..." name="..."'`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from common.config import RunConfig
from common.data import Examples
from common.partition import local_split
from common.task import Task, cached_task


class NodeConfigError(ValueError):
    """The node configuration names neither a partition nor a data directory."""


@dataclass(frozen=True)
class Node:
    name: str
    partition_id: int | None = None
    num_partitions: int | None = None
    data_path: str | None = None

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> Node:
        if "data-path" in node_config:
            path = str(node_config["data-path"])
            return cls(name=str(node_config.get("name", path)), data_path=path)
        if "partition-id" in node_config and "num-partitions" in node_config:
            pid, total = int(node_config["partition-id"]), int(node_config["num-partitions"])
            return cls(name=str(node_config.get("name", f"client-{pid}")),
                       partition_id=pid, num_partitions=total)
        raise NodeConfigError("node config needs 'data-path' (deployment) or 'partition-id' and "
                              "'num-partitions' (simulation)")


def node_task(node: Node, config: RunConfig) -> Task:
    """The task for this node: the run's model with this node's own data in deployment."""
    if node.data_path is not None:
        config = config.with_overrides({"data.path": node.data_path})
    return cached_task(config)


def node_examples(node: Node, task: Task, config: RunConfig) -> tuple[Examples, Examples]:
    """(train, held-out) rows of this node."""
    if node.partition_id is not None:
        return task.client_examples(config.partition, node.partition_id, node.num_partitions)
    rows = task.data.train
    seed = int(np.random.SeedSequence([config.seed, 0]).generate_state(1)[0])
    train_idx, held_idx = local_split(np.arange(len(rows)),
                                      config.partition.local_test_fraction, seed)
    return rows.subset(train_idx), rows.subset(held_idx)
