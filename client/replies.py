"""What may leave this node, reply by reply: one module answers "what does a node disclose".

Under DP nothing a reply carries follows the node's row count: no example count (every update
weighs the same), no loss (computed from the data without noise), and the ledger's epsilon,
which follows only public values (the request and the node's policy). A refusal names the rules
and the server's values, never the node's data.
"""

from __future__ import annotations

from logging import WARNING

from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log

from fedtune.common import record_keys as keys


def refusal(msg: Message, rules: list[str]) -> Message:
    """The reply to a request the policy forbids: the rules, logged here too, and no data."""
    reason = "; ".join(rules)
    log(WARNING, "Refused by this node's privacy policy: %s", reason)
    return Message(RecordDict({keys.CONFIG: ConfigRecord({keys.STATUS: keys.POLICY_REFUSED,
                                                          keys.REASON: reason})}),
                   reply_to=msg)


def budget_refusal(msg: Message, spent: float) -> Message:
    """The 'budget exhausted' answer with what this data set has spent, and no update."""
    log(WARNING, "Privacy budget exhausted: refusing round")
    return Message(RecordDict({keys.CONFIG: ConfigRecord({keys.STATUS: keys.BUDGET_EXHAUSTED}),
                               keys.METRICS: MetricRecord({keys.EPSILON: spent})}),
                   reply_to=msg)


def train_metrics(*, examples: int, loss: float, dp: bool, secure: bool,
                  epsilon: float | None) -> MetricRecord:
    """The metrics a train reply carries in the clear.

    Plain FedAvg without DP weighs updates by their example count and shows the loss. Under DP
    every update weighs the same and neither leaves; under secure aggregation they travel inside
    the masked vector where the summation carries them. `epsilon`: the ledger's total (DP-SGD)."""
    metrics = MetricRecord({keys.UNIT_WEIGHT: 1})
    if not secure and not dp:
        metrics[keys.NUM_EXAMPLES] = examples
        metrics[keys.TRAIN_LOSS] = loss
    if epsilon is not None:
        metrics[keys.EPSILON] = epsilon
    return metrics


def evaluation_metrics(examples: int, loss: float | None, accuracy: float) -> MetricRecord:
    """Held-out rows and accuracy of the global adapter (noised where the policy says), and
    the loss where the answer is exact (simulation: a noised loss would need clipping)."""
    metrics = MetricRecord({keys.NUM_EXAMPLES: examples, keys.ACCURACY: accuracy})
    if loss is not None:
        metrics[keys.EVAL_LOSS] = loss
    return metrics
