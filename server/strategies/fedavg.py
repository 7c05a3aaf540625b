"""FedAvg (McMahan et al. 2017, arXiv:1602.05629) sampling clients by stable name, seeded.

Flower's `FedAvg` samples node ids with Python's global `random`; node ids change between runs, so
neither a seed nor a resumed run would repeat its choices. This subclass changes only sampling and
the order in which replies are summed (by name, so float sums repeat too).
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedtune.common import record_keys as keys
from fedtune.server.roster import Roster


class SeededFedAvg(FedAvg):
    """FedAvg weighted by `num-examples`; samples a `Roster` with a seeded numpy Generator."""

    def __init__(self, roster: Roster, seed: int, **fedavg_args: Any) -> None:
        super().__init__(**fedavg_args)
        self.roster = roster
        self.rng = np.random.default_rng([seed, 2])

    def summary(self) -> None:
        super().summary()
        log(INFO, "\t└──> Sampling: by client name, seeded (resumable)")

    def sample(self, fraction: float, minimum: int) -> list[int]:
        """Node ids of max(fraction x active, minimum) clients, drawn without replacement."""
        active = self.roster.active()
        size = min(max(int(len(active) * fraction), minimum), len(active))
        chosen = np.sort(self.rng.choice(len(active), size=size, replace=False))
        return [active[i][1] for i in chosen]

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        return self._configure(server_round, arrays, config, MessageType.TRAIN,
                               self.sample(self.fraction_train, self.min_train_nodes))

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        if self.fraction_evaluate == 0.0:
            return []
        return self._configure(server_round, arrays, config, MessageType.EVALUATE,
                               self.sample(self.fraction_evaluate, self.min_evaluate_nodes))

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        ordered = sorted(replies, key=lambda m: self.roster.name_of(m.metadata.src_node_id))
        return super().aggregate_train(server_round, ordered)

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["rng"]

    def _configure(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                   message_type: str, node_ids: list[int]) -> list[Message]:
        config[keys.SERVER_ROUND] = server_round
        content = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return [Message(content, dst_node_id=n, message_type=message_type) for n in node_ids]
