"""The one settings loader behind the run configuration and the node policy."""

from __future__ import annotations

import dataclasses

import pytest

from fedtune.client.policy import NodePolicy, PolicyError
from fedtune.common.config import ConfigError, RunConfig
from fedtune.common.settings import build, flag_help, read_toml, setting


@dataclasses.dataclass(frozen=True)
class Toy:
    rate: float = setting("how fast", 0.5)
    steps: int = setting("0 = as many as the data allows", 0)
    name: str = setting("who", "")
    tags: list[str] = dataclasses.field(default_factory=lambda: ["a", "b"],
                                        metadata={"help": "labels"})


def test_both_files_are_read_by_one_reader_with_one_wording(tmp_path):
    broken = tmp_path / "broken.toml"
    broken.write_text("[train\n")
    for read, error, what in ((RunConfig.from_toml, ConfigError, "config file"),
                              (NodePolicy.read_file, PolicyError, "node policy file")):
        with pytest.raises(error, match=f"{what} .*broken.toml is not readable TOML"):
            read(broken)
        with pytest.raises(error, match=f"{what} .*nope.toml does not exist"):
            read(tmp_path / "nope.toml")
    assert read_toml(_write(tmp_path, "x = 1\n"), "file", ValueError) == {"x": 1}


def test_build_names_every_unknown_key_and_a_wrong_type():
    assert build(Toy, {"rate": 1, "tags": "x, y"}, ValueError) == Toy(rate=1.0, tags=["x", "y"])
    with pytest.raises(ValueError, match="unknown keys: colour, size"):
        build(Toy, {"size": 1, "colour": 2}, ValueError)
    with pytest.raises(ValueError, match="`steps` must be of type int"):
        build(Toy, {"steps": True}, ValueError)


def test_a_flag_names_its_fields_default_and_an_unset_one_only_where_asked():
    fields = {f.name: f for f in dataclasses.fields(Toy)}
    assert flag_help(fields["rate"]) == "how fast (default: 0.5)"
    assert flag_help(fields["steps"]) == "0 = as many as the data allows"
    assert flag_help(fields["steps"], say_unset=True).endswith("(default: 0)")
    assert flag_help(fields["name"], say_unset=True).endswith("(default: empty)")
    assert flag_help(fields["tags"]) == "labels (default: a,b)"


def _write(directory, text):
    path = directory / "ok.toml"
    path.write_text(text)
    return path
