"""The replies around training are untrusted too: a malformed evaluation is left out of the
clients' summary and a node that sends no name is not enrolled, neither stops the round."""

from __future__ import annotations

import logging

import pytest
from flwr.app import ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict

from fedtune.common import record_keys as keys
from fedtune.server.evaluation import summarise_client_evaluation
from fedtune.server.roster import Roster


def evaluation(node_id: int, metrics: dict) -> Message:
    query = Message(RecordDict(), dst_node_id=node_id, message_type=MessageType.EVALUATE)
    return Message(RecordDict({keys.METRICS: MetricRecord(metrics)}), reply_to=query)


GOOD = {keys.NUM_EXAMPLES: 10, keys.EVAL_LOSS: 0.5, keys.ACCURACY: 0.8}


@pytest.mark.parametrize("bad", [
    {keys.EVAL_LOSS: 0.5, keys.ACCURACY: 0.8},
    {keys.NUM_EXAMPLES: 10, keys.EVAL_LOSS: 0.5},
    {**GOOD, keys.ACCURACY: float("nan")},
    {**GOOD, keys.ACCURACY: 7.0},
    {**GOOD, keys.ACCURACY: [0.8, 0.9]},
    {**GOOD, keys.NUM_EXAMPLES: 10**12},
    {**GOOD, keys.NUM_EXAMPLES: -3},
    {**GOOD, keys.NUM_EXAMPLES: 2.5},
], ids=["no-count", "no-accuracy", "nan", "above-one", "list", "huge", "negative",
        "fractional"])
def test_a_malformed_evaluation_is_left_out_of_the_summary(bad):
    summary = summarise_client_evaluation([evaluation(1, GOOD), evaluation(2, bad)], Roster())
    assert summary["client_accuracy"] == {"node-1": 0.8}
    assert summary["client_accuracy_mean"] == pytest.approx(0.8)


def test_a_client_with_nothing_held_out_is_left_out_silently():
    empty = {keys.NUM_EXAMPLES: 0, keys.EVAL_LOSS: 0.0, keys.ACCURACY: float("nan")}
    summary = summarise_client_evaluation([evaluation(1, GOOD), evaluation(2, empty)], Roster())
    assert summary["client_accuracy"] == {"node-1": 0.8}


def test_a_failed_evaluation_is_left_out_and_logged_as_one_line(caplog):
    query = Message(RecordDict(), dst_node_id=2, message_type=MessageType.EVALUATE)
    failed = Message(Error(code=0, reason="evaluate failed on this node\nforged line"),
                     reply_to=query)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        summary = summarise_client_evaluation([evaluation(1, GOOD), failed], Roster())
    assert summary["client_accuracy"] == {"node-1": 0.8}
    assert "Evaluation of node-2 failed: evaluate failed on this node\\nforged" in caplog.text
    # an error the SuperLink writes for a silent node is named after the node asked
    asked = Message(RecordDict(), dst_node_id=7, message_type=MessageType.EVALUATE)
    timed_out = Message(Error(code=0, reason="no reply in time"), reply_to=asked)
    timed_out.metadata.__dict__["_src_node_id"] = 1  # the SuperLink's, as Flower writes it
    with caplog.at_level(logging.WARNING, logger="flwr"):
        summarise_client_evaluation([timed_out], Roster(), [asked])
    assert "Evaluation of node-7 failed: no reply in time" in caplog.text


class NamingGrid:
    """Answers the identity query of each node with the records given for it."""

    def __init__(self, records: dict[int, RecordDict]) -> None:
        self.records = records

    def get_node_ids(self) -> list[int]:
        return sorted(self.records)

    def send_and_receive(self, messages, timeout):
        return [Message(self.records[m.metadata.dst_node_id], reply_to=m) for m in messages]


def test_a_node_that_sends_no_usable_name_is_not_enrolled():
    grid = NamingGrid({
        1: RecordDict({keys.CONFIG: ConfigRecord({keys.CLIENT_NAME: "client-0"})}),
        2: RecordDict(),
        3: RecordDict({keys.CONFIG: ConfigRecord({keys.CLIENT_NAME: 5})}),
        4: RecordDict({keys.CONFIG: ConfigRecord({keys.CLIENT_NAME: ""})}),
        5: RecordDict({keys.CONFIG: ConfigRecord({keys.CLIENT_NAME: "a\nforged line"})}),
        6: RecordDict({keys.CONFIG: ConfigRecord({keys.CLIENT_NAME: "x" * 101})}),
    })
    roster = Roster()
    roster.refresh(grid, wait_for=1, timeout=1)
    assert roster.active() == [("client-0", 1)]
