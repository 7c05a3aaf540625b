import pytest

from fedtune.common.config import (
    DP_SGD_TRAINING,
    PLAIN_TRAINING,
    POOLED_TRAINING,
    ConfigError,
    RunConfig,
)


def test_dotted_and_nested_keys_build_the_same_config():
    nested = RunConfig.from_mapping({"train": {"lr": 0.01}, "federation": {"rounds": 3}})
    dotted = RunConfig.from_mapping({"train.lr": 0.01, "federation.rounds": 3})
    assert nested == dotted
    assert nested.train.lr == 0.01 and nested.federation.rounds == 3


def test_flat_round_trip_preserves_every_field():
    config = RunConfig.from_mapping({"lora.target_modules": "query, value", "seed": 7})
    assert config.lora.target_modules == ["query", "value"]
    assert RunConfig.from_mapping(config.to_flat()) == config


@pytest.mark.parametrize(("values", "message"), [
    ({"train.lr": 1.0}, "`train.lr` must be in [0, 1) (0 = default), got 1.0"),
    ({"train.batch_size": -1}, "`train.batch_size` must be >= 0 (0 = default), got -1"),
    ({"privacy.accountant": "gdp"}, "`privacy.accountant` must be empty or one of rdp, prv"),
    ({"partition.alpha": -1.0}, "`partition.alpha` must be > 0"),
    ({"partition.scheme": "random"}, "`partition.scheme` must be one of"),
    ({"trian.lr": 0.1}, "unknown configuration keys: trian"),
    ({"train.learning_rate": 0.1}, "unknown configuration keys: train.learning_rate"),
    ({"federation.rounds": "3"}, "`federation.rounds` must be of type int"),
    ({"federation.rounds": True}, "`federation.rounds` must be of type int"),
    ({"partition.scheme": "natural"}, "`partition.by` must name a field"),
])
def test_bad_values_name_the_field(values, message):
    with pytest.raises(ConfigError, match=None) as caught:
        RunConfig.from_mapping(values)
    assert message in str(caught.value)


def test_toml_file_is_read_and_missing_file_is_named(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("seed = 3\n[partition]\nscheme = 'dirichlet'\nalpha = 1\n")
    config = RunConfig.from_toml(path)
    assert config.seed == 3 and config.partition.alpha == 1.0
    with pytest.raises(ConfigError, match="does not exist"):
        RunConfig.from_toml(tmp_path / "nope.toml")
    path.write_text("seed = [")
    with pytest.raises(ConfigError, match="not readable TOML"):
        RunConfig.from_toml(path)


def test_training_defaults_follow_the_kind_of_training_and_explicit_values_win():
    # Prepare
    plain = RunConfig()
    dp_sgd = RunConfig.from_mapping({"privacy.dp": True})
    client_level = RunConfig.from_mapping({"privacy.dp": True, "privacy.level": "client"})
    chosen = RunConfig.from_mapping({"privacy.dp": True, "train.batch_size": 4, "train.lr": 0.1})
    # Execute, Assert
    assert plain.training == plain.train.resolved(PLAIN_TRAINING)
    assert dp_sgd.training.batch_size == DP_SGD_TRAINING["batch_size"] != PLAIN_TRAINING[
        "batch_size"]
    assert client_level.training == client_level.train.resolved(PLAIN_TRAINING)
    assert (chosen.training.batch_size, chosen.training.lr) == (4, 0.1)
    assert chosen.training.local_epochs == DP_SGD_TRAINING["local_epochs"]
    assert all(getattr(plain.training, key) for key in PLAIN_TRAINING)  # no 0 reaches training
    assert RunConfig.from_mapping(dp_sgd.to_flat()).training == dp_sgd.training
    # Pooled training keeps its larger batch; what a client would use otherwise
    assert plain.pooled_training == plain.train.resolved(POOLED_TRAINING)
    assert plain.pooled_training.batch_size > plain.training.batch_size
    assert plain.pooled_training.lr == plain.training.lr
    assert chosen.pooled_training.batch_size == 4
    stepped = RunConfig.from_mapping({"train.local_steps": 3})  # a client's steps per round;
    assert stepped.training.local_steps == 3  # pooled training counts whole passes
    assert stepped.pooled_training.local_steps == 0


def test_ffa_lora_is_on_under_dp_sgd_unless_set_and_unset_survives_every_form():
    # Prepare
    plain, dp_sgd = RunConfig(), RunConfig.from_mapping({"privacy.dp": True})
    client_level = RunConfig.from_mapping({"privacy.dp": True, "privacy.level": "client"})
    both = RunConfig.from_mapping({"privacy.dp": True, "lora.freeze_a": False})
    # Execute, Assert
    assert (plain.adapter.freeze_a, dp_sgd.adapter.freeze_a) == (False, True)
    assert client_level.adapter.freeze_a is False
    causal = RunConfig.from_mapping({"privacy.dp": True, "model.task": "causal-lm"})
    assert causal.adapter.freeze_a is False  # measured for classifiers only
    assert both.adapter.freeze_a is False  # an explicit value wins (and a saved `false` resumes)
    assert RunConfig.from_mapping({"lora.freeze_a": True}).adapter.freeze_a is True
    # unset is absent from Flower's flat run config (no null there) and null in JSON
    assert "lora.freeze_a" not in dp_sgd.to_flat()
    assert RunConfig.from_mapping(dp_sgd.to_flat()) == dp_sgd
    assert RunConfig.from_mapping(dp_sgd.to_dict()) == dp_sgd
    assert RunConfig.from_mapping(both.to_flat()).adapter.freeze_a is False
    with pytest.raises(ConfigError, match=r"`lora\.freeze_a` must be of type bool"):
        RunConfig.from_mapping({"lora.freeze_a": "yes"})


@pytest.mark.parametrize(("override", "message"), [
    ({"privacy.noise_multiplier": float("inf")}, "must be a finite number"),
    ({"privacy.epsilon": float("nan")}, "must be a finite number"),
    ({"privacy.epsilon": 1e300}, r"privacy.epsilon` must be in \(0, 100\]"),
    ({"privacy.noise_multiplier": 1e300}, "privacy.noise_multiplier` must be in"),
    ({"federation.rounds": 10**10}, "federation.rounds` must be in"),
    ({"output.dir": "x" * 5000}, "output.dir` must be at most 4096 characters"),
    # a clipping norm of 1e-45 makes float32 noise of std z C exactly 0 while the ledger counts z
    ({"privacy.dp": True, "train.max_grad_norm": 1e-45}, r"train.max_grad_norm` must be in \["),
    ({"privacy.clip_norm": 1e-45}, r"privacy.clip_norm` must be in \["),
    ({"privacy.clip_norm": 1e300}, r"privacy.clip_norm` must be in \["),
])
def test_values_no_accountant_or_ledger_could_use_are_refused_by_name(override, message):
    # a server's Infinity noise or 1e300 epsilon would keep a node's accountant searching for ever
    with pytest.raises(ConfigError, match=message):
        RunConfig().with_overrides(override)
