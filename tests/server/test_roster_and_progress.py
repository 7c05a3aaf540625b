"""Naming nodes without messages where the name is known, and counting replies as they arrive."""

from __future__ import annotations

import io
from collections.abc import Iterable

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from rich.console import Console

from fedtune.common import record_keys as keys
from fedtune.server.progress import RoundProgress
from fedtune.server.roster import Roster


class FakeGrid:
    """Nodes that answer with their name, one reply per pull (as replies trickle in)."""

    pull_interval = 0.0

    def __init__(self, names: dict[int, str]) -> None:
        self.names, self.sent, self._pending = names, [], []

    def get_node_ids(self) -> Iterable[int]:
        return list(self.names)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = f"m{len(self.sent)}"  # as a push does
            self.sent.append(message)
            self._pending.append(message)
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        if not self._pending:
            return []
        sent = self._pending.pop(0)
        name = self.names[sent.metadata.dst_node_id]
        return [Message(RecordDict({keys.CONFIG: ConfigRecord({keys.CLIENT_NAME: name})}),
                        reply_to=sent)]

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> list[Message]:
        ids = set(self.push_messages(messages))
        replies = []
        while ids:
            replies += (arrived := self.pull_messages(ids))
            ids -= {m.metadata.reply_to_message_id for m in arrived}
        return replies


def test_known_names_cost_no_message_and_unknown_nodes_are_still_asked():
    grid = FakeGrid({11: "client-0", 12: "client-1", 13: "hospital-a"})
    simulated = {11: "client-0", 12: "client-1"}
    roster = Roster(simulated.get)
    roster.refresh(grid, wait_for=3, timeout=5)
    assert roster.active() == [("client-0", 11), ("client-1", 12), ("hospital-a", 13)]
    assert [m.metadata.dst_node_id for m in grid.sent] == [13]  # only the unknown node


def test_without_known_names_every_new_node_is_asked_once():
    grid = FakeGrid({11: "a", 12: "b"})
    roster = Roster()
    roster.refresh(grid, wait_for=2, timeout=5)
    roster.refresh(grid, wait_for=2, timeout=5)
    assert sorted(m.metadata.dst_node_id for m in grid.sent) == [11, 12]
    assert roster.name_of(12) == "b"


def test_the_watched_grid_counts_each_reply_and_returns_them_all():
    inner = FakeGrid({1: "a", 2: "b", 3: "c"})
    progress = RoundProgress(Console(file=io.StringIO()))
    seen = []
    progress.answered = lambda count=1: seen.append(count)  # type: ignore[method-assign]
    progress.round_started(1, 2)
    grid = progress.watch(inner)
    messages = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.TRAIN)
                for n in (1, 2, 3)]
    replies = list(grid.send_and_receive(messages, timeout=5))
    assert [r.metadata.reply_to_message_id for r in replies] == [m.metadata.message_id
                                                                  for m in messages]
    assert seen == [1, 1, 1]
    assert progress.watch(grid) is grid


def test_an_abandoned_round_says_so_in_its_line():
    progress = RoundProgress(Console(file=(out := io.StringIO()), width=200))
    progress.round_started(3, 3)
    progress.round_done({"round": 3, "accuracy": 0.222, "loss": 1.1, "clients": 0,
                         "round_abandoned": "only 2 clients sent keys; 3 are needed [min-cohort]",
                         "seconds": 4.0})
    line = out.getvalue().strip()
    assert line.startswith("round 3/3  abandoned (only 2 clients sent keys; 3 are needed "
                           "[min-cohort])  accuracy 0.222")
    assert "clients 0" not in line


def test_waiting_for_clients_is_one_line_per_change(monkeypatch):
    grid, slept, lines = FakeGrid({}), [], []
    arrivals = {5: (1, "a"), 12: (2, "b")}  # after so many seconds of waiting, a node connects

    def sleep(_seconds: float) -> None:
        slept.append(1)
        if len(slept) in arrivals:
            node_id, name = arrivals[len(slept)]
            grid.names[node_id] = name

    monkeypatch.setattr("fedtune.server.roster.time.sleep", sleep)
    monkeypatch.setattr("fedtune.server.roster.log",
                        lambda _level, text, *args: lines.append(text % args))
    Roster().refresh(grid, wait_for=2, timeout=60)
    assert lines == ["Waiting for clients: 0 of 2 connected",
                     "Waiting for clients: 1 of 2 connected"]


def refusal_from(node_id: int, reason: str) -> Message:
    query = Message(RecordDict(), dst_node_id=node_id, message_type=MessageType.TRAIN)
    query.metadata.__dict__["_message_id"] = f"q{node_id}"
    reply = Message(RecordDict({keys.CONFIG: ConfigRecord({
        keys.STATUS: keys.POLICY_REFUSED, keys.REASON: reason})}), reply_to=query)
    reply.metadata.__dict__["_src_node_id"] = node_id
    return reply


def test_a_second_claim_of_a_name_is_refused_and_the_honest_node_keeps_training():
    from fedtune.server.train_outcome import retire_refusing

    grid = FakeGrid({11: "hospital-a", 12: "hospital-b"})
    roster = Roster()
    roster.refresh(grid, wait_for=2, timeout=5)
    grid.names[13] = "hospital-a"  # a registered node answering with another's name
    roster.refresh(grid, wait_for=2, timeout=5)
    roster.refresh(grid, wait_for=2, timeout=5)
    assert roster.active() == [("hospital-a", 11), ("hospital-b", 12)]  # no eviction
    assert [m.metadata.dst_node_id for m in grid.sent].count(13) == 1  # asked once, refused
    # a refusal it sends in that name retires no one who trains
    retire_refusing(roster, [refusal_from(13, "require-dp")])
    assert ("hospital-a", 11) in roster.active()


def test_a_deployed_roster_names_nodes_by_their_registered_key_alone():
    grid = FakeGrid({11: "hospital-a", 12: "someone-else", 13: "hospital-a"})
    registered = {11: "hospital-a", 12: "hospital-b"}  # node id -> key file stem
    roster = Roster(registered.get, ask=False)
    roster.refresh(grid, wait_for=2, timeout=5)
    assert roster.active() == [("hospital-a", 11), ("hospital-b", 12)]
    assert grid.sent == []  # nobody is asked: a node cannot choose its name


def test_an_error_the_superlink_writes_for_a_silent_node_is_named_after_that_node():
    from flwr.app import Error

    from fedtune.server.roster import answering_node

    grid = FakeGrid({7: "hospital-a", 9: "hospital-b"})
    sent = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY) for n in (7, 9)]
    grid.push_messages(sent)
    unavailable = Message(Error(code=3, reason="Node Unavailable"), reply_to=sent[1])
    unavailable.metadata.__dict__["_src_node_id"] = 1  # the SuperLink's, as Flower writes it
    assert unavailable.metadata.src_node_id == 1
    assert answering_node(unavailable, sent) == 9
    answered = Message(RecordDict(), reply_to=sent[0])
    assert answering_node(answered, sent) == 7
