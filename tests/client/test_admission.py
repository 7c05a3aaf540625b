"""A deployed node admits a request from the request and its own policy alone, before any row
is read: driven through the ClientApp with hand-built messages, as a malicious server would."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from fedtune.client import app as client_app
from fedtune.client.policy import (
    MAX_ADAPTER_VALUE,
    MAX_LENGTH,
    MAX_LORA_RANK,
    MAX_RUN_STEPS,
    MIN_NOISE,
    MODELS,
    PLANNING_ROWS,
    REQUIRE_DP,
    REQUIRE_SECAGG,
    ROUND_CAP,
    RUN_CAP,
    TASK,
)
from fedtune.common import record_keys as keys
from fedtune.common.task import cached_task
from tests.client.conftest import (
    data_dir,
    ledger_rounds,
    node_context,
    refusal_reason,
    request,
    run_config,
    toy_rows,
)

PERMISSIVE = {"budget-epsilon": 1000.0, "require-secagg": False}


@pytest.mark.parametrize(("overrides", "rule"), [
    ({"privacy.dp": False}, REQUIRE_DP),
    ({"privacy.level": "client"}, REQUIRE_DP),
    ({}, REQUIRE_SECAGG),  # a plain update asked of a node that requires secure aggregation
    ({"model.task": "causal-lm"}, TASK),  # a classification node's rows read as text
])
def test_the_default_policy_refuses_before_touching_data(tiny_model_dir, toy_data_dir, tmp_path,
                                                         overrides, rule):
    config = run_config(tiny_model_dir, toy_data_dir, **overrides)
    context = node_context(tiny_model_dir, toy_data_dir, tmp_path / "ledger",
                           **{"budget-epsilon": 8.0})
    reply = client_app.train(request(config), context)
    assert rule in refusal_reason(reply)
    assert ledger_rounds(tmp_path / "ledger") == []


@pytest.mark.parametrize(("overrides", "rule"), [
    ({"privacy.noise_multiplier": 0.1}, MIN_NOISE),
    ({"privacy.epsilon": 100.0}, MIN_NOISE),  # the largest target is little noise: the floor holds
    ({"model.max_length": 100_000}, MAX_LENGTH),  # beyond the node's limit
    ({"model.max_length": 200}, MAX_LENGTH),  # beyond the model's 128 positions
    ({"lora.r": 512}, MAX_LORA_RANK),
    ({"privacy.planning_rows": 0}, PLANNING_ROWS),
])
def test_requests_beyond_the_nodes_limits_are_refused(tiny_model_dir, toy_data_dir, tmp_path,
                                                      overrides, rule):
    config = run_config(tiny_model_dir, toy_data_dir, **overrides)
    ledger = tmp_path / "ledger"
    reply = client_app.train(request(config), node_context(tiny_model_dir, toy_data_dir, ledger,
                                                           **PERMISSIVE))
    assert rule in refusal_reason(reply)
    assert ledger_rounds(ledger) == []  # nothing spent


def test_a_noise_below_the_floor_is_refused_before_any_accountant_sees_it(
        tiny_model_dir, toy_data_dir, tmp_path, monkeypatch):
    # PRV at noise 1e-3 wants gigabytes: a server's absurd noise must not reach the accountant
    from fedtune.client import admission

    def no_accounting(*args, **kwargs):
        raise AssertionError("epsilon computed for a plan below the floor")

    monkeypatch.setattr(admission, "epsilon_spent", no_accounting)
    config = run_config(tiny_model_dir, toy_data_dir, **{"privacy.noise_multiplier": 1e-3})
    reply = client_app.train(request(config), node_context(tiny_model_dir, toy_data_dir,
                                                           tmp_path / "ledger", **PERMISSIVE))
    assert MIN_NOISE in refusal_reason(reply)


@pytest.mark.parametrize("overrides", [
    {"federation.rounds": 100_000},  # the noise search would compose 100,000 rounds of steps
    {"federation.rounds": 100_000, "privacy.noise_multiplier": 1.0},  # the run cap would
    {"federation.rounds": 3_000, "train.local_steps": 1_000},  # 3 million steps
])
def test_a_horizon_past_the_nodes_limit_is_refused_before_any_accountant_sees_it(
        tiny_model_dir, toy_data_dir, tmp_path, monkeypatch, overrides):
    # PRV over a million steps takes minutes and gigabytes on every message: a server's long
    # horizon is refused from its values alone, not left to stall or kill the node
    from fedtune.client import admission, dp_plan

    def no_accounting(*args, **kwargs):
        raise AssertionError("an accountant was asked about a horizon past the node's limit")

    monkeypatch.setattr(admission, "epsilon_spent", no_accounting)
    monkeypatch.setattr(dp_plan, "noise_for_target", no_accounting)
    config = run_config(tiny_model_dir, toy_data_dir, **overrides)
    reply = client_app.train(request(config), node_context(tiny_model_dir, toy_data_dir,
                                                           tmp_path / "ledger", **PERMISSIVE))
    assert MAX_RUN_STEPS in refusal_reason(reply)
    assert ledger_rounds(tmp_path / "ledger") == []


def test_the_horizon_limit_counts_a_rounds_steps_times_the_rounds(toy_data_dir):
    from fedtune.client.admission import horizon_violation, request_violations
    from fedtune.client.node import Node
    from fedtune.client.policy import NodePolicy
    from fedtune.common.config import RunConfig

    policy = NodePolicy(require_dp=False, require_secagg=False, max_run_steps=100)
    config = RunConfig.from_mapping({"model.name": "embedded", "federation.rounds": 10})
    assert horizon_violation(policy, config, 10) == ""  # 100 steps: at the limit
    assert horizon_violation(policy, config, 11).startswith(f"{MAX_RUN_STEPS}: ")
    # client-level DP: each round is one release, refused before its noise is searched
    client_level = RunConfig.from_mapping({
        "model.name": "embedded", "privacy.dp": True, "privacy.level": "client",
        "privacy.epsilon": 8.0, "privacy.delta": 0.05, "federation.num_clients": 2,
        "federation.rounds": 101})
    node = Node(name="n", policy=policy, data_path=str(toy_data_dir))
    assert [rule.split(":")[0] for rule in
            request_violations(policy, client_level, node, secure=False)] == [MAX_RUN_STEPS]


def test_a_position_table_with_a_padding_offset_holds_fewer_tokens(tmp_path):
    # RoBERTa numbers positions from its padding index + 1: with 34 slots a 33-token row fails
    # while a 32-token one trains, a failure only some rows would cause, so the node refuses
    # any max_length past what every row can hold
    import torch
    from transformers import RobertaConfig, RobertaForSequenceClassification

    from fedtune.client.admission import model_violations, token_capacity
    from fedtune.client.policy import NodePolicy
    from fedtune.common.config import RunConfig

    config = RobertaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                           num_attention_heads=2, intermediate_size=16,
                           max_position_embeddings=34, pad_token_id=1)
    model = RobertaForSequenceClassification(config).eval()
    capacity = token_capacity(model)
    assert capacity == 32
    with torch.no_grad():
        model(input_ids=torch.full((1, capacity), 5))
        with pytest.raises((IndexError, RuntimeError)):
            model(input_ids=torch.full((1, capacity + 1), 5))
    task = SimpleNamespace(model=SimpleNamespace(get_base_model=lambda: model))
    policy = NodePolicy(require_dp=False, require_secagg=False)
    for length, refused in ((32, False), (33, True), (34, True)):
        asked = RunConfig.from_mapping({"model.name": "embedded", "model.max_length": length})
        assert bool(model_violations(policy, asked, task)) is refused, length


def test_a_model_the_node_did_not_allow_is_refused_before_it_is_loaded(tiny_model_dir,
                                                                      toy_data_dir, tmp_path):
    elsewhere = tmp_path / "their-model"  # a path on the node's disk, or a hub id
    config = run_config(tiny_model_dir, toy_data_dir, **{"model.name": str(elsewhere)})
    message = request(run_config(tiny_model_dir, toy_data_dir))
    message.content[keys.CONFIG][keys.RUN_CONFIG] = json.dumps(config.to_flat())
    reply = client_app.train(message, node_context(tiny_model_dir, toy_data_dir,
                                                   tmp_path / "ledger", **PERMISSIVE))
    assert MODELS in refusal_reason(reply)


def test_a_deployed_nodes_failure_reaches_the_server_without_its_details(
        tiny_model_dir, toy_data_dir, tmp_path):
    # an allowed model that cannot load: the server learns "failed", not the path or the error
    secret = tmp_path / "secret"
    config = run_config(tiny_model_dir, toy_data_dir, **{"model.name": str(secret)})
    message = request(run_config(tiny_model_dir, toy_data_dir))
    message.content[keys.CONFIG][keys.RUN_CONFIG] = json.dumps(config.to_flat())
    context = node_context(tiny_model_dir, toy_data_dir, tmp_path / "ledger", **PERMISSIVE,
                           models=str(secret))
    with pytest.raises(client_app.NodeFailure) as failure:
        client_app.train(message, context)
    assert "secret" not in str(failure.value) and "train failed" in str(failure.value)


def test_an_unreadable_run_configuration_is_refused_naming_the_servers_value(
        tiny_model_dir, toy_data_dir, tmp_path):
    message = request(run_config(tiny_model_dir, toy_data_dir))
    message.content[keys.CONFIG][keys.RUN_CONFIG] = json.dumps(
        {"data.prompt_template": "{instruction}{input:>4000000000}"})
    reply = client_app.train(message, node_context(tiny_model_dir, toy_data_dir,
                                                   tmp_path / "ledger", **PERMISSIVE))
    assert "data.prompt_template" in refusal_reason(reply)  # parsed, never formatted


@pytest.mark.parametrize(("damage", "rule"), [
    (lambda v: v * np.nan, "adapter"),
    (lambda v: v + 3e37, MAX_ADAPTER_VALUE),
    (lambda v: v[..., :1], "adapter"),  # another shape
    (lambda v: v.astype(np.int64), "adapter"),
    (lambda v: v.astype(np.longdouble), "adapter"),  # a float torch cannot take
])
def test_a_received_adapter_outside_the_nodes_limits_is_refused(tiny_model_dir, toy_data_dir,
                                                                tmp_path, damage, rule):
    config = run_config(tiny_model_dir, toy_data_dir)
    adapter = dict(cached_task(config).initial_adapter)
    head = next(name for name in adapter if "modules_to_save" in name and name.endswith("weight"))
    adapter[head] = damage(adapter[head])
    reply = client_app.train(request(config, adapter=adapter),
                             node_context(tiny_model_dir, toy_data_dir, tmp_path / "ledger",
                                          **PERMISSIVE))
    assert rule in refusal_reason(reply)


def test_one_round_or_one_run_may_not_take_more_than_the_node_allows(tiny_model_dir,
                                                                     toy_data_dir, tmp_path):
    # budget 8: by default one round and one run may cost at most 4
    ledger = tmp_path / "ledger"
    context = node_context(tiny_model_dir, toy_data_dir, ledger, **{"budget-epsilon": 8.0,
                                                                     "require-secagg": False})
    one_round = run_config(tiny_model_dir, toy_data_dir, **{"privacy.epsilon": 6.0})
    assert ROUND_CAP in refusal_reason(client_app.train(request(one_round), context))
    whole_run = run_config(tiny_model_dir, toy_data_dir, **{"privacy.epsilon": 6.0,
                                                            "federation.rounds": 20})
    reason = refusal_reason(client_app.train(request(whole_run), context))
    assert RUN_CAP in reason and ROUND_CAP not in reason
    assert ledger_rounds(ledger) == []
    within = run_config(tiny_model_dir, toy_data_dir, **{"privacy.epsilon": 3.5,
                                                         "federation.rounds": 2})
    reply = client_app.train(request(within), context)
    assert keys.ARRAYS in reply.content.array_records
    assert len(ledger_rounds(ledger)) == 1


def outcome(reply) -> tuple:
    """Everything a server can read from a reply except the update's values (which are the
    DP-SGD release): its kind, refusal reason, record layout, metric names and epsilon."""
    config = reply.content.config_records.get(keys.CONFIG)
    if config is not None:
        return ("refused", str(config.get(keys.REASON)), str(config.get(keys.STATUS)))
    metrics = reply.content[keys.METRICS]
    arrays = reply.content[keys.ARRAYS]
    return ("trained", tuple(sorted(metrics)), round(float(metrics[keys.EPSILON]), 9),
            tuple(sorted((name, tuple(a.shape)) for name, a in arrays.items())))


def probes(model_dir, data) -> list:
    """Thirty requests a server could use to find a node's row count: deltas, batch sizes,
    targets and noise levels around every threshold that once followed it."""
    settings = []
    for delta in (0.0, 1e-2, 1e-3, 1.6e-4, 1e-5):
        settings.append({"privacy.delta": delta, "privacy.epsilon": 1.0})
    for batch in (1, 8, 64, 100, 10_000):
        settings.append({"train.batch_size": batch, "privacy.epsilon": 1.0})
    for epsilon in (0.5, 2.0, 3.9, 4.1, 40.0):
        settings.append({"privacy.epsilon": epsilon})
    for noise in (0.49, 0.5, 0.51, 2.0, 1000.0):
        settings.append({"privacy.noise_multiplier": noise, "train.batch_size": 1_000_000})
    for rows in (10, 60, 150, 400, 10_000):
        settings.append({"privacy.planning_rows": rows, "privacy.epsilon": 1.0})
    for rounds in (1, 2, 3, 10, 50):
        settings.append({"federation.rounds": rounds, "privacy.epsilon": 2.0})
    return [run_config(model_dir, data, **{"train.local_steps": 1, **s}) for s in settings]


def test_thirty_probes_cannot_tell_a_node_of_60_rows_from_one_of_150(tiny_model_dir, tmp_path):
    small = data_dir(tmp_path / "small", toy_rows(60))
    large = data_dir(tmp_path / "large", toy_rows(150))
    seen = {}
    for name, data in (("small", small), ("large", large)):
        context = node_context(tiny_model_dir, data, tmp_path / f"ledger-{name}",
                               **{"budget-epsilon": 30.0, "require-secagg": False})
        seen[name] = [outcome(client_app.train(request(config), context))
                      for config in probes(tiny_model_dir, small)]
    assert len(seen["small"]) == 30
    kinds = {o[0] for o in seen["small"]}
    assert kinds == {"refused", "trained"}  # the probes reach both sides of the rules
    assert seen["small"] == seen["large"]  # refusals, layouts and every epsilon: the same


def test_client_level_noise_below_the_node_floor_is_refused(toy_data_dir):
    from fedtune.client.admission import request_violations
    from fedtune.client.node import Node
    from fedtune.client.policy import NodePolicy
    from fedtune.common.config import RunConfig

    config = RunConfig.from_mapping({"privacy.dp": True, "privacy.level": "client",
                                     "privacy.epsilon": 8.0, "federation.rounds": 1,
                                     "privacy.delta": 0.05, "federation.num_clients": 2,
                                     "model.name": "embedded"})  # z = 0.35
    node = Node(name="n", policy=NodePolicy(require_dp=False, require_secagg=False),
                data_path=str(toy_data_dir))
    broken = request_violations(node.policy, config, node, secure=False)
    assert [rule.split(":")[0] for rule in broken] == [MIN_NOISE]
    lenient = Node(name="n", policy=NodePolicy(require_dp=False, require_secagg=False,
                                               min_noise_multiplier=0.3),
                   data_path=str(toy_data_dir))
    assert request_violations(lenient.policy, config, lenient, secure=False) == []


def test_a_plain_batch_is_one_forward_pass_and_held_to_the_nodes_physical_batch(toy_data_dir):
    from fedtune.client.admission import request_violations
    from fedtune.client.node import Node
    from fedtune.client.policy import MAX_PHYSICAL_BATCH, NodePolicy
    from fedtune.common.config import RunConfig

    node = Node(name="n", policy=NodePolicy(require_dp=False, require_secagg=False),
                data_path=str(toy_data_dir))
    limit = node.policy.max_physical_batch

    def broken(**settings) -> list[str]:
        config = RunConfig.from_mapping({"model.name": "embedded", **settings})
        return [rule.split(":")[0] for rule in
                request_violations(node.policy, config, node, secure=False)]

    assert broken(**{"train.batch_size": limit}) == []
    assert broken(**{"train.batch_size": 100 * limit}) == [MAX_PHYSICAL_BATCH]
    assert broken(**{"privacy.dp": True, "privacy.level": "client", "privacy.epsilon": 8.0,
                     "privacy.delta": 0.05, "federation.num_clients": 2,
                     "privacy.noise_multiplier": 1.0,
                     "train.batch_size": 100 * limit}) == [MAX_PHYSICAL_BATCH]
    # DP-SGD's Poisson batch goes through in chunks of train.physical_batch
    assert broken(**{"privacy.dp": True, "train.batch_size": 100 * limit}) == []
