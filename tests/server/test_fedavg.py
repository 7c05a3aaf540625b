import numpy as np
from flwr.app import ArrayRecord, Message, MessageType, MetricRecord, RecordDict

from fedtune.common import record_keys as keys
from fedtune.common.adapter_state import from_record, to_record
from fedtune.server.roster import Roster
from fedtune.server.strategies.fedavg import SeededFedAvg


def _reply(node_id: int, arrays: dict, examples: int) -> Message:
    sent = Message(RecordDict(), dst_node_id=node_id, message_type=MessageType.TRAIN)
    content = RecordDict({keys.ARRAYS: to_record(arrays),
                          keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: examples})})
    return Message(content, reply_to=sent)


def _roster(names: dict[int, str]) -> Roster:
    roster = Roster()
    for node_id, name in names.items():
        roster._node_of[name], roster._name_of[node_id] = node_id, name
    return roster


def test_fedavg_equals_the_hand_computed_weighted_mean():
    # Prepare
    rng = np.random.default_rng(0)
    updates = [{"a": rng.normal(size=(3, 4)).astype(np.float32),
                "b": rng.normal(size=5).astype(np.float32)} for _ in range(3)]
    examples = [10, 30, 60]
    strategy = SeededFedAvg(_roster({11: "x", 12: "y", 13: "z"}), seed=0,
                            arrayrecord_key=keys.ARRAYS)
    replies = [_reply(11 + i, u, n) for i, (u, n) in enumerate(zip(updates, examples,
                                                                    strict=True))]
    # Execute
    arrays, metrics = strategy.aggregate_train(1, replies)
    # Assert
    result = from_record(arrays)
    for key in ("a", "b"):
        expected = sum(n * u[key].astype(np.float64) for u, n in zip(updates, examples,
                                                                     strict=True)) / 100
        np.testing.assert_allclose(result[key], expected, rtol=1e-5, atol=1e-7)
    assert isinstance(arrays, ArrayRecord) and metrics is not None


def test_sampling_follows_the_seed_and_names_not_node_ids():
    first = SeededFedAvg(_roster({101 + i: f"client-{i}" for i in range(20)}), seed=4)
    second = SeededFedAvg(_roster({900 + i: f"client-{i}" for i in range(20)}), seed=4)
    names_first = [first.roster.name_of(n) for n in first.sample(0.25, 1)]
    names_second = [second.roster.name_of(n) for n in second.sample(0.25, 1)]
    assert names_first == names_second and len(names_first) == 5


def test_sampling_state_resumes_the_same_sequence():
    roster = _roster({i: f"c{i:02d}" for i in range(30)})
    uninterrupted = SeededFedAvg(roster, seed=1)
    draws = [uninterrupted.sample(0.2, 1) for _ in range(4)]
    resumed = SeededFedAvg(roster, seed=1)
    resumed.sample(0.2, 1), resumed.sample(0.2, 1)
    again = SeededFedAvg(roster, seed=1)
    again.load_state_dict(resumed.state_dict())
    assert [again.sample(0.2, 1) for _ in range(2)] == draws[2:]


def test_retired_clients_are_not_sampled():
    roster = _roster({1: "a", 2: "b", 3: "c"})
    roster.retire("b")
    strategy = SeededFedAvg(roster, seed=0)
    assert sorted(strategy.sample(1.0, 1)) == [1, 3]
