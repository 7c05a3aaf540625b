import pytest

from common.config import ConfigError, RunConfig


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
    ({"train.lr": 0.0}, "`train.lr` must be in (0, 1), got 0.0"),
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
