"""Who this client node is, which rows it trains on and what privacy budget it allows itself.

In simulation a node is a partition; in deployment it is its own data directory, ledger directory
and budget (`flower-supernode --node-config 'data-path="..." ledger-dir="..."
budget-epsilon=3.0 name="..."'`): the node, not the server, decides what its data may spend.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
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
    ledger_dir: str | None = None
    budget_epsilon: float | None = None

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> Node:
        budget = node_config.get("budget-epsilon")
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float))
                                   or budget <= 0):
            raise NodeConfigError(f"node config 'budget-epsilon' must be a number > 0, "
                                  f"got {budget!r}")
        budget = None if budget is None else float(budget)
        if "data-path" in node_config:
            path = str(node_config["data-path"])
            ledger = node_config.get("ledger-dir")
            return cls(name=str(node_config.get("name", path)), data_path=path,
                       ledger_dir=None if ledger is None else str(ledger), budget_epsilon=budget)
        if "partition-id" in node_config and "num-partitions" in node_config:
            pid, total = int(node_config["partition-id"]), int(node_config["num-partitions"])
            return cls(name=str(node_config.get("name", f"client-{pid}")),
                       partition_id=pid, num_partitions=total, budget_epsilon=budget)
        raise NodeConfigError("node config needs 'data-path' (deployment) or 'partition-id' and "
                              "'num-partitions' (simulation)")


    @property
    def simulated(self) -> bool:
        return self.partition_id is not None

    def budget(self, config: RunConfig) -> float:
        """This node's epsilon budget: its own setting, else the run's per-client entry (in
        simulation), else the run's target epsilon."""
        if self.budget_epsilon is not None:
            return self.budget_epsilon
        if self.simulated:
            return config.privacy.budgets().get(self.name, config.privacy.epsilon)
        return config.privacy.epsilon

    def ledger_directory(self, config: RunConfig) -> Path:
        """Where this node's privacy ledgers live: always on the node's own disk."""
        if self.ledger_dir is not None:
            return Path(self.ledger_dir)
        if not self.simulated:
            raise NodeConfigError("a deployed node needs 'ledger-dir' in its node config to "
                                  "train with differential privacy")
        return Path(config.privacy.ledger_dir or Path(config.output.dir) / "ledgers")


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
