"""The node's policy decides what leaves it: the ClientApp driven with hand-built messages, as a
curious or careless server would send them, against a deployed node's own configuration."""

from __future__ import annotations

import json

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common.config import parse_config_args

from client import app as client_app
from client.deploy import _toml_value
from client.node import Node
from client.policy import (
    MAX_DELTA,
    MIN_NOISE,
    REQUIRE_DP,
    REQUIRE_SECAGG,
    NodePolicy,
    PolicyError,
    cohort_violations,
    request_violations,
)
from common import record_keys as keys
from common.adapter import to_record
from common.config import RunConfig
from common.task import cached_task

pytestmark = pytest.mark.usefixtures("message_identity")  # messages built by hand


def run_config(tiny_model_dir, toy_data_dir, **overrides) -> RunConfig:
    settings = {"model.name": str(tiny_model_dir), "data.path": str(toy_data_dir),
                "federation.rounds": 1, "train.batch_size": 8, "privacy.dp": True,
                "privacy.epsilon": 8.0, "output.dir": "server-run"}
    return RunConfig.from_mapping({**settings, **overrides})


def node_context(toy_data_dir, ledger, **policy) -> Context:
    node_config = {"data-path": str(toy_data_dir), "ledger-dir": str(ledger),
                   "name": "hospital-a", **policy}
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(),
                   run_config={})


def request(config: RunConfig, message_type: str = "train", **extra) -> Message:
    settings = {keys.RUN_CONFIG: json.dumps(config.to_flat()), keys.SERVER_ROUND: 1, **extra}
    adapter = cached_task(config).initial_adapter
    content = RecordDict({keys.ARRAYS: to_record(adapter), keys.CONFIG: ConfigRecord(settings)})
    return Message(content, dst_node_id=7, message_type=message_type)


def refusal_reason(reply: Message) -> str:
    assert reply.content[keys.CONFIG][keys.STATUS] == keys.POLICY_REFUSED
    assert not reply.content.array_records and not reply.content.metric_records  # no data
    return str(reply.content[keys.CONFIG][keys.REASON])


def test_a_node_that_requires_dp_needs_a_budget_and_names_the_flag():
    with pytest.raises(PolicyError, match="--budget-epsilon"):
        NodePolicy()
    assert NodePolicy(require_dp=False).budget() == float("inf")  # waived explicitly
    with pytest.raises(PolicyError, match="unknown node policy keys: epsilon"):
        NodePolicy.from_mapping({"epsilon": 3.0})
    with pytest.raises(PolicyError, match="require-secagg"):
        NodePolicy.from_mapping({"budget-epsilon": 3.0, "require-secagg": "no"})


@pytest.mark.parametrize(("overrides", "rule"), [
    ({"privacy.dp": False}, REQUIRE_DP),
    ({"privacy.level": "client"}, REQUIRE_DP),
    ({}, REQUIRE_SECAGG),  # a plain update asked of a node that requires secure aggregation
])
def test_the_default_policy_refuses_before_touching_data(tiny_model_dir, toy_data_dir, tmp_path,
                                                         overrides, rule):
    config = run_config(tiny_model_dir, toy_data_dir, **overrides)
    context = node_context(toy_data_dir, tmp_path / "ledger", **{"budget-epsilon": 8.0})
    reply = client_app.train(request(config), context)
    assert rule in refusal_reason(reply)
    assert not (tmp_path / "ledger").exists() or not list((tmp_path / "ledger").iterdir())


@pytest.mark.parametrize(("overrides", "rule"), [
    ({"privacy.delta": 0.5}, MAX_DELTA),
    ({"privacy.noise_multiplier": 0.1}, MIN_NOISE),
    ({"privacy.epsilon": 500.0}, MIN_NOISE),  # a huge target is little noise: the floor holds
])
def test_dp_settings_below_the_node_floor_are_refused(tiny_model_dir, toy_data_dir, tmp_path,
                                                      overrides, rule):
    config = run_config(tiny_model_dir, toy_data_dir, **overrides)
    ledger = tmp_path / "ledger"
    context = node_context(toy_data_dir, ledger, **{"budget-epsilon": 1000.0,
                                                     "require-secagg": False})
    reply = client_app.train(request(config), context)
    assert rule in refusal_reason(reply)
    assert not ledger.exists() or not list(ledger.iterdir())  # nothing spent


def test_a_node_whose_policy_permits_the_round_trains_and_sends_no_loss_under_dp(
        tiny_model_dir, toy_data_dir, tmp_path):
    config = run_config(tiny_model_dir, toy_data_dir)
    context = node_context(toy_data_dir, tmp_path / "ledger", **{"budget-epsilon": 8.0,
                                                                  "require-secagg": False})
    reply = client_app.train(request(config), context)
    metrics = reply.content[keys.METRICS]
    assert keys.ARRAYS in reply.content.array_records
    assert set(metrics) == {keys.NUM_EXAMPLES, keys.UNIT_WEIGHT, keys.EPSILON}  # no loss
    assert 0 < float(metrics[keys.EPSILON]) <= 8.0
    (ledger,) = (tmp_path / "ledger").glob("ledger-*.json")
    assert len(json.loads(ledger.read_text())["rounds"]) == 1


