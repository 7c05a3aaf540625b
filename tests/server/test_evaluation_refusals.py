"""Nodes that do not share evaluations (a deployed node's default) are recorded once."""

from __future__ import annotations

from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from fedtune.client.replies import refusal
from fedtune.common import record_keys as keys
from fedtune.server.evaluation import evaluation_refusals, summarise_client_evaluation
from fedtune.server.roster import Roster


class Connected:
    def __init__(self, node_ids: list[int]) -> None:
        self.node_ids = node_ids

    def get_node_ids(self) -> list[int]:
        return self.node_ids


def request(node_id: int) -> Message:
    return Message(RecordDict({keys.CONFIG: ConfigRecord({})}), dst_node_id=node_id,
                   message_type=MessageType.EVALUATE)


def test_a_policy_refusal_to_evaluate_is_named_and_a_shared_result_is_not():
    names = {1: "hospital-a", 2: "hospital-b"}
    roster = Roster(names.get)  # named without a message
    roster.refresh(Connected(list(names)), wait_for=2, timeout=1)
    declined = refusal(request(1), ["share-evaluation: this node does not share evaluations"])
    shared = Message(RecordDict({keys.METRICS: MetricRecord(
        {keys.ACCURACY: 0.5, keys.NUM_EXAMPLES: 10})}), reply_to=request(2))

    assert evaluation_refusals([declined, shared], roster) == {
        "hospital-a": "share-evaluation: this node does not share evaluations"}
    assert summarise_client_evaluation([declined, shared], roster)["client_accuracy"] == {
        "hospital-b": 0.5}
