"""The server step applied to an average equals Flower's own strategy fed the replies."""

import numpy as np
import pytest
from flwr.app import Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvgM, FedYogi

from fedtune.common import record_keys as keys
from fedtune.common.adapter_state import from_record, to_record
from fedtune.common.config import ConfigError, FederationConfig, RunConfig
from fedtune.server.strategies.server_optimizer import server_optimizer


def _reply(node_id: int, arrays: dict, examples: int) -> Message:
    sent = Message(RecordDict(), dst_node_id=node_id, message_type=MessageType.TRAIN)
    content = RecordDict({keys.ARRAYS: to_record(arrays),
                          keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: examples})})
    return Message(content, reply_to=sent)


def _rounds(seed: int = 0, rounds: int = 3, clients: int = 3):
    """Per round: the clients' states and example counts, drifting so moments matter."""
    rng = np.random.default_rng(seed)
    return [[({"a": rng.normal(r * 0.1, 1.0, size=(3, 4)).astype(np.float32),
               "b": rng.normal(size=5).astype(np.float32)}, int(rng.integers(5, 50)))
             for _ in range(clients)] for r in range(rounds)]


def _average(updates):
    total = sum(n for _, n in updates)
    return {k: (sum(u[k].astype(np.float64) * n for u, n in updates) / total).astype(np.float32)
            for k in updates[0][0]}


FLOWER = {
    "fedavgm": lambda f: FedAvgM(server_learning_rate=f.server_step_size,
                                 server_momentum=f.server_momentum, arrayrecord_key=keys.ARRAYS),
    "fedadam": lambda f: FedAdam(eta=f.server_step_size, beta_1=f.beta_1, beta_2=f.beta_2,
                                 tau=f.tau, arrayrecord_key=keys.ARRAYS),
    "fedyogi": lambda f: FedYogi(eta=f.server_step_size, beta_1=f.beta_1, beta_2=f.beta_2,
                                 tau=f.tau, arrayrecord_key=keys.ARRAYS),
    "fedadagrad": lambda f: FedAdagrad(eta=f.server_step_size, tau=f.tau,
                                       arrayrecord_key=keys.ARRAYS),
}


@pytest.mark.parametrize("name", sorted(FLOWER))
def test_each_server_step_matches_flowers_strategy_over_three_rounds(name):
    # Prepare
    federation = FederationConfig(strategy=name, server_lr=0.3)
    ours, theirs = server_optimizer(federation), FLOWER[name](federation)
    start = {"a": np.zeros((3, 4), np.float32), "b": np.ones(5, np.float32)}
    state_ours, record_theirs = dict(start), to_record(start)
    for server_round, updates in enumerate(_rounds(), start=1):
        # Flower keeps the arrays it sent in configure_train (which needs a Grid to sample)
        if name == "fedavgm":
            theirs.current_arrays = theirs.current_arrays or record_theirs
        else:
            theirs.current_arrays = from_record(record_theirs)
        replies = [_reply(10 + i, u, n) for i, (u, n) in enumerate(updates)]
        # Execute
        record_theirs, _ = theirs.aggregate_train(server_round, replies)
        state_ours = ours.step(state_ours, _average(updates), server_round)
    # Assert
    for key, value in from_record(record_theirs).items():
        np.testing.assert_allclose(state_ours[key], value, rtol=1e-4, atol=1e-5)


def test_fedavg_takes_the_average_as_it_is():
    average = {"a": np.full(3, 2.0, np.float32)}
    step = server_optimizer(FederationConfig(strategy="fedavg"))
    assert step.step({"a": np.zeros(3, np.float32)}, average, 1) is average


def test_moments_survive_a_checkpoint_and_continue_the_same_run():
    # Prepare
    federation = FederationConfig(strategy="fedadam")
    rounds = _rounds(seed=1, rounds=4)
    unbroken = server_optimizer(federation)
    state = {"a": np.zeros((3, 4), np.float32), "b": np.zeros(5, np.float32)}
    for r, updates in enumerate(rounds, start=1):
        state = unbroken.step(state, _average(updates), r)
    first = server_optimizer(federation)
    resumed_state = {"a": np.zeros((3, 4), np.float32), "b": np.zeros(5, np.float32)}
    for r, updates in enumerate(rounds[:2], start=1):
        resumed_state = first.step(resumed_state, _average(updates), r)
    # Execute
    second = server_optimizer(federation)
    second.load_state_arrays(first.state_arrays())
    for r, updates in enumerate(rounds[2:], start=3):
        resumed_state = second.step(resumed_state, _average(updates), r)
    # Assert
    for key in state:
        np.testing.assert_array_equal(state[key], resumed_state[key])


@pytest.mark.parametrize(("values", "message"), [
    ({"federation.strategy": "krum"}, "`federation.strategy` must be empty or one of fedavg"),
    ({"federation.server_lr": -1.0}, "`federation.server_lr` must be finite and >= 0"),
    ({"federation.server_momentum": 1.0}, "`federation.server_momentum` must be in"),
    ({"federation.beta_2": 1.5}, "`federation.beta_2` must be in"),
    ({"federation.tau": 0.0}, "`federation.tau` must be > 0"),
    ({"federation.strategy": "fedprox", "federation.proximal_mu": 0.0},
     "`federation.proximal_mu` must be > 0 when federation.strategy is 'fedprox'"),
    ({"federation.strategy": "fedprox", "privacy.dp": True},
     "`federation.strategy` cannot be 'fedprox' with privacy.level 'sample'"),
    ({"federation.server_lr": "0.1"}, "`federation.server_lr` must be of type float"),
])
def test_strategy_settings_are_validated_naming_the_field(values, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_mapping(values)


def test_a_server_lr_fedavg_would_ignore_warns():
    with pytest.warns(UserWarning, match="server_lr=2.0 is ignored by strategy 'fedavg'"):
        RunConfig.from_mapping({"federation.strategy": "fedavg", "federation.server_lr": 2.0})
    with pytest.warns(UserWarning, match="ignored by strategy 'fedavg'"):  # the plain default
        RunConfig.from_mapping({"federation.server_lr": 2.0})


def test_the_default_strategy_is_fedavg_for_every_kind_of_run():
    plain = server_optimizer(RunConfig().aggregation)
    dp_sgd = server_optimizer(RunConfig.from_mapping({"privacy.dp": True}).aggregation)
    client_level = RunConfig.from_mapping({"privacy.dp": True, "privacy.level": "client"})
    assert plain.name == server_optimizer(client_level.aggregation).name == "fedavg"
    assert (dp_sgd.name, dp_sgd.eta) == ("fedavg", 1.0)  # measured: docs/utility.md
    chosen = RunConfig.from_mapping({"privacy.dp": True, "federation.strategy": "fedadam"})
    assert chosen.aggregation.strategy == "fedadam"  # a strategy you set always wins
    assert RunConfig().federation.strategy == ""  # saved unresolved, like train's 0s
    with pytest.raises(ValueError, match=r"RunConfig\.aggregation"):
        server_optimizer(FederationConfig())


def test_strategy_names_pick_their_server_step_and_default_step_size():
    adam = server_optimizer(FederationConfig(strategy="fedadam"))
    momentum = server_optimizer(FederationConfig(strategy="fedavgm", server_lr=2.0))
    assert (adam.name, adam.eta) == ("fedadam", 0.01)
    assert (momentum.name, momentum.eta) == ("fedavgm", 2.0)
    assert server_optimizer(FederationConfig(strategy="fedprox")).name == "fedavg"
