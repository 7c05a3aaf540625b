"""fedtune/cli.py: bad input is one line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from fedtune.cli import main
from fedtune.common import certs


def server_flags(tmp_path, node_key, config) -> list[str]:
    certs.init(tmp_path / "certs", ["localhost"])
    return ["server", "--certs", str(tmp_path / "certs"), "--state", str(tmp_path / "state"),
            "--config", str(config), "--node", str(node_key), "--host", "127.0.0.1"]


def ssh_key(tmp_path, kind: str):
    """A `.pub` in OpenSSH's one-line form, of a type Flower's node authentication cannot use."""
    path = tmp_path / f"{kind}.pub"
    if kind == "unknown":  # a type no library knows
        path.write_text("ssh-foo AAAAB3NzaC1yc2EAAAADAQABAAABAQC7 someone@somewhere\n")
        return path
    key = (ed25519.Ed25519PrivateKey.generate() if kind == "ed25519"
           else rsa.generate_private_key(public_exponent=65537, key_size=2048))
    path.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                   serialization.PublicFormat.OpenSSH))
    return path


@pytest.mark.parametrize(("kind", "message"), [
    ("unknown", "is unreadable: Unsupported key type"),
    ("ed25519", "is not an elliptic-curve key"),
    ("rsa", "is not an elliptic-curve key"),
])
def test_a_node_key_fedtune_cannot_use_is_one_line_and_exit_2(tmp_path, capsys, kind, message):
    config = tmp_path / "run.toml"
    config.write_text("[federation]\nrounds = 1\n")

    code = main(server_flags(tmp_path, ssh_key(tmp_path, kind), config))

    err = capsys.readouterr().err
    assert code == 2 and message in err and f"{kind}.pub" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "state" / "superlink.log").exists()  # refused before Flower started


@pytest.mark.parametrize("command", ["server", "simulate"])
def test_a_negative_seed_is_one_line_and_exit_2(tmp_path, capsys, command):
    config = tmp_path / "run.toml"
    config.write_text("seed = -1\n[federation]\nrounds = 1\n")
    if command == "server":
        node = certs.node_key(tmp_path / "keys", "hospital-a")[1]
        flags = server_flags(tmp_path, node, config)
    else:
        flags = ["simulate", "--config", str(config), "--out", str(tmp_path / "run")]

    code = main(flags)

    err = capsys.readouterr().err
    assert code == 2 and "`seed` must be in [0, 2**63), got -1" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "run").exists() and not (tmp_path / "state" / "superlink.log").exists()


def test_every_error_of_bad_input_is_one_input_error():
    # the CLI maps InputError alone to exit 2: each module's error of bad input derives from it
    from fedtune.client.deploy import NodeSetupError, ServerUnreachable
    from fedtune.client.policy import PolicyError
    from fedtune.common.certs import CertError
    from fedtune.common.config import ConfigError
    from fedtune.common.data import DataError
    from fedtune.common.errors import InputError
    from fedtune.common.ports import PortBusy
    from fedtune.server.config_guard import ConfigChangeError
    from fedtune.server.deploy import DeployError
    from fedtune.simulations.export import ExportError

    for error in (ServerUnreachable, PolicyError, CertError, ConfigError, DataError, PortBusy,
                  ConfigChangeError, DeployError, ExportError, NodeSetupError):
        assert issubclass(error, InputError), error


def test_run_flags_take_type_help_and_default_from_the_configuration_fields():
    import argparse
    import re

    from fedtune.cli import FLAGS, build_parser
    from fedtune.common.config import RunConfig, run_field

    simulate = next(a for a in build_parser()._actions
                    if isinstance(a, argparse._SubParsersAction)).choices["simulate"]
    actions = {a.option_strings[0]: a for a in simulate._actions if a.option_strings}
    defaults = RunConfig().to_flat()
    for flag, key in FLAGS.items():
        field, shown = run_field(key), actions[flag].help
        assert shown.startswith(field.metadata["help"]), flag
        named = re.search(r"\(default: ([^)]*)\)$", shown)
        if named:  # a default the help names is the field's, as a run resolves it
            assert named[1] == str(defaults[key]), (flag, named[1], defaults[key])
