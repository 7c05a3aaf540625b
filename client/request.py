"""One message from the server, read once: its run configuration, round and adapter, this node,
and (only once a request is admitted) this node's task and rows.

Everything here but the node itself is the server's and untrusted: a configuration that does not
parse is a `RequestError`, refused by naming the server's own values.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import Context, Message

from fedtune.client.ledger import Ledger
from fedtune.client.node import Node, data_set_identity, node_examples, node_task
from fedtune.client.node_state import NodeState
from fedtune.client.randomness import RoundSeeds, round_seeds
from fedtune.common import record_keys as keys
from fedtune.common.adapter_state import from_record
from fedtune.common.config import ConfigError, RunConfig
from fedtune.common.data import Examples

if TYPE_CHECKING:
    from fedtune.common.task import Task


class RequestError(ValueError):
    """The server's message cannot be read as a request (its configuration or round)."""


@dataclass
class Request:
    msg: Message
    context: Context
    config: RunConfig
    config_json: str  # as the server sent it: a round's configuration is pinned by its digest
    server_round: int
    node: Node

    @classmethod
    def parse(cls, msg: Message, context: Context) -> Request:
        settings = msg.content.config_records.get(keys.CONFIG)
        if settings is None or keys.RUN_CONFIG not in settings:
            raise RequestError(f"the message has no '{keys.RUN_CONFIG}'")
        config_json = str(settings[keys.RUN_CONFIG])
        try:
            config = RunConfig.from_mapping(json.loads(config_json))
            server_round = settings[keys.SERVER_ROUND]
        except (ConfigError, json.JSONDecodeError, KeyError, TypeError) as error:
            raise RequestError(f"run configuration: {error}") from None
        if isinstance(server_round, bool) or not isinstance(server_round, int) or \
                server_round < 1:
            raise RequestError(f"'{keys.SERVER_ROUND}' must be an integer >= 1, got "
                               f"{server_round!r}")
        node = Node.from_node_config(context.node_config, config)
        return cls(msg, context, config, config_json, server_round, node)

    @cached_property
    def adapter(self) -> dict[str, np.ndarray]:
        """The global adapter the server sent (checked by admission before use)."""
        record = self.msg.content.array_records.get(keys.ARRAYS)
        return {} if record is None else from_record(record)

    @cached_property
    def task(self) -> Task:
        return node_task(self.node, self.config)

    @cached_property
    def rows(self) -> tuple[Examples, Examples]:
        """(train, held-out) rows of this node."""
        return node_examples(self.node, self.task, self.config)

    @property
    def seeds(self) -> RoundSeeds:
        """This round's random streams: secret on a deployed node, seeded in simulation."""
        return round_seeds(self.config.seed if self.node.simulated else None, self.server_round,
                           self.node.name)

    @property
    def run(self) -> str:
        """The run this request belongs to, as the ledger records it."""
        return self.config.output.dir

    def ledger(self, delta: float) -> Ledger:
        """The ledger of the data set this node trains on, accounting at `delta`."""
        data_fingerprint, records = data_set_identity(self.node, self.rows[0])
        return Ledger.open(self.node.ledger_directory(self.config), data_fingerprint, records,
                           delta, self.node.policy.accountant)

    def records(self) -> int:
        """The number of records the ledger keys on (never sent anywhere)."""
        return data_set_identity(self.node, self.rows[0])[1]

    def state(self) -> NodeState | None:
        """This node's per-round store on its own disk (deployed nodes only)."""
        directory = self.node.state_directory()
        return None if directory is None else NodeState(Path(directory))
