"""What one training exchange (plain or secure) hands the round loop."""

from __future__ import annotations

from dataclasses import dataclass
from logging import WARNING

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.common.logger import log

from common import record_keys as keys
from server.roster import Roster


@dataclass(frozen=True)
class TrainOutcome:
    arrays: ArrayRecord | None  # None when no update was aggregated (or the round abandoned)
    metrics: MetricRecord | None
    clients: int  # updates aggregated
    failures: int
    bytes_up: int
    bytes_down: int
    epsilon: dict[str, float]  # sample-level DP: each reporting client's total epsilon
    exhausted: list[str]  # clients that refused the round: their budget is spent


def refused(reply: Message) -> bool:
    """A train reply that says 'budget exhausted' instead of carrying an update."""
    config = reply.content.config_records.get(keys.CONFIG)
    return config is not None and config.get(keys.STATUS) == keys.BUDGET_EXHAUSTED


def retire_exhausted(roster: Roster, replies: list[Message]) -> list[str]:
    """Never sample again the clients whose budget is spent; their names, sorted."""
    names = sorted(roster.name_of(r.metadata.src_node_id) for r in replies)
    for name in names:
        roster.retire(name)
        log(WARNING, "%s has spent its privacy budget; it is not sampled again", name)
    return names
