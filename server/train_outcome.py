"""What one training exchange (plain or secure) hands the round loop, and how the server reads
a node's refusal to train."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from logging import WARNING

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.common.logger import log

from fedtune.common import record_keys as keys
from fedtune.common.console import printable
from fedtune.server.roster import Roster


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
    refused: dict[str, str] = field(default_factory=dict)  # name -> rules its policy named
    rejected: dict[str, str] = field(default_factory=dict)  # name -> why its reply was dropped
    blamed: dict[str, str] = field(default_factory=dict)  # name -> the complaint leaving it out
    abandoned: str = ""  # why the round aggregated nothing, where it did not
    sum_refused: bool = False  # ... because the decoded sum was impossible for honest inputs


def refusal_status(reply: Message) -> str | None:
    """BUDGET_EXHAUSTED or POLICY_REFUSED for a reply that carries no update, else None."""
    if reply.has_error() or not reply.has_content():
        return None
    config = reply.content.config_records.get(keys.CONFIG)
    status = None if config is None else config.get(keys.STATUS)
    return status if status in (keys.BUDGET_EXHAUSTED, keys.POLICY_REFUSED) else None


def reported_epsilon(reply: Message) -> float | None:
    """The ledger total a reply reports (DP-SGD updates and budget refusals), else None; also
    None for a value that is no finite number (a malformed reply must not stop the round)."""
    metrics = reply.content.metric_records.get(keys.METRICS)
    value = None if metrics is None else metrics.get(keys.EPSILON)
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value):
        return None
    return float(value)


def refused(reply: Message) -> bool:
    """A train reply that refuses the round instead of carrying an update."""
    return refusal_status(reply) is not None


def retire_refusing(roster: Roster, replies: list[Message]) -> tuple[list[str], dict[str, str]]:
    """Never sample again the clients that refused: (budget spent, {policy refusal: reason}).

    A node's policy does not change within a run, so a node that refused it once would refuse
    every round."""
    exhausted, by_policy = [], {}
    for reply in replies:
        name = roster.name_of(reply.metadata.src_node_id)
        roster.retire(name)
        if refusal_status(reply) == keys.BUDGET_EXHAUSTED:
            exhausted.append(name)
            log(WARNING, "%s has spent its privacy budget; it is not sampled again", name)
        else:
            by_policy[name] = printable(reply.content[keys.CONFIG].get(keys.REASON, ""))
            log(WARNING, "%s refused by its node policy (%s); it is not sampled again", name,
                by_policy[name])
    return sorted(exhausted), dict(sorted(by_policy.items()))