def test_evaluation_is_shared_only_where_the_policy_says_so(tiny_model_dir, toy_data_dir,
                                                            tmp_path):
    config = run_config(tiny_model_dir, toy_data_dir)
    closed = node_context(toy_data_dir, tmp_path, **{"budget-epsilon": 8.0})
    assert "share-evaluation" in refusal_reason(
        client_app.evaluate_global(request(config, "evaluate"), closed))
    shared = node_context(toy_data_dir, tmp_path, **{"budget-epsilon": 8.0,
                                                     "share-evaluation": True})
    metrics = client_app.evaluate_global(request(config, "evaluate"), shared).content[keys.METRICS]
    assert float(metrics[keys.NUM_EXAMPLES]) > 0


def test_a_repeated_step_one_and_a_step_three_out_of_order_are_refused_before_training(
        tiny_model_dir, toy_data_dir, tmp_path):
    config = run_config(tiny_model_dir, toy_data_dir, **{"secagg.enabled": True,
                                                         "federation.num_clients": 3})
    ledger = tmp_path / "ledger"
    context = node_context(toy_data_dir, ledger, **{"budget-epsilon": 8.0,
                                                     "require-peers": False})
    session = {keys.SECAGG_SESSION: b"s" * 16}
    reply = client_app.secagg_keys(request(config, "train.secagg_keys", **session), context)
    assert keys.CONFIG in reply.content.config_records
    with pytest.raises(client_app.SecAggViolation, match="second step 1"):
        client_app.secagg_keys(request(config, "train.secagg_keys", **session), context)
    with pytest.raises(client_app.SecAggViolation, match="out of order"):
        client_app.secagg_masked(request(config, "train.secagg_masked", **session), context)
    assert not ledger.exists() or not list(ledger.iterdir())  # nothing trained, nothing spent


def test_cohort_and_threshold_below_the_policy_are_named():
    policy = NodePolicy(budget_epsilon=1.0, min_cohort=5, min_threshold=3)
    broken = cohort_violations(policy, cohort=4, threshold=2)
    assert [rule.split(":")[0] for rule in broken] == ["min-cohort", "min-threshold"]
    assert cohort_violations(policy, cohort=5, threshold=3) == []


def test_the_policy_reaches_the_supernode_unchanged_through_flowers_node_config():
    policy = NodePolicy(budget_epsilon=2.5, require_secagg=False, max_delta=1e-6,
                        min_noise_multiplier=0.8, share_evaluation=True, split_seed=7)
    values = {"data-path": "/data", "ledger-dir": "/ledger", "name": "hospital-a",
              **policy.to_node_config()}
    line = " ".join(f"{k}={_toml_value(v)}" for k, v in values.items())
    parsed = parse_config_args([line])
    assert Node.from_node_config(parsed).policy == policy


def test_a_deployed_nodes_failure_reaches_the_server_without_its_details(
        tiny_model_dir, toy_data_dir, tmp_path):
    # a server probing the node's disk through an error message learns nothing but "failed"
    config = run_config(tiny_model_dir, toy_data_dir, **{"model.name": str(tmp_path / "secret")})
    context = node_context(toy_data_dir, tmp_path / "ledger", **{"budget-epsilon": 8.0,
                                                                  "require-secagg": False})
    message = request(run_config(tiny_model_dir, toy_data_dir))  # the adapter of a real model
    message.content[keys.CONFIG][keys.RUN_CONFIG] = json.dumps(config.to_flat())
    with pytest.raises(client_app.NodeFailure) as failure:
        client_app.train(message, context)
    assert "secret" not in str(failure.value) and "train failed" in str(failure.value)


def test_a_classifier_is_trained_only_over_a_declared_label_set(tiny_model_dir, toy_data_dir,
                                                                 tmp_path):
    undeclared = tmp_path / "undeclared"
    undeclared.mkdir()
    (undeclared / "train.jsonl").write_text((toy_data_dir / "train.jsonl").read_text())
    config = run_config(tiny_model_dir, toy_data_dir)
    context = node_context(undeclared, tmp_path / "ledger", **{"budget-epsilon": 8.0,
                                                                "require-secagg": False})
    assert "labels-json" in refusal_reason(client_app.train(request(config), context))


def test_client_level_noise_below_the_node_floor_is_refused():
    config = RunConfig.from_mapping({"privacy.dp": True, "privacy.level": "client",
                                     "privacy.epsilon": 8.0, "federation.rounds": 1,
                                     "privacy.delta": 0.05, "federation.num_clients": 2})  # z 0.35
    waived = NodePolicy(require_dp=False, require_secagg=False)
    broken = request_violations(waived, config, secure=False)
    assert len(broken) == 1 and broken[0].startswith(MIN_NOISE)
    assert request_violations(NodePolicy(require_dp=False, require_secagg=False,
                                         min_noise_multiplier=0.3), config, secure=False) == []
