"""Who this client node is, which rows it trains on and by which rules (its `NodePolicy`).

In simulation a node is a partition and takes the run's own settings. In deployment it is its
own data directory, ledger directory and policy (`flower-supernode --node-config
'data-path="..." ledger-dir="..." name="..." budget-epsilon=3.0 ...'`, written by `fedtune
client`): the node, not the server, decides which rows it holds out and what its data may spend.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedtune.client.ledger import fingerprint, fingerprint_records
from fedtune.client.policy import NodePolicy, PolicyError
from fedtune.common.config import CAUSAL_LM, CLASSIFICATION, DataConfig, RunConfig
from fedtune.common.data import LABELS_FILE, Examples, training_records, training_rows
from fedtune.common.partition import client_name

if TYPE_CHECKING:  # the model's module is imported only where a step loads the model
    from fedtune.common.task import Task

IDENTITY_KEYS = ("name", "data-path", "ledger-dir", "node-key", "partition-id",
                 "num-partitions")


class NodeConfigError(ValueError):
    """The node configuration names neither a partition nor a data directory, or its policy is
    not valid."""


@dataclass(frozen=True)
class Node:
    name: str
    policy: NodePolicy
    partition_id: int | None = None
    num_partitions: int | None = None
    data_path: str | None = None
    ledger_dir: str | None = None
    node_key: str = ""  # a deployed node's own key file (it signs secure aggregation with it)

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any],
                         config: RunConfig | None = None) -> Node:
        """A deployed node from its own node config; a simulated one from its partition (its
        policy then follows the run `config`, when given)."""
        if "data-path" in node_config:
            path = str(node_config["data-path"])
            ledger = node_config.get("ledger-dir")
            rules = {k: v for k, v in node_config.items() if k not in IDENTITY_KEYS}
            try:
                policy = NodePolicy.from_mapping(rules)
            except PolicyError as error:
                raise NodeConfigError(str(error)) from None
            return cls(name=str(node_config.get("name", path)), policy=policy, data_path=path,
                       ledger_dir=None if ledger is None else str(ledger),
                       node_key=str(node_config.get("node-key", "")))
        if "partition-id" in node_config and "num-partitions" in node_config:
            pid, total = int(node_config["partition-id"]), int(node_config["num-partitions"])
            name = str(node_config.get("name", client_name(pid)))
            policy = NodePolicy.simulated(config or RunConfig(), name)
            return cls(name=name, policy=policy, partition_id=pid, num_partitions=total)
        raise NodeConfigError("node config needs 'data-path' (deployment) or 'partition-id' and "
                              "'num-partitions' (simulation)")

    @property
    def simulated(self) -> bool:
        return self.partition_id is not None

    @property
    def declares_labels(self) -> bool:
        """A deployed node's data directory names its label set (labels.json)."""
        return self.simulated or (Path(str(self.data_path)) / LABELS_FILE).is_file()

    @property
    def task(self) -> str | None:
        """The task a deployed node's data serves: classification where its directory declares a
        label set, causal LM otherwise (a request for the other is refused before any row is
        read); None for a simulated node, which follows the run."""
        if self.simulated:
            return None
        return CLASSIFICATION if self.declares_labels else CAUSAL_LM

    def state_directory(self) -> Path | None:
        """Where a deployed node keeps its per-round state (secure-aggregation secrets, what it
        released): beside its ledgers, on its own disk. None for a simulated node."""
        return None if self.simulated or self.ledger_dir is None else \
            Path(self.ledger_dir) / "rounds"

    def data_config(self, config: RunConfig) -> DataConfig:
        """How this node reads its rows: its own path and field names, the run's template."""
        policy = self.policy
        return DataConfig(path=str(self.data_path), text_field=policy.text_field,
                          label_field=policy.label_field,
                          prompt_template=config.data.prompt_template)

    def ledger_directory(self, config: RunConfig) -> Path:
        """Where this node's privacy ledgers live: always on the node's own disk."""
        if self.ledger_dir is not None:
            return Path(self.ledger_dir)
        if not self.simulated:
            raise NodeConfigError("a deployed node needs 'ledger-dir' in its node config to "
                                  "train with differential privacy")
        return Path(config.privacy.ledger_dir or Path(config.output.dir) / "ledgers")


def node_task(node: Node, config: RunConfig) -> Task:
    """The task for this node: the run's model with this node's own data in deployment, read
    with its own fields and the split `fedtune client` checked at start-up (never the server's
    test fraction, which could leave too few rows for some data sets and not others). Its
    head starts at random: a deployed node trains and scores only the server's adapter, so
    reading its own label names (a server's `model.head_init`) would only expose them."""
    if node.data_path is not None:
        data = node.data_config(config)
        config = config.with_overrides({"data.path": data.path, "data.text_field": data.text_field,
                                        "data.label_field": data.label_field,
                                        "data.test_fraction": DataConfig().test_fraction,
                                        "model.head_init": "random"})
    from fedtune.common.task import cached_task

    return cached_task(config)


def node_examples(node: Node, task: Task, config: RunConfig) -> tuple[Examples, Examples]:
    """(train, held-out) rows of this node: a simulated partition's, or every row of a deployed
    node's training file split by the node's own fraction and seed (never the server's)."""
    if node.partition_id is not None:
        return task.client_examples(config.partition, node.partition_id, node.num_partitions)
    data = node.data_config(config)
    rows = _training_rows(data, config.model.task)
    held = _held_out(data.path, node.policy.test_fraction, node.policy.split_seed)
    return rows.subset(np.flatnonzero(~held)), rows.subset(np.flatnonzero(held))


def keyed_held_out(records: list[dict[str, Any]], fraction: float, key: int) -> np.ndarray:
    """Which rows a deployed node holds out: each by a keyed hash of its raw record as stored, so
    adding or removing one row moves no other row between training and held-out (a seeded
    permutation of all rows would reshuffle both sides, and DP's one-row neighbour would differ
    from its training set in many rows), and nothing the server sends (fields, a prompt
    template) moves a row either: a row the node trains on is never one it answers about."""
    secret = hashlib.sha256(f"fedtune held-out split v2 {key}".encode()).digest()
    held = np.zeros(len(records), dtype=bool)
    for i, record in enumerate(records):
        text = json.dumps(record, sort_keys=True, ensure_ascii=False, default=str)
        digest = hmac.new(secret, text.encode(), "sha256").digest()
        held[i] = int.from_bytes(digest[:8], "big") < fraction * 2.0**64
    return held


@lru_cache(maxsize=4)
def _held_out(path: str, fraction: float, key: int) -> np.ndarray:
    return keyed_held_out(training_records(path), fraction, key)


def data_set_identity(node: Node, train_rows: Examples) -> tuple[str, int]:
    """(fingerprint, records) of the data set this node's ledger accounts for.

    Deployed: the raw rows of its training file, whatever the server's fields, template, seed or
    split, so every run over those rows spends from one ledger. Simulated: the partition's rows.
    """
    if node.data_path is None:
        return fingerprint(train_rows), len(train_rows)
    return _file_identity(node.data_path)


@lru_cache(maxsize=4)
def _training_rows(data: DataConfig, task: str) -> Examples:
    return training_rows(data, task)


@lru_cache(maxsize=4)
def _file_identity(path: str) -> tuple[str, int]:
    records = training_records(path)
    return fingerprint_records(records), len(records)
