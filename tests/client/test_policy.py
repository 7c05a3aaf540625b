"""The node's own policy: its settings, their checks, and their way to the SuperNode."""

from __future__ import annotations

import dataclasses
import math

import pytest
from flwr.common.config import parse_config_args

from fedtune.client.deploy import _toml_value
from fedtune.client.node import Node
from fedtune.client.policy import NodePolicy, PolicyError, policy_flags


def test_a_node_that_requires_dp_needs_a_finite_budget_and_names_the_flag():
    with pytest.raises(PolicyError, match="--budget-epsilon"):
        NodePolicy()
    assert NodePolicy(require_dp=False).budget() == math.inf  # waived explicitly
    for endless in (math.inf, math.nan, 0.0):
        with pytest.raises(PolicyError, match="budget-epsilon"):
            NodePolicy(budget_epsilon=endless)
    with pytest.raises(PolicyError, match="unknown node policy keys: epsilon"):
        NodePolicy.from_mapping({"epsilon": 3.0})
    with pytest.raises(PolicyError, match="require-secagg"):
        NodePolicy.from_mapping({"budget-epsilon": 3.0, "require-secagg": "no"})


def test_a_policy_file_of_an_earlier_release_is_told_what_changed():
    with pytest.raises(PolicyError, match="`max-delta` is now `delta`"):
        NodePolicy.from_mapping({"budget-epsilon": 3.0, "max-delta": 1e-6})
    with pytest.warns(UserWarning, match="report-epsilon"):
        policy = NodePolicy.from_mapping({"budget-epsilon": 3.0, "report-epsilon": True})
    assert policy.budget() == 3.0


def test_one_round_and_one_run_may_take_half_the_budget_unless_the_node_says_otherwise():
    policy = NodePolicy(budget_epsilon=8.0)
    assert (policy.round_cap(), policy.run_cap()) == (4.0, 4.0)
    policy = NodePolicy(budget_epsilon=8.0, max_epsilon_per_round=1.0, max_epsilon_per_run=6.0)
    assert (policy.round_cap(), policy.run_cap()) == (1.0, 6.0)
    with pytest.raises(PolicyError, match="max-epsilon-per-round"):
        NodePolicy(budget_epsilon=8.0, max_epsilon_per_round=math.inf)


def test_the_policy_reaches_the_supernode_unchanged_through_flowers_node_config():
    policy = NodePolicy(budget_epsilon=2.5, require_secagg=False, delta=1e-6,
                        min_noise_multiplier=0.8, share_evaluation=True, split_seed=7,
                        models=["embedded", "/models/minilm"], planning_rows=500,
                        max_epsilon_per_round=1.5)
    values = {"data-path": "/data", "ledger-dir": "/ledger", "name": "hospital-a",
              **policy.to_node_config()}
    line = " ".join(f"{k}={_toml_value(v)}" for k, v in values.items())
    parsed = parse_config_args([line])
    assert Node.from_node_config(parsed).policy == policy


def test_every_policy_setting_has_a_flag_whose_help_states_the_settings_own_default():
    import argparse

    from fedtune.cli import _add_policy_flags

    flags = {flag.key: flag for flag in policy_flags()}
    assert set(flags) == {f.name.replace("_", "-") for f in dataclasses.fields(NodePolicy)}
    assert flags["require-dp"].name == "--allow-no-dp" and flags["require-dp"].const is False
    assert "(default: 0.5)" in flags["min-noise-multiplier"].help
    assert "(default: embedded)" in flags["models"].help
    parser = argparse.ArgumentParser()
    _add_policy_flags(parser)
    args = parser.parse_args(["--budget-epsilon", "3", "--allow-no-secagg", "--models", "a,b"])
    values = {f.key: getattr(args, f.dest) for f in flags.values()
              if getattr(args, f.dest) is not None}
    policy = NodePolicy.from_mapping(values)
    assert policy.budget() == 3.0 and not policy.require_secagg and policy.models == ["a", "b"]
